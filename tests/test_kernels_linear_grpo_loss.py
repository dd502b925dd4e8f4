"""linear_grpo_loss (hidden states -> GRPO loss): Triton kernel, torch reference, the composition of today's ops
(linear_logprob_entropy + grpo_loss) and an fp32 gold; values, stats and gradients, edge cases, allocations."""

from __future__ import annotations

import pytest
import torch
from test_kernels_helpers import assert_three_way, max_err, triton_interpreter
from torch.utils._python_dispatch import TorchDispatchMode

from ttrv_edge import kernels

reference = kernels.reference

# Max-abs error allowed beyond twice the low-precision reference's own error (see test_kernels_linear_logprob_entropy).
THREE_WAY_ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
TEMPERATURE = 1.3


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    with triton_interpreter():
        yield


def _triton(*args, block_v=None, **kwargs):
    """The public op with backend="triton"; the Triton function itself when a vocabulary block is given."""
    if block_v is None:
        return kernels.linear_grpo_loss(*args, backend="triton", **kwargs)
    from ttrv_edge.kernels.linear_grpo_loss_triton import triton_linear_grpo_loss

    return triton_linear_grpo_loss(*args, block_v=block_v, **kwargs)


def _torch(*args, **kwargs):
    return kernels.linear_grpo_loss(*args, backend="torch", **kwargs)


def _inputs(n=20, h=24, v=300, dtype=torch.float32, bias=True, seed=0, scale=0.5):
    """hidden, weight, bias, targets and the per-token GRPO inputs; old/ref spread around the current log-probs."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * scale
    b = torch.randn(v, generator=gen) if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    logp, _ = reference.linear_logprob_entropy(hidden, weight, targets, b, TEMPERATURE)
    old = logp + torch.randn(n, generator=gen) * 0.3  # ratios on both sides of the clip range
    ref = logp + torch.randn(n, generator=gen) * 0.2
    adv = torch.randn(n, generator=gen)
    mask = (torch.rand(n, generator=gen) > 0.25).float()
    mask[0] = 1.0
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return {"hidden": cast(hidden), "weight": cast(weight), "bias": cast(b), "targets": targets, "old": old,
            "adv": adv, "mask": mask, "ref": ref}  # fmt: skip


def _run(fn, x, train_weight=False, cast=None, old="given", **kwargs):
    """(loss, stats, dhidden, dweight, dbias) of ``fn`` on the inputs ``x`` (leaves cloned, optionally cast)."""
    leaves = [x["hidden"], x["weight"], x["bias"]]
    leaves = [None if t is None else t.detach().clone().to(cast or t.dtype) for t in leaves]
    leaves[0].requires_grad_(True)
    if train_weight:
        for t in leaves[1:]:
            if t is not None:
                t.requires_grad_(True)
    hidden, weight, bias = leaves
    old_logp = x["old"] if old == "given" else None
    kwargs.setdefault("temperature", TEMPERATURE)
    loss, stats = fn(hidden, weight, x["targets"], old_logp, x["adv"], x["mask"], bias=bias, **kwargs)
    loss.backward()
    return loss.detach(), stats, *[None if t is None else t.grad for t in leaves]


def _composition(hidden, weight, targets, old_logp, adv, mask, ref_logp=None, bias=None, temperature=1.0,
                 eps_low=0.2, eps_high=0.2, beta=0.0, entropy_coef=0.0, normalizer=None, backend="torch",
                 chunk_rows=None, return_entropy=False):  # fmt: skip
    """Today's two ops: linear_logprob_entropy, then grpo_loss on N sequences of one token (advantages per token)."""
    logp, entropy = kernels.linear_logprob_entropy(hidden, weight, targets, bias, temperature, backend=backend)
    old = logp.detach() if old_logp is None else old_logp
    col = lambda t: None if t is None else t[:, None]  # noqa: E731
    loss, stats = kernels.grpo_loss(col(logp), col(old), adv, col(mask), eps_low, eps_high, col(ref_logp), beta,
                                    backend=backend)  # fmt: skip
    tokens = mask.float().sum().clamp_min(1.0)
    denom = tokens if normalizer is None else torch.as_tensor(float(normalizer))
    loss = loss * tokens / denom - entropy_coef * (entropy * mask).sum() / denom
    stats = {k: v * tokens / denom for k, v in stats.items()}
    return loss, {**stats, "logp": logp.detach(), "entropy": entropy.detach()}


def _scale(t: torch.Tensor) -> float:
    finite = t[torch.isfinite(t)]
    return max(1.0, float(finite.abs().max())) if finite.numel() else 1.0


def _assert_same(a, b, atol, names=("loss", "stats", "dhidden", "dweight", "dbias")):
    """Outputs of two runs equal within ``atol`` relative to max(1, the largest finite |value|)."""
    for name, x, y in zip(names, a, b, strict=True):
        if name == "stats":
            for key in ("logp", "clip_fraction", "mean_kl", "entropy"):
                if key in x and key in y:
                    assert max_err(x[key], y[key]) <= atol * _scale(y[key]), key
            continue
        assert (x is None) == (y is None), f"{name}: one backend has a gradient, the other not"
        if x is not None:
            assert max_err(x, y) <= atol * _scale(y), f"{name}: {max_err(x, y):.3e}"


OPTIONS = [
    {},
    {"ref_logp": "ref", "beta": 0.1, "eps_high": 0.28},
    {"entropy_coef": 0.05, "normalizer": 37.0},
    {"ref_logp": "ref", "beta": 0.04, "entropy_coef": -0.02, "old": None},
]


def _options(x, options):
    options = dict(options)
    if options.get("ref_logp") == "ref":
        options["ref_logp"] = x["ref"]
    return options


@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "kl", "entropy+normalizer", "on-policy"])
@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen", "trained"])
def test_fp32_kernel_matches_reference_composition_and_gold(options, train_weight):
    # N = 20 rows in chunks of 8 (the last partial), V = 300 in vocabulary blocks of 128 (the last partial too).
    x = _inputs()
    kw = _options(x, options)
    kernel = _run(lambda *a, **k: _triton(*a, chunk_rows=8, block_v=128, **k), x, train_weight, **kw)
    ref = _run(lambda *a, **k: _torch(*a, chunk_rows=8, **k), x, train_weight, **kw)
    composed = _run(_composition, x, train_weight, **kw)
    _assert_same(kernel, ref, 2e-6)
    _assert_same(kernel, composed, 2e-6)
    loss, stats = kernel[:2]
    assert kernel[2].abs().sum() > 0 and (kernel[2][x["mask"] == 0] == 0).all()
    if kw.get("old", "given") == "given":
        assert 0 < stats["clip_fraction"] < 1, "the clip range should be active for some tokens"
    assert (stats["mean_kl"] > 0) == (kw.get("beta", 0) > 0)
    assert ("entropy" in stats) == (kw.get("entropy_coef", 0) != 0)


@pytest.mark.parametrize(
    "dtype, bias, train_weight",
    [(torch.float16, True, True), (torch.bfloat16, True, False), (torch.bfloat16, False, True)],
)
def test_low_precision_three_way(dtype, bias, train_weight):
    x = _inputs(dtype=dtype, bias=bias)
    kw = {"ref_logp": x["ref"], "beta": 0.05, "entropy_coef": 0.01}
    kernel = _run(lambda *a, **k: _triton(*a, chunk_rows=8, block_v=128, **k), x, train_weight, **kw)
    ref = _run(lambda *a, **k: _torch(*a, chunk_rows=8, **k), x, train_weight, **kw)
    gold = _run(_torch, x, train_weight, cast=torch.float32, **kw)
    for name, k, r, g in zip(["loss", "stats", "dhidden", "dweight", "dbias"], kernel, ref, gold, strict=True):
        if name == "stats":
            for key in ("logp", "entropy", "clip_fraction", "mean_kl"):
                assert_three_way(k[key], r[key], g[key], THREE_WAY_ATOL[dtype])
            continue
        if g is None:
            assert k is None, f"{name} got a gradient it should not have"
            continue
        assert k.dtype == r.dtype == (torch.float32 if name == "loss" else dtype), name
        assert_three_way(k, r, g, THREE_WAY_ATOL[dtype])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_suppressed_target_under_a_minus_inf_bias_is_masked_out_without_nan(backend):
    x = _inputs(n=7, v=130)
    x["bias"][[3, 17, 129]] = float("-inf")  # suppressed ids, one in the last (partial) vocabulary block
    x["targets"][2] = 17  # its log-prob is -inf: the mask must exclude it
    x["mask"][2] = 0.0
    x["mask"][5] = 0.0
    fn = (lambda *a, **k: _triton(*a, block_v=64, **k)) if backend == "triton" else _torch
    for kw in ({"ref_logp": x["ref"], "beta": 0.1, "entropy_coef": 0.1}, {}):
        out = _run(fn, x, True, **kw)
        gold = _run(_torch, x, True, **kw)
        loss, stats, dhidden, dweight, dbias = out
        assert stats["logp"][2] == float("-inf") and torch.isfinite(loss)
        assert all(torch.isfinite(t).all() for t in (dhidden, dweight, dbias, stats["mean_kl"]))
        assert (dhidden[2] == 0).all() and (dhidden[5] == 0).all() and (dbias[[3, 17, 129]] == 0).all()
        _assert_same(out, gold, 2e-6)
        if not kw:  # without the KL the composition of today's ops is finite too
            _assert_same(out, _run(_composition, x, True, **kw), 2e-6)
    # Whatever old/ref hold at masked tokens (here -inf and NaN) changes nothing.
    x["adv"][[2, 5]] = torch.tensor([-1.0, 1.0])
    kw = {"ref_logp": x["ref"], "beta": 0.1}
    clean = _run(fn, x, True, **kw)
    x["old"][[2, 5]], x["ref"][[2, 5]] = float("-inf"), float("nan")
    _assert_same(_run(fn, x, True, **kw), clean, 0.0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_logits_of_1e4(backend):
    x = _inputs(n=6, h=4, v=70, bias=False)
    x["weight"] = torch.sign(x["weight"]) * 5e3  # |logits| up to ~1e4 (before the temperature)
    logp, _ = reference.linear_logprob_entropy(x["hidden"], x["weight"], x["targets"], None, TEMPERATURE)
    x["old"] = logp + torch.randn(6, generator=torch.Generator().manual_seed(1)) * 0.3
    x["ref"] = logp - 0.2
    fn = _triton if backend == "triton" else _torch
    out = _run(fn, x, True, ref_logp=x["ref"], beta=0.1, entropy_coef=0.1)
    expected = _run(_torch, x, True, ref_logp=x["ref"], beta=0.1, entropy_coef=0.1)
    assert float(out[1]["logp"].abs().max()) > 1e3 and all(torch.isfinite(t).all() for t in (out[0], *out[2:4]))
    # At |logp| ~ 1e4 one fp32 ulp of a log-prob is ~1e-3 (the reference's log_softmax and the kernel's
    # (z - m) - log s round differently), which the ratio exp(logp - old) turns into a relative 1e-3.
    _assert_same(out, expected, 2e-3)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_single_row_and_all_masked(backend):
    fn = _triton if backend == "triton" else _torch
    x = _inputs(n=1, v=50)
    _assert_same(_run(fn, x, True, beta=0.1, ref_logp=x["ref"]), _run(_composition, x, True, beta=0.1,
                 ref_logp=x["ref"]), 2e-6)  # fmt: skip
    x["mask"][:] = 0.0
    loss, stats, dhidden, dweight, _ = _run(fn, x, True, beta=0.1, ref_logp=x["ref"])
    assert loss == 0 and stats["clip_fraction"] == 0 and stats["mean_kl"] == 0
    assert (dhidden == 0).all() and (dweight == 0).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_sequence_mean_through_token_weights(backend):
    # B = 4 sequences of T = 5 tokens (row 2 empty, so it must not count): weights 1 / (len_b * num_seqs).
    b, t = 4, 5
    x = _inputs(n=b * t)
    mask2d = x["mask"].view(b, t).clone()
    mask2d[2] = 0.0
    adv_seq = torch.randn(b)
    weights, normalizer = reference.token_weights(mask2d, "sequence-mean")
    assert normalizer == 3
    x["mask"], x["adv"] = weights.flatten(), adv_seq.repeat_interleave(t)
    fn = _triton if backend == "triton" else _torch
    loss, _, dhidden, *_ = _run(fn, x, ref_logp=x["ref"], beta=0.05, normalizer=normalizer)
    hidden = x["hidden"].clone().requires_grad_(True)
    logp, _ = kernels.linear_logprob_entropy(hidden, x["weight"], x["targets"], x["bias"], TEMPERATURE)
    two_d = lambda v: v.view(b, t)  # noqa: E731
    expected, _ = kernels.grpo_loss(two_d(logp), two_d(x["old"]), adv_seq, mask2d, ref_logp=two_d(x["ref"]),
                                    beta=0.05, aggregation="sequence-mean")  # fmt: skip
    expected.backward()
    assert max_err(loss, expected.detach()) < 2e-6 and max_err(dhidden, hidden.grad) < 2e-6
    tokens, count = reference.token_weights(mask2d)
    assert torch.equal(tokens, mask2d) and count == mask2d.sum()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_micro_batches_with_the_batch_normalizer_add_up_to_the_batch(backend):
    x = _inputs(n=20)
    fn = _triton if backend == "triton" else _torch
    kw = {"ref_logp": x["ref"], "beta": 0.1, "entropy_coef": 0.02}
    full = _run(fn, x, True, **kw)
    total = x["mask"].sum()
    parts = []
    for rows in (slice(0, 7), slice(7, 20)):
        part = {k: (v[rows] if k not in ("weight", "bias") else v) for k, v in x.items()}
        parts.append(_run(fn, part, True, **{**kw, "ref_logp": x["ref"][rows], "normalizer": total}))
    assert max_err(parts[0][0] + parts[1][0], full[0]) < 2e-6
    for key in ("clip_fraction", "mean_kl"):
        assert max_err(parts[0][1][key] + parts[1][1][key], full[1][key]) < 2e-6
    assert max_err(torch.cat([parts[0][2], parts[1][2]]), full[2]) < 2e-6
    assert max_err(parts[0][3] + parts[1][3], full[3]) < 2e-6 and max_err(parts[0][4] + parts[1][4], full[4]) < 2e-6


def test_no_grad_forward_and_upstream_scaling():
    x = _inputs(n=10)
    with torch.no_grad():
        loss, stats = _triton(x["hidden"], x["weight"], x["targets"], x["old"], x["adv"], x["mask"], bias=x["bias"],
                              temperature=TEMPERATURE)  # fmt: skip
    reference_loss, _, dhidden, *_ = _run(_triton, x)
    assert max_err(loss, reference_loss) == 0 and loss.grad_fn is None
    hidden = x["hidden"].clone().requires_grad_(True)
    loss, _ = _triton(hidden, x["weight"], x["targets"], x["old"], x["adv"], x["mask"], bias=x["bias"],
                      temperature=TEMPERATURE)  # fmt: skip
    (loss * -3.0).backward(retain_graph=True)
    assert max_err(hidden.grad, -3.0 * dhidden) < 1e-6
    hidden.grad = None
    loss.backward()  # a second backward of the same graph gives the same gradient again
    assert max_err(hidden.grad, dhidden) == 0


def test_frozen_weight_allocates_no_weight_gradient_and_no_full_logits():
    n, v, chunk = 20, 256, 8
    x = _inputs(n=n, h=32, v=v)
    shapes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # Views (weight.t(), row slices) and in-place ops (the interpreter's copies) allocate nothing.
            if func.is_view or func._schema.is_mutable:
                return out
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    shapes.append(tuple(t.shape))
            return out

    for train_weight in (False, True):
        shapes.clear()
        hidden = x["hidden"].clone().requires_grad_(True)
        weight, bias = x["weight"].clone().requires_grad_(train_weight), x["bias"].clone()
        with Record():  # the forward computes the gradient: record both passes
            loss, _ = _triton(hidden, weight, x["targets"], x["old"], x["adv"], x["mask"], ref_logp=x["ref"],
                              bias=bias, beta=0.1, chunk_rows=chunk)  # fmt: skip
            loss.backward()
        assert hidden.grad is not None and bias.grad is None
        assert ((v, 32) in shapes) == train_weight, "a weight gradient buffer exactly when lm_head trains"
        assert (v,) not in shapes, "a bias gradient buffer was allocated"
        largest = max(torch.Size(s).numel() for s in shapes if s != (v, 32))
        assert largest <= chunk * v, f"a tensor of {largest} elements exceeds one [chunk, V] logits buffer"


def test_user_errors_are_value_errors():
    x = _inputs(n=4, v=50)
    args = [x["hidden"], x["weight"], x["targets"], x["old"], x["adv"], x["mask"]]
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match="token-mean"):
            kernels.linear_grpo_loss(*args, aggregation="sequence-mean", backend=backend)
        with pytest.raises(ValueError, match="normalizer"):
            kernels.linear_grpo_loss(*args, normalizer=0, backend=backend)
        with pytest.raises(ValueError, match="chunk_rows"):
            kernels.linear_grpo_loss(*args, chunk_rows=0, backend=backend)
    for i, name in ((3, "old_logp"), (4, "advantages"), (5, "mask")):
        bad = list(args)
        bad[i] = bad[i][:3]
        with pytest.raises(ValueError, match=name):
            _triton(*bad)
    with pytest.raises(ValueError, match="do not match"):
        _triton(x["hidden"], x["weight"][:, :5], *args[2:])
    with pytest.raises(ValueError, match="bias"):
        _triton(*args, bias=x["bias"][:7])


def test_autotuned_on_cuda_one_fixed_config_under_the_interpreter(monkeypatch):
    from types import SimpleNamespace

    from ttrv_edge.kernels import linear_grpo_loss_triton as fused
    from ttrv_edge.kernels import logprob_entropy_triton as rows

    tuned = fused._rows_tuned  # the kernel writes dlogits over the logits: the tuner must restore them
    assert tuned.restore_value == ["logits_ptr"] and list(tuned.keys) == ["V", "HAS_ENTROPY", "COMPUTE_GRAD"]
    configs = rows.autotune_configs()
    assert [c.kwargs["BLOCK_V"] for c in rows.prune_blocks(configs, {"V": 300})] == [1024]
    assert rows.prune_blocks(configs, {"V": 151936}) == configs
    launched = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append((self.name, meta))

    def pick(like, block_v):
        launched.clear()
        rows.launch(Recorder("fixed"), Recorder("tuned"), like, block_v, (1,), "arg", HAS_ENTROPY=True)
        return launched[0]

    cuda = SimpleNamespace(is_cuda=True, shape=(4, 300))
    assert pick(torch.zeros(4, 300), None) == ("fixed", {"HAS_ENTROPY": True, "BLOCK_V": 512, "num_warps": 1})
    assert pick(cuda, None)[0] == "fixed"  # TRITON_INTERPRET=1 (this module's fixture): never tune
    monkeypatch.delenv("TRITON_INTERPRET")
    assert pick(cuda, None) == ("tuned", {"HAS_ENTROPY": True})
    assert pick(cuda, 128) == ("fixed", {"HAS_ENTROPY": True, "BLOCK_V": 128, "num_warps": 8})
