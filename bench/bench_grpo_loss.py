"""Microbenchmark of grpo_loss: clipped GRPO surrogate + k3 KL over N = B x T completion tokens.

Two modes. Default (``--V 0``): from per-token log-probs [B, T]; providers ``triton`` (ttrv_edge's kernels),
``torch`` (the eager reference, the same math TRL's GRPOTrainer runs) and ``compile`` (torch.compile of it).
With ``--V > 0``: from logits [B, T, V], the whole step from logits to loss; ``triton`` = fused logprob_entropy +
grpo_loss, ``torch`` = TRL's selective_log_softmax (+ entropy under no_grad, as TRL logs it) + the eager loss,
``compile`` = torch.compile of the vectorised version, ``liger`` = Liger's triton_grpo_loss, which starts from
logits (its logits carry one extra position per sequence, as its API expects).
GB/s counts one read of every input (and the write of the input gradient for fwd+bwd).

  python bench/bench_grpo_loss.py --N 4096,16384,32768 --seq-len 512 --dtypes fp32
  python bench/bench_grpo_loss.py --N 4096,16384 --V 151936 --dtypes bf16
  python bench/bench_grpo_loss.py --device cpu --providers torch --N 256 --seq-len 64 --dtypes fp32
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
    Skip,
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
from ttrv_edge.kernels import reference  # noqa: E402

OP = "grpo_loss"
PROVIDERS = ("triton", "torch", "compile", "liger")


def _batch(n, v, dtype, args, pass_):
    """Inputs for N tokens as [B, T] (+ logits [B, T(+1), V] in logits mode)."""
    device, dt = args.device, DTYPES[dtype]
    t = min(args.seq_len, n)
    b = n // t
    base = -torch.rand(b, t, device=device) * 3
    batch = {
        "old": base + torch.randn(b, t, device=device) * 0.1,
        "ref": base + torch.randn(b, t, device=device) * 0.1,
        "adv": torch.randn(b, device=device),
        "mask": torch.rand(b, t, device=device) < args.mask_fraction,
        "targets": torch.randint(0, max(v, 1), (b, t), device=device),
    }
    grad = pass_ == "fwd+bwd"
    if v == 0:
        batch["logp"] = base.to(dt).requires_grad_(grad)
    else:
        batch["logits"] = torch.randn(b, t, v, device=device).to(dt).requires_grad_(grad)
    return batch


def _loss_kwargs(args, batch):
    return dict(eps_low=args.eps_low, eps_high=args.eps_high, ref_logp=batch["ref"], beta=args.beta,
                aggregation=args.aggregation)  # fmt: skip


def _vectorized_loss(logits, targets, old, adv, mask, temperature, kwargs):
    logp = torch.log_softmax(logits.float() / temperature, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return reference.grpo_loss(logp, old, adv, mask, **kwargs)[0]


def _liger_forward(batch, args):
    require_liger(args.device)
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss as liger_grpo_loss

    logits = batch["logits"]
    padded = torch.cat([logits, logits[:, -1:]], dim=1).detach().requires_grad_(logits.requires_grad)
    batch["liger_logits"] = padded
    kwargs = dict(temperature=args.temperature, beta=args.beta, eps_low=args.eps_low, eps_high=args.eps_high)
    if "reduce" in inspect.signature(liger_grpo_loss).parameters:
        kwargs["reduce"] = True
    mask = batch["mask"].to(torch.int32)

    def forward():
        out = liger_grpo_loss(padded, batch["old"], batch["ref"], batch["targets"], batch["adv"], mask, **kwargs)
        loss = out[0] if isinstance(out, (tuple, list)) else out
        if loss.dim() > 0:  # older versions return per-token losses
            loss = (loss * mask).sum() / mask.sum().clamp_min(1)
        return (loss,)

    return forward


def _forward(provider, batch, args):
    kw = _loss_kwargs(args, batch)
    old, adv, mask, targets, T = batch["old"], batch["adv"], batch["mask"], batch["targets"], args.temperature
    if "logp" in batch:
        logp = batch["logp"]
        if provider == "triton":
            require_triton(args.device)
            from ttrv_edge.kernels.grpo_loss_triton import triton_grpo_loss

            return lambda: (triton_grpo_loss(logp, old, adv, mask, **kw)[0],)
        if provider == "torch":
            return lambda: (reference.grpo_loss(logp, old, adv, mask, **kw)[0],)
        if provider == "compile":
            fn = compiled(lambda *a: reference.grpo_loss(*a, **kw)[0])
            return lambda: (fn(logp, old, adv, mask),)
        raise Skip("Liger's GRPO loss starts from logits: give --V > 0")
    logits = batch["logits"]
    if provider == "triton":
        require_triton(args.device)
        from ttrv_edge.kernels.grpo_loss_triton import triton_grpo_loss
        from ttrv_edge.kernels.logprob_entropy_triton import triton_logprob_entropy

        def fused():
            logp, _entropy = triton_logprob_entropy(logits, targets, T)
            return (triton_grpo_loss(logp, old, adv, mask, **kw)[0],)

        return fused
    if provider == "torch":

        def eager():
            z = logits / T
            logp = trl_selective_log_softmax(z, targets)
            with torch.no_grad():
                trl_entropy_from_logits(z)
            return (reference.grpo_loss(logp, old, adv, mask, **kw)[0],)

        return eager
    if provider == "compile":
        fn = compiled(_vectorized_loss)
        return lambda: (fn(logits, targets, old, adv, mask, T, kw),)
    return _liger_forward(batch, args)


def cases(args):
    for dtype in args.dtypes:
        elem = torch.tensor([], dtype=DTYPES[dtype]).element_size()
        for v in args.V:
            for n in args.N:
                for pass_ in args.passes:
                    if v == 0:  # logp (dtype) + old + ref (fp32) + mask (1 byte)
                        reads = n * (elem + 8 + 1)
                        nbytes = reads if pass_ == "fwd" else 2 * reads + n * elem
                    else:
                        nbytes = n * v * elem * (1 if pass_ == "fwd" else 3) + n * 17
                    for provider in args.providers:

                        def build(provider=provider, n=n, v=v, dtype=dtype, pass_=pass_):
                            batch = _batch(n, v, dtype, args, pass_)
                            forward = _forward(provider, batch, args)
                            key = "liger_logits" if provider == "liger" else ("logp" if v == 0 else "logits")
                            return make_pass(forward, [batch[key]], pass_)

                        yield Case(provider, n, v, 0, dtype, pass_, build, nbytes)


def main(argv=None):
    parser = base_parser(OP, PROVIDERS, N="4096,16384,32768", V="0", H="0")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence T (B = N / T)")
    parser.add_argument("--temperature", type=float, default=1.0, help="logits mode only")
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--eps-low", type=float, default=0.2)
    parser.add_argument("--eps-high", type=float, default=0.28)
    parser.add_argument("--aggregation", choices=("token-mean", "sequence-mean"), default="token-mean")
    parser.add_argument("--mask-fraction", type=float, default=0.9, help="fraction of tokens left unmasked")
    args = parser.parse_args(argv)
    check_args(args, PROVIDERS)
    return run(OP, cases(args), args)


if __name__ == "__main__":
    main()
