"""Microbenchmark of linear_grpo_loss: hidden states [N, H] -> lm_head -> clipped GRPO loss (+ k3 KL), N = B x T.

Providers:
- ``fused``: ttrv_edge's Triton op (``linear_grpo_loss_triton``): per row chunk one GEMM to logits, one Triton pass
  for log-prob + loss + d(logits), a second GEMM to d(hidden); no [N, V] tensor, no weight-gradient buffer when the
  lm_head is frozen;
- ``composition``: today's two ops, ``kernels.linear_logprob_entropy`` then ``kernels.grpo_loss`` (backend "auto":
  their Triton kernels on CUDA);
- ``trl``: TRL's eager path: full [N, V] logits = hidden @ W.T, divided by T, selective_log_softmax, entropy from
  the logits (under no_grad, as TRL logs it), the eager loss (``reference.grpo_loss``);
- ``compile``: torch.compile of the same full-logits math without TRL's memory-capping loops;
- ``liger``: Liger's chunked ``LigerFusedLinearGRPOLoss`` (loss_type "bnpo", the token-mean), where installed.

The lm_head weight is frozen by default, as with LoRA (``--train-weight`` makes it trainable). All providers see
all N tokens with a random mask (``--mask-fraction`` unmasked) and per-sequence advantages (per token for the fused
op). GB/s counts one read of hidden, weight and the per-token inputs (targets, old/ref log-probs, advantages, mask)
for fwd, plus the write of d(hidden) (and d(weight) with --train-weight) for fwd+bwd. The GEMMs make this op
compute-bound: compare ms and peak_MB, not GB/s. Real numbers need a GPU; on CPU run it only at tiny shapes.

  python bench/bench_linear_grpo_loss.py  # defaults: N 1024,4096,16384; V 49280,151936; H 576,1536,2048; bf16
  python bench/bench_linear_grpo_loss.py --N 4096 --V 151936 --H 1536 --providers fused,composition,liger
  python bench/bench_linear_grpo_loss.py --device cpu --providers fused,composition,trl --N 64 --V 256 --H 16
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DTYPES,
    Case,
    base_parser,
    check_args,
    compiled,
    make_pass,
    require_liger,
    require_triton,
    run,
    trl_entropy_from_logits,
    trl_selective_log_softmax,
)

from ttrv_edge import kernels  # noqa: E402

reference = kernels.reference

OP = "linear_grpo_loss"
PROVIDERS = ("fused", "composition", "trl", "compile", "liger")


def _batch(n, v, h, dtype, args, pass_):
    """Inputs of N = B x T tokens; old/ref log-probs near the current policy's (ratios around 1)."""
    device, dt = args.device, DTYPES[dtype]
    t = args.seq_len if n % args.seq_len == 0 else n
    b = n // t
    hidden = torch.randn(n, h, device=device).to(dt)
    weight = (torch.randn(v, h, device=device) / h**0.5).to(dt)
    targets = torch.randint(0, v, (n,), device=device)
    with torch.no_grad():
        logp, _ = reference.linear_logprob_entropy(hidden, weight, targets, None, args.temperature)
    grad = pass_ == "fwd+bwd"
    adv = torch.randn(b, device=device)
    return {
        "hidden": hidden.requires_grad_(grad),
        "weight": weight.requires_grad_(grad and args.train_weight),
        "targets": targets,
        "old": (logp + 0.1 * torch.randn_like(logp)).view(b, t),
        "ref": (logp + 0.1 * torch.randn_like(logp)).view(b, t),
        "adv": adv,
        "adv_tokens": adv.repeat_interleave(t),
        "mask": (torch.rand(b, t, device=device) < args.mask_fraction),
        "shape": (b, t),
    }


def _loss_kwargs(args):
    return {"eps_low": args.eps_low, "eps_high": args.eps_high, "beta": args.beta}


def _trl_loss(x, args):
    """TRL's eager GRPO step from hidden states: full logits, row-looped log-softmax, entropy for logging."""
    b, t = x["shape"]
    z = (x["hidden"] @ x["weight"].t()).view(b, t, -1) / args.temperature
    logp = trl_selective_log_softmax(z, x["targets"].view(b, t))
    with torch.no_grad():
        trl_entropy_from_logits(z)
    return reference.grpo_loss(logp, x["old"], x["adv"], x["mask"], ref_logp=x["ref"], **_loss_kwargs(args))[0]


def _vectorized_loss(hidden, weight, targets, old, adv, mask, ref, temperature, kwargs):
    b, t = old.shape
    logits = (hidden @ weight.t()).float() / temperature
    logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).view(b, t)
    return reference.grpo_loss(logp, old, adv, mask, ref_logp=ref, **kwargs)[0]


def _liger_forward(x, args):
    require_liger(args.device)
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    options = {"beta": args.beta, "epsilon_low": args.eps_low, "epsilon_high": args.eps_high,
               "temperature": args.temperature, "loss_type": "bnpo", "use_ref_model": True}  # fmt: skip
    accepted = inspect.signature(LigerFusedLinearGRPOLoss.__init__).parameters
    loss_fn = LigerFusedLinearGRPOLoss(**{k: v for k, v in options.items() if k in accepted})
    b, t = x["shape"]
    hidden = x["hidden"].view(b, t, -1)
    targets, mask = x["targets"].view(b, t), x["mask"].to(torch.int64)

    def forward():
        out = loss_fn(hidden, x["weight"], targets, mask, x["adv"], ref_per_token_logps=x["ref"],
                      old_per_token_logps=x["old"])  # fmt: skip
        return out[0] if isinstance(out, (tuple, list)) else out

    return forward


def _forward(provider, x, args):
    """The zero-argument forward of ``provider``, returning the scalar loss."""
    T, kw = args.temperature, _loss_kwargs(args)
    hidden, weight, targets = x["hidden"], x["weight"], x["targets"]
    if provider == "fused":
        require_triton(args.device)
        from ttrv_edge.kernels.linear_grpo_loss_triton import triton_linear_grpo_loss

        old, ref, mask = x["old"].reshape(-1), x["ref"].reshape(-1), x["mask"].reshape(-1)
        return lambda: triton_linear_grpo_loss(hidden, weight, targets, old, x["adv_tokens"], mask, ref_logp=ref,
                                               temperature=T, chunk_rows=args.chunk_rows, **kw)[0]  # fmt: skip
    if provider == "composition":

        def composition():
            logp, _ = kernels.linear_logprob_entropy(hidden, weight, targets, None, T, chunk_rows=args.chunk_rows)
            logp = logp.view(x["shape"])
            return kernels.grpo_loss(logp, x["old"], x["adv"], x["mask"], ref_logp=x["ref"], **kw)[0]

        return composition
    if provider == "trl":
        return lambda: _trl_loss(x, args)
    if provider == "compile":
        fn = compiled(_vectorized_loss)
        return lambda: fn(hidden, weight, targets, x["old"], x["adv"], x["mask"], x["ref"], T, kw)
    return _liger_forward(x, args)


def cases(args):
    for dtype in args.dtypes:
        elem = torch.tensor([], dtype=DTYPES[dtype]).element_size()
        for v in args.V:
            for h in args.H:
                for n in args.N:
                    for pass_ in args.passes:
                        # hidden + weight, then per token: targets (8) + old, ref, advantage (4 each) + mask (1)
                        nbytes = (n * h + v * h) * elem + n * 21
                        if pass_ == "fwd+bwd":
                            nbytes += n * h * elem + (v * h * elem if args.train_weight else 0)
                        for provider in args.providers:

                            def build(provider=provider, n=n, v=v, h=h, dtype=dtype, pass_=pass_):
                                x = _batch(n, v, h, dtype, args, pass_)
                                grads_of = [x["hidden"]] + ([x["weight"]] if args.train_weight else [])
                                forward = _forward(provider, x, args)
                                return make_pass(lambda: (forward(),), grads_of, pass_)

                            yield Case(provider, n, v, h, dtype, pass_, build, nbytes)


def gemm_count(provider: str, pass_: str, train_weight: bool) -> int:
    """GEMMs of size N x V x H per call (analytic): the forward's logits; for fwd+bwd d(hidden), and d(weight) when
    the lm_head trains. The fused op writes d(hidden) during the forward; the composition recomputes the logits in
    its backward (activation checkpointing); Liger's chunked loss always computes d(weight) as well."""
    if provider == "liger":
        return 3
    if pass_ == "fwd":
        return 1
    backward = {"fused": 1, "composition": 2, "trl": 1, "compile": 1}[provider]
    return 1 + backward + (1 if train_weight else 0)


def main(argv=None):
    parser = base_parser(OP, PROVIDERS, N="1024,4096,16384", V="49280,151936", H="576,1536,2048")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence T (B = N / T)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--eps-low", type=float, default=0.2)
    parser.add_argument("--eps-high", type=float, default=0.28)
    parser.add_argument("--mask-fraction", type=float, default=0.9, help="fraction of tokens left unmasked")
    parser.add_argument("--chunk-rows", type=int, default=None, help="row chunk of fused/composition (default: auto)")
    parser.add_argument("--train-weight", action="store_true", help="the lm_head weight requires grad too")
    args = parser.parse_args(argv)
    check_args(args, PROVIDERS)
    if args.seq_len < 1:
        raise SystemExit("--seq-len must be >= 1")

    def analytic(row: dict) -> dict:
        gemms = gemm_count(row["provider"], row["pass"], args.train_weight)
        return {"gemms": gemms, "GFLOP": gemms * 2 * row["N"] * row["V"] * row["H"] / 1e9}

    return run(OP, cases(args), args, analytic)


if __name__ == "__main__":
    main()
