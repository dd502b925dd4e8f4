"""Microbenchmark of group_rewards: frequency + entropy rewards and advantages for G groups of N answers.

Providers: ``triton`` (ttrv_edge's one-launch kernel), ``torch`` (the eager reference) and ``compile``
(torch.compile of it). The op has no gradient, so only the "fwd" pass exists. CSV columns keep the shared schema:
N is the group size (answers per input), V holds the number of groups G, H is 0. GB/s counts the int64 ids read and
the rewards and advantages written (fp32). Answer ids are drawn from ``--answers`` distinct values plus invalid.

  python bench/bench_group_rewards.py --N 8,16,32,64 --V 1,64,1024
  python bench/bench_group_rewards.py --device cpu --providers torch --N 8,16 --V 4
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Case, base_parser, check_args, compiled, require_triton, run  # noqa: E402
from ttrv_edge.kernels import reference  # noqa: E402

OP = "group_rewards"
PROVIDERS = ("triton", "torch", "compile")


def _forward(provider, ids, args):
    if provider == "triton":
        require_triton(args.device)
        from ttrv_edge.kernels.group_rewards_triton import triton_group_rewards

        return lambda: triton_group_rewards(ids, args.alpha)
    if provider == "torch":
        return lambda: reference.group_rewards(ids, args.alpha)
    fn = compiled(reference.group_rewards)
    return lambda: fn(ids, args.alpha)


def cases(args):
    for groups in args.V:
        for n in args.N:
            nbytes = groups * n * (8 + 4 + 4) + groups * 4
            for provider in args.providers:

                def build(provider=provider, groups=groups, n=n):
                    ids = torch.randint(-1, args.answers, (groups, n), device=args.device)
                    forward = _forward(provider, ids, args)

                    def call():
                        with torch.no_grad():
                            return forward()

                    return call

                yield Case(provider, n, groups, 0, "int64", "fwd", build, nbytes)


def main(argv=None):
    parser = base_parser(OP, PROVIDERS, N="8,16,32,64", V="1,64,1024", H="0")
    parser.add_argument("--alpha", type=float, default=0.75)
    parser.add_argument("--answers", type=int, default=5, help="distinct valid answer ids drawn")
    args = parser.parse_args(argv)
    args.dtypes, args.passes = ["bf16"], ["fwd"]  # ids are int64 and there is no backward; keeps check_args happy
    check_args(args, PROVIDERS)
    return run(OP, cases(args), args)


if __name__ == "__main__":
    main()
