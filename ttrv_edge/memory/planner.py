"""Memory budget planner: micro-batch sizes for sampling and for the loss, measured peaks, out-of-memory back-off.

A TTRV step has two memory-hungry phases over the N rollouts of one input:

- **sample**: the prompt is prefilled once (batch 1, no grad) and the N continuations decode from that KV cache in
  micro-batches of ``k`` rows: KV cache ``k x (P + T)`` tokens, plus one step of logits ``k x V``;
- **train**: the loss forward with grad in micro-batches of ``m`` rows, gradients accumulated over them (the update
  equals the one-batch update); the prompt runs once per micro-batch and its cache is shared by the rows, so the
  activations are ``P + m x T`` tokens over all layers, plus the fused log-prob kernel's workspace (chunk rows x V)
  and the LoRA gradients and AdamW state.

``MemoryPlanner`` estimates both from the model's config (weights bytes counted from the tensors, KV bytes per
token, activation bytes per token, kernel workspace) and picks the largest ``k`` and ``m`` whose estimate fits the
budget. Every phase runs under ``measure``: the device's peak is reset before and read after
(``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's peak RSS, VmHWM, which Linux lets a process reset
through /proc/self/clear_refs; ``resource.getrusage`` where that is missing, which only ever grows). The ratio of
the measured to the estimated dynamic bytes becomes that phase's correction factor for the next plan, so a wrong
estimate corrects itself after one step. An out-of-memory error (``torch.OutOfMemoryError``, or the CPU allocator's
"can't allocate memory") halves the micro-batch and redoes the whole phase from its start, so no step is lost:
gradients accumulated before the failure are cleared and sampling is re-seeded.

What the estimate leaves out, and why: the CPU baseline (interpreter, libraries, allocator caches) is measured at
planner creation rather than estimated, since it depends on the allocator and the installed libraries, not on the
model; the CUDA context (~0.3-0.5 GB outside ``max_memory_allocated``) is not counted, matching how the GPU target
is measured. On CPU the budget is compared with the process's RSS.
"""

from __future__ import annotations

import gc
import re
import resource
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

__all__ = [
    "MemoryPlanner",
    "ModelCosts",
    "PeakMeter",
    "WorkShape",
    "format_bytes",
    "is_out_of_memory",
    "model_costs",
    "parse_memory_budget",
    "run_with_backoff",
    "tensor_bytes",
]

PHASES = ("sample", "train")
_UNITS = {"": None, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
HEAD_CHUNK_ROWS = 1024  # rows the fused lm_head kernel turns into logits at once (kernels.reference.DEFAULT_ROW_CHUNK)
CORRECTION_RANGE = (0.25, 8.0)
T = TypeVar("T")


def parse_memory_budget(text: str | int | None) -> int | None:
    """Bytes from "4GB", "6 GiB", "512MB", "1.5g" (K/M/G/T are powers of 1024, B/iB optional); None stays None.

    A bare number (no unit), zero, a negative or unparseable value is a ValueError naming --memory-budget.
    """
    if text is None:
        return None
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError(f"--memory-budget must be a size such as 4GB or 512MB, got {text!r}")
    match = _BUDGET.match(str(text))
    if match is None or (not match.group(2) and not match.group(3)):
        raise ValueError(f"--memory-budget must be a size with a unit, such as 4GB, 6GiB or 512MB; got {text!r}")
    unit = match.group(2).lower() or "b"
    value = float(match.group(1)) * _UNITS[unit]
    if value < 1:
        raise ValueError(f"--memory-budget must be positive, got {text!r}")
    return int(value)


def format_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{int(value)} B"


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failure: torch.OutOfMemoryError (CUDA) or the CPU allocator's RuntimeError."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, (RuntimeError, MemoryError)) and (
        "out of memory" in text.lower() or "can't allocate memory" in text.lower() or isinstance(error, MemoryError)
    )


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes held by a tensor, looking inside quantized tensor subclasses (optimum-quanto's data + scales)."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


# ---------------------------------------------------------------------------------------------- measuring peaks


class PeakMeter:
    """The peak memory of the device a model runs on, resettable per phase.

    CUDA: bytes allocated by tensors (``max_memory_allocated``). CPU: the process's resident set (VmHWM, reset by
    writing "5" to /proc/self/clear_refs; where that is impossible, ``getrusage`` peak RSS, which never decreases).
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss"
        self.resettable = self.device.type == "cuda" or self._can_clear_refs()

    @staticmethod
    def _can_clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return _proc_status("VmHWM") is not None
        except OSError:
            return False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")

    def current(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        rss = _proc_status("VmRSS")
        return rss if rss is not None else self.peak()

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _proc_status("VmHWM")
        if hwm is not None:
            return hwm
        scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kilobytes
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class WorkShape:
    """What one phase works on: prompt tokens P, new tokens T, vision tokens (patches) of the prompt's images."""

    prompt_tokens: int
    new_tokens: int
    vision_tokens: int = 0

    @classmethod
    def of(cls, inputs, new_tokens: int, patch: int, temporal: int = 1) -> WorkShape:
        pixels = inputs.get("pixel_values") if hasattr(inputs, "get") else None
        vision = 0
        if pixels is not None and patch > 0:
            vision = int(pixels.numel()) // (3 * patch * patch * max(temporal, 1))
        return cls(int(inputs["input_ids"].shape[1]), int(new_tokens), vision)


@dataclass(frozen=True)
class ModelCosts:
    """Byte costs of a model, from its config and its tensors. Dynamic costs exclude ``weights_bytes``."""

    weights_bytes: int
    trainable_bytes: int
    dtype_bytes: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_hidden: int = 0
    vision_intermediate: int = 0
    vision_heads: int = 0
    patch: int = 0
    temporal_patch: int = 1
    attention_scores: bool = False  # eager attention keeps heads x L x L scores per layer

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def train_act_bytes_per_token(self, length: int) -> int:
        """Activations autograd keeps per token over all layers, with frozen base weights and LoRA on q/k/v/o.

        Per layer: two RMSNorm inputs and outputs (4H), the LoRA inputs and q/attention-out/o-in (4H), k and v
        (2 x kv), the SwiGLU's gate, act(gate) and up (3I); eager attention adds scores and probabilities.
        """
        per_layer = 8 * self.hidden + 2 * self.kv_heads * self.head_dim + 3 * self.intermediate
        if self.attention_scores:
            per_layer += 2 * self.heads * length
        return self.layers * per_layer * self.dtype_bytes

    def vision_bytes(self, vision_tokens: int) -> int:
        """Transient memory of one no-grad pass of the vision tower over one copy of the images."""
        if vision_tokens <= 0 or self.vision_hidden <= 0:
            return 0
        linear = vision_tokens * (6 * self.vision_hidden + 2 * self.vision_intermediate)
        scores = 2 * self.vision_heads * vision_tokens * vision_tokens
        return (linear + scores) * self.dtype_bytes

    def prefill_bytes(self, prompt: int) -> int:
        """Transient memory of the batch-1 no-grad prefill (one layer's activations alive at a time)."""
        per_token = (6 * self.hidden + 3 * self.intermediate) * self.dtype_bytes
        return prompt * per_token + 2 * self.heads * prompt * prompt * self.dtype_bytes

    def sample_bytes(self, rows: int, shape: WorkShape) -> int:
        """Dynamic bytes of sampling ``rows`` continuations from the shared prefix."""
        prompt, new = shape.prompt_tokens, shape.new_tokens
        prefix = 2 * prompt * self.kv_bytes_per_token  # the prefilled cache and the copy expanded per micro-batch
        cache = rows * (prompt + new) * self.kv_bytes_per_token
        logits = rows * self.vocab * 4 * 4  # fp32 logits, processed scores, probabilities, and one in flight
        decode = rows * (6 * self.hidden + 3 * self.intermediate) * self.dtype_bytes
        transient = max(self.prefill_bytes(prompt) + self.vision_bytes(shape.vision_tokens), logits + decode)
        return prefix + cache + transient

    def train_bytes(self, rows: int, shape: WorkShape) -> int:
        """Dynamic bytes of the loss forward + backward on ``rows`` rollouts (grad through LoRA only).

        The prompt runs once per micro-batch and its KV cache is expanded to the rows (``shared_prefix_hidden``):
        P + rows x T tokens of activations, plus the expanded prompt cache, which autograd keeps.
        """
        prompt, new = shape.prompt_tokens, shape.new_tokens
        tokens = prompt + rows * new
        activations = tokens * self.train_act_bytes_per_token(prompt + new)
        prompt_cache = (rows + 1) * prompt * self.kv_bytes_per_token
        hidden_out = 2 * tokens * self.hidden * self.dtype_bytes
        head_rows = min(rows * new, HEAD_CHUNK_ROWS)
        # one chunk of logits in fp32: log-softmax, probabilities, p*log p, recomputed in the backward (activation
        # checkpointing) beside their gradients: ~8 [rows, V] tensors (fitted on the SmolVLM-256M architecture, CPU)
        workspace = head_rows * self.vocab * 4 * 8
        backward = 2 * tokens * (2 * self.hidden + 2 * self.intermediate) * 4  # one layer's gradient buffers
        optimizer = 4 * self.trainable_bytes  # grads + AdamW's two moments (+ one update temporary)
        vision = self.vision_bytes(shape.vision_tokens)
        return activations + prompt_cache + hidden_out + workspace + backward + optimizer + vision

    def dynamic_bytes(self, phase: str, rows: int, shape: WorkShape) -> int:
        return self.sample_bytes(rows, shape) if phase == "sample" else self.train_bytes(rows, shape)


def _first(config, *names, default=0):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def model_costs(model) -> ModelCosts:
    """The ``ModelCosts`` of a (peft-wrapped, possibly quantized) VLM: config sizes plus bytes of its tensors."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vision = getattr(config, "vision_config", None)
    hidden = int(_first(text, "hidden_size"))
    heads = int(_first(text, "num_attention_heads", default=1))
    head_dim = int(_first(text, "head_dim", default=hidden // max(heads, 1)))
    seen: set[int] = set()
    weights = trainable = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = tensor_bytes(tensor)
        weights += size
        if tensor.requires_grad:
            trainable += size
    head = base.get_output_embeddings()
    head = getattr(head, "base_layer", head)
    dtype = head.weight.dtype if head is not None else torch.float32
    attention = getattr(config, "_attn_implementation", None) or getattr(text, "_attn_implementation", None)
    vision_hidden = int(_first(vision, "embed_dim", "hidden_size")) if vision is not None else 0
    vision_inter = int(_first(vision, "intermediate_size", default=0)) if vision is not None else 0
    if vision is not None and not vision_inter:
        vision_inter = int(vision_hidden * float(_first(vision, "mlp_ratio", default=4)))
    return ModelCosts(
        weights_bytes=weights,
        trainable_bytes=trainable,
        dtype_bytes=torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4,
        layers=int(_first(text, "num_hidden_layers")),
        hidden=hidden,
        intermediate=int(_first(text, "intermediate_size", default=4 * hidden)),
        heads=heads,
        kv_heads=int(_first(text, "num_key_value_heads", default=heads)),
        head_dim=head_dim,
        vocab=int(_first(text, "vocab_size")),
        vision_hidden=vision_hidden,
        vision_intermediate=vision_inter,
        vision_heads=int(_first(vision, "num_attention_heads", "num_heads", default=0)) if vision is not None else 0,
        patch=int(_first(vision, "patch_size", default=0)) if vision is not None else 0,
        temporal_patch=int(_first(vision, "temporal_patch_size", default=1)) if vision is not None else 1,
        attention_scores=attention == "eager",
    )


# ---------------------------------------------------------------------------------------------- the planner


class MemoryPlanner:
    """Chooses micro-batch sizes for a memory budget, measures each phase's peak and corrects its estimate.

    ``budget_bytes=None`` means no limit: phases run on all rows at once (or the fixed ``sample_micro_batch`` /
    ``train_micro_batch``), peaks are still measured and an out-of-memory error still halves the micro-batch.
    """

    def __init__(
        self,
        model,
        budget_bytes: int | None = None,
        *,
        sample_micro_batch: int | None = None,
        train_micro_batch: int | None = None,
        device: torch.device | str | None = None,
    ):
        self.costs = model_costs(model)
        self.budget = budget_bytes
        self.fixed = {"sample": sample_micro_batch, "train": train_micro_batch}
        self.meter = PeakMeter(device if device is not None else _model_device(model))
        self.resident = self.meter.current()  # everything alive before the first phase: weights, libraries
        self.correction = {phase: 1.0 for phase in PHASES}
        self.caps: dict[str, int | None] = {phase: None for phase in PHASES}
        self.chosen: dict[str, int | None] = {phase: None for phase in PHASES}
        self.estimates: dict[str, int | None] = {phase: None for phase in PHASES}
        self.first_estimates: dict[str, int | None] = {phase: None for phase in PHASES}
        self.measured: dict[str, int | None] = {phase: None for phase in PHASES}
        self.peak_bytes = 0
        self.oom_retries = 0

    @classmethod
    def for_config(cls, vlm, config) -> MemoryPlanner:
        """The planner a ``TTRVConfig`` asks for (budget and fixed micro-batch sizes)."""
        return cls(
            vlm.model,
            parse_memory_budget(getattr(config, "memory_budget", None)),
            sample_micro_batch=getattr(config, "sample_micro_batch", None),
            train_micro_batch=getattr(config, "train_micro_batch", None),
        )

    def estimate(self, phase: str, rows: int, shape: WorkShape, corrected: bool = True) -> int:
        """Predicted peak (bytes, on the meter's scale) of ``phase`` run in micro-batches of ``rows``."""
        dynamic = self.costs.dynamic_bytes(phase, rows, shape)
        scale = self.correction[phase] if corrected else 1.0
        return int(self.resident + scale * dynamic)

    def micro_batch(self, phase: str, total: int, shape: WorkShape) -> int:
        """The micro-batch size (rows) for ``phase`` on ``total`` rows of ``shape``."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        rows = min(self.fixed[phase] or total, total)
        if self.budget is not None and self.fixed[phase] is None:
            rows = self._fit(phase, total, shape)
        if self.caps[phase] is not None:
            rows = min(rows, self.caps[phase])
        rows = max(rows, 1)
        self.chosen[phase] = rows
        self.estimates[phase] = self.estimate(phase, rows, shape)
        if self.first_estimates[phase] is None:
            self.first_estimates[phase] = self.estimates[phase]
        return rows

    def _fit(self, phase: str, total: int, shape: WorkShape) -> int:
        if self.estimate(phase, 1, shape) > self.budget:
            need = self.estimate(phase, 1, shape)
            raise ValueError(
                f"--memory-budget {format_bytes(self.budget)} is too small: one rollout of {shape.prompt_tokens}"
                f"+{shape.new_tokens} tokens needs about {format_bytes(need)} in the {phase} phase "
                f"(of which {format_bytes(self.resident)} is already in use); raise the budget, use --quantize, "
                f"or lower --max-new-tokens"
            )
        low, high = 1, total  # largest rows with estimate <= budget (the estimate grows with rows)
        while low < high:
            mid = (low + high + 1) // 2
            if self.estimate(phase, mid, shape) <= self.budget:
                low = mid
            else:
                high = mid - 1
        return low

    @contextmanager
    def measure(self, phase: str, rows: int, shape: WorkShape) -> Iterator[None]:
        """Measure the peak of ``phase`` (micro-batches of ``rows``) and correct the estimate from it."""
        self.meter.reset()
        yield
        peak = self.meter.peak()
        self.measured[phase] = peak
        self.peak_bytes = max(self.peak_bytes, peak)
        predicted = self.costs.dynamic_bytes(phase, rows, shape)
        if predicted > 0:
            ratio = max(peak - self.resident, 0) / predicted
            self.correction[phase] = min(max(ratio, CORRECTION_RANGE[0]), CORRECTION_RANGE[1])

    def backoff(self, phase: str, rows: int) -> int:
        """After an out-of-memory error with micro-batches of ``rows``: the halved size (an error at 1 row)."""
        if rows <= 1:
            raise torch.OutOfMemoryError(
                f"out of memory in the {phase} phase with a micro-batch of 1 rollout; lower --max-new-tokens, use "
                f"--quantize, or free memory"
            )
        self.oom_retries += 1
        self.caps[phase] = rows // 2
        self.chosen[phase] = rows // 2
        return rows // 2

    def report(self) -> dict:
        """What the JSON report shows: the peak, the budget, the estimates and the chosen micro-batch sizes."""
        peak = max(self.peak_bytes, self.meter.peak())
        return {
            "peak_memory_bytes": int(peak),
            "memory_measure": self.meter.kind,
            "budget_bytes": self.budget,
            "weights_bytes": self.costs.weights_bytes,
            "resident_bytes": self.resident,
            "sample_micro_batch": self.chosen["sample"],
            "train_micro_batch": self.chosen["train"],
            "estimated_peak_bytes": {p: self.first_estimates[p] for p in PHASES},
            "measured_peak_bytes": dict(self.measured),
            "oom_retries": self.oom_retries,
        }


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def run_with_backoff(
    attempt: Callable[[int], T],
    rows: int,
    *,
    phase: str,
    shape: WorkShape | None = None,
    planner: MemoryPlanner | None = None,
    device: torch.device | None = None,
) -> tuple[T, int]:
    """``attempt(rows)`` (a whole phase in micro-batches of ``rows``), halving ``rows`` after an out-of-memory error.

    ``attempt`` must start the phase from scratch (zero the gradients, re-seed the sampler): it is called again
    from the beginning after a failure, so the step is redone, never skipped. With a planner the attempt is measured.
    Returns the attempt's result and the micro-batch size that succeeded.
    """
    device = device or (planner.meter.device if planner is not None else torch.device("cpu"))
    while True:
        failed = False
        try:
            if planner is not None and shape is not None:
                with planner.measure(phase, rows, shape):
                    return attempt(rows), rows
            return attempt(rows), rows
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error):
                raise
            failed = True  # leave the except block first: its traceback keeps the failed attempt's tensors alive
        if failed:
            free_memory(device)
            if planner is not None:
                rows = planner.backoff(phase, rows)
            elif rows <= 1:
                raise torch.OutOfMemoryError(f"out of memory in the {phase} phase with a micro-batch of 1 rollout")
            else:
                rows //= 2


def chunks(total: int, size: int) -> list[slice]:
    """Consecutive slices of ``size`` rows covering ``range(total)``."""
    size = max(int(size), 1)
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]
