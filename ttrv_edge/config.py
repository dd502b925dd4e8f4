"""One dataclass of TTRV options, validated on construction.

Defaults follow the paper where it fits a laptop: the paper samples N=32 rollouts at T=1.0 and uses 16 for the
update; on the edge we sample and train on the same N=8 by default (the CLI's ``--rollouts``), since every
rollout costs a forward on a small device. alpha=0.75 is the reference implementation's entropy-reward weight.
One policy update per sampling round (GRPO with mu=1), so ``old_logp`` is the detached current log-prob and the
ratio is 1 at the update: clipping only matters when a caller runs several inner updates (``inner_updates``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

EPISODIC_LR = 5e-3
TRANSDUCTIVE_LR = 5e-4
"""Default learning rates per mode (``lr=None``), chosen on the shift benchmark (README, bench/results/shift_paired)."""
REWARDS = ("ttrv", "majority", "gated")
VIEW_TRANSFORMS = ("geometric", "photometric")
ENTROPY_SIGNALS = ("answer", "self-certainty")
AGGREGATIONS = ("token-mean", "sequence-mean")
BASELINES = ("group", "batch")
BACKENDS = ("auto", "triton", "torch")
DEFAULT_MAX_UPDATES = 32
"""Update steps of a transductive run when neither ``max_updates`` nor ``epochs`` is given."""
LORA_TARGETS = ("language", "vision", "all", "none")
CHOICES = {
    "reward": REWARDS,
    "view_transforms": VIEW_TRANSFORMS,
    "entropy_signal": ENTROPY_SIGNALS,
    "baseline": BASELINES,
    "aggregation": AGGREGATIONS,
    "backend": BACKENDS,
    "lora_targets": LORA_TARGETS,
}
"""Fields whose value is one of a fixed set: validated in ``__post_init__``, offered as choices by the CLI."""


def _help(text: str, default, **kwargs):
    return field(default=default, metadata={"help": text}, **kwargs)


@dataclass
class TTRVConfig:
    """Options of a TTRV run. Every field is validated in ``__post_init__``; errors name the option."""

    rollouts: int = _help("N: answers sampled per input and step (spread over --views)", 16)
    steps: int = _help("K: episodic mode, at most this many update steps per input", 3)
    epochs: int | None = _help(
        "E: transductive mode, full passes over the set, instead of --max-updates (None = use --max-updates)", None
    )
    max_updates: int | None = _help(
        "transductive mode: update steps in all; the loop cycles through shuffled passes of the set until they are "
        f"spent, so small and large sets get the same amount of adaptation (None = {DEFAULT_MAX_UPDATES} unless "
        "--epochs is given; give one of the two)",
        None,
    )
    batch_size: int = _help("transductive mode: inputs per update step", 1)
    lr: float | None = _help(
        "learning rate of the LoRA weights (AdamW); default per mode: 5e-3 episodic, 5e-4 transductive (on the shift "
        "benchmark episodic TTRV at 5e-3 never fell more than 1 point below base, while transductive TTRV at 5e-3 "
        "lost 8 points on held-out shifts and 21 on clean scenes)",
        None,
    )
    weight_decay: float = _help("AdamW weight decay", 0.0)
    max_grad_norm: float = _help("gradient clipping norm (0 disables)", 1.0)
    lora_rank: int = _help("LoRA rank r", 8)
    lora_alpha: int | None = _help("LoRA alpha (default 2 * rank)", None)
    lora_targets: str = _help(
        "which modules get LoRA: 'language' (q/k/v/o of the text model, the paper's), 'vision' (attention "
        "projections of the vision tower and the connector/projector linear layers), 'all' (both), or 'none' "
        "(only with --train-norms)",
        "language",
    )
    train_norms: bool = _help(
        "also train the affine weight and bias of the vision tower's LayerNorms (TENT-style); with --lora-targets "
        "none they are the only trained weights",
        False,
    )
    temperature: float = _help("sampling temperature of the rollouts (paper: 1.0; 1.5 for Qwen models)", 1.0)
    max_new_tokens: int = _help("longest rollout, in tokens", 16)
    alpha: float = _help("weight of the entropy reward (paper's reference implementation: 0.75)", 0.75)
    reward: str = _help(
        "'ttrv' (frequency + entropy), 'majority' (TTRL's 0/1 majority reward) or 'gated' (1 for the majority answer "
        "only when its share reaches --gate-share and leads the runner-up by --gate-margin; otherwise no update)",
        "ttrv",
    )
    gate_share: float = _help("gated reward: least share of the N rollouts the majority answer needs", 0.5)
    gate_margin: float = _help("gated reward: least lead of the majority answer's share over the runner-up's", 0.25)
    views: int = _help(
        "V: spread the N rollouts over V label-preserving views of the image (view 1 is the image itself; N / V "
        "each, the first N mod V views one more; at most N views) and vote across them; rewards come from the "
        "pooled vote (1 = the image only, as in the paper)",
        8,
    )
    view_transforms: str = _help(
        "views: 'geometric' (crop of 0.8-1.0 of the area, shift of up to 3 px, flip unless the question says left "
        "or right) or 'photometric' (geometric plus one of blur, median, autocontrast, equalisation: changes colours)",
        "geometric",
    )
    entropy_signal: str = _help(
        "'answer': the paper's -H(p)/log K, equal for all rollouts of an input; 'self-certainty': minus the "
        "rollout's mean token entropy, which does not cancel under group normalisation",
        "answer",
    )
    baseline: str = _help("advantage normalisation over each input's 'group' or over the whole 'batch'", "group")
    eps_low: float = _help("lower clip range of the GRPO ratio", 0.2)
    eps_high: float = _help("upper clip range of the GRPO ratio", 0.2)
    beta: float = _help("weight of the k3 KL to the adapter-disabled model (0 = no KL, no reference pass)", 0.0)
    aggregation: str = _help("loss aggregation: 'token-mean' or 'sequence-mean'", "token-mean")
    inner_updates: int = _help("policy updates per sampling round (GRPO's mu)", 1)
    consensus: float = _help("episodic early stop when this fraction of rollouts agree (1.0 = all)", 1.0)
    seed: int = _help("random seed: the same seed and inputs give the same run", 0)
    backend: str = _help("kernel backend: 'auto' (triton on CUDA, torch elsewhere), 'triton' or 'torch'", "auto")
    keep: bool = _help("episodic mode: keep the adapted LoRA weights after an input instead of resetting them", False)
    skip_nonfinite: bool = _help(
        "skip an update whose loss or gradient is NaN/Inf, restoring the LoRA weights and optimizer state from "
        "before it (the step record says why)",
        True,
    )
    collapse_guard: bool = _help(
        "transductive mode: stop and roll back to the most diverse checkpoint when nearly all inputs collapse to "
        "one majority answer (label-free; see ttrv_edge/rl/guards.py)",
        True,
    )
    collapse_share: float = _help(
        "collapse guard: fraction of inputs sharing one majority answer that counts as collapse", 0.9
    )
    collapse_drop: float = _help(
        "collapse guard: ... when the entropy of the inputs' majority answers has also fallen to this fraction of "
        "its value before adaptation (0.5 = halved)",
        0.5,
    )
    collapse_text_share: float = _help(
        "collapse guard, 'text' signal: fraction of inputs whose most common output text is their question's most "
        "common one that counts as collapse, when the entropy of those texts has also fallen to --collapse-drop of "
        "its start value (0 = signal off)",
        0.9,
    )
    collapse_eos_drop: float = _help(
        "collapse guard, 'eos' signal: fire when the fraction of rollouts that end with EOS (instead of running to "
        "--max-new-tokens) falls to this fraction of its start value (0 = signal off)",
        0.5,
    )
    collapse_entropy_floor: float = _help(
        "collapse guard, 'sharpening' signal: fire when the mean per-input answer entropy falls to this many nats "
        "(or to --collapse-entropy-drop of its start value, whichever is higher) while the entropy of the inputs' "
        "majority answers has fallen to --collapse-drop of its start value (0 and 0 = signal off)",
        0.05,
    )
    collapse_entropy_drop: float = _help(
        "collapse guard, 'sharpening' signal: the relative floor, a fraction of the start's mean answer entropy", 0.1
    )
    collapse_min_inputs: int = _help("collapse guard: inputs with a readable answer needed to judge", 4)
    collapse_check_every: int = _help(
        "collapse guard: steps between checks (0 = four checks spread over the run's updates); a check samples the "
        "checked inputs once with the current weights",
        0,
    )
    collapse_check_inputs: int = _help(
        "collapse guard: inputs sampled at each check, a fixed random subset of the set (0 = all inputs)", 32
    )
    checkpoint_every: int = _help(
        "transductive mode with a checkpoint folder: steps between checkpoints (LoRA + optimizer state)", 1
    )
    memory_budget: str | None = _help(
        "memory budget such as '4GB' or '512MB' (GPU: tensor bytes; CPU: process RSS): sizes the sampling and loss "
        "micro-batches to fit (None = no limit; an out-of-memory error halves a micro-batch either way)",
        None,
    )
    quantize: str = _help(
        "base weights of the language model: 'none', 'int8'/'int4' (optimum-quanto, CPU or GPU), 'nf4' "
        "(bitsandbytes 4-bit, CUDA only: QLoRA); the vision tower and lm_head stay unquantized",
        "none",
    )
    sample_micro_batch: int | None = _help("rollouts decoded at once (None = chosen from the memory budget)", None)
    train_micro_batch: int | None = _help(
        "rollouts per loss forward/backward, gradients accumulated (None = chosen from the memory budget)", None
    )

    def __post_init__(self) -> None:
        positive_ints = ("rollouts", "steps", "batch_size", "lora_rank", "max_new_tokens", "inner_updates")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{_flag(name)} must be a positive integer, got {value!r}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"--lora-alpha must be positive, got {self.lora_alpha!r}")
        if not isinstance(self.train_norms, bool):
            raise ValueError(f"--train-norms must be true or false, got {self.train_norms!r}")
        if self.lora_targets == "none" and not self.train_norms:
            raise ValueError("--lora-targets none trains nothing; it is allowed only with --train-norms")
        if self.lr is not None and (isinstance(self.lr, bool) or not self.lr > 0):
            raise ValueError(f"--lr must be > 0, got {self.lr!r}")
        for name in ("temperature",):
            if not getattr(self, name) > 0:
                raise ValueError(f"{_flag(name)} must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "max_grad_norm", "alpha", "beta", "eps_low", "eps_high"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 < self.consensus <= 1.0:
            raise ValueError(f"--consensus must be in (0, 1], got {self.consensus!r}")
        if self.eps_low >= 1.0:
            raise ValueError(f"--eps-low must be < 1, got {self.eps_low!r}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{_flag(name)} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        self._check_views()
        self._check_reliability()
        self._check_memory()

    def _check_views(self) -> None:
        if isinstance(self.views, bool) or not isinstance(self.views, int) or self.views < 1:
            raise ValueError(f"--views must be a positive integer, got {self.views!r}")
        for name in ("gate_share", "gate_margin"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{_flag(name)} must be in [0, 1], got {getattr(self, name)!r}")

    def _check_memory(self) -> None:
        from .memory.budget import parse_memory_budget
        from .models.quantize import QUANTIZE_MODES

        parse_memory_budget(self.memory_budget)
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}; got {self.quantize!r}")
        for name in ("sample_micro_batch", "train_micro_batch"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{_flag(name)} must be a positive integer or None, got {value!r}")

    def _check_reliability(self) -> None:
        for name in ("collapse_min_inputs", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{_flag(name)} must be a positive integer, got {value!r}")
        if isinstance(self.collapse_check_every, bool) or not isinstance(self.collapse_check_every, int):
            raise ValueError(f"--collapse-check-every must be an integer, got {self.collapse_check_every!r}")
        if self.collapse_check_every < 0:
            raise ValueError(f"--collapse-check-every must be >= 0, got {self.collapse_check_every!r}")
        if not 0.0 < self.collapse_share <= 1.0:
            raise ValueError(f"--collapse-share must be in (0, 1], got {self.collapse_share!r}")
        if not 0.0 <= self.collapse_drop < 1.0:
            raise ValueError(f"--collapse-drop must be in [0, 1), got {self.collapse_drop!r}")
        self._check_budget_and_signals()

    def _check_budget_and_signals(self) -> None:
        for name in ("epochs", "max_updates"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{_flag(name)} must be a positive integer or None, got {value!r}")
        if self.epochs is not None and self.max_updates is not None:
            raise ValueError(
                f"--epochs ({self.epochs}) and --max-updates ({self.max_updates}) both set the amount of "
                f"transductive adaptation; give one of them"
            )
        value = self.collapse_check_inputs
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"--collapse-check-inputs must be an integer >= 0, got {value!r}")
        if not 0.0 <= self.collapse_text_share <= 1.0:
            raise ValueError(f"--collapse-text-share must be in [0, 1], got {self.collapse_text_share!r}")
        for name in ("collapse_eos_drop", "collapse_entropy_drop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{_flag(name)} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0.0 <= self.collapse_entropy_floor < math.inf:
            raise ValueError(f"--collapse-entropy-floor must be >= 0 and finite, got {self.collapse_entropy_floor!r}")

    def transductive_updates(self, num_items: int) -> int:
        """Update steps of a transductive run over ``num_items`` inputs: ``epochs`` passes of ceil(n / batch_size)
        steps, else ``max_updates`` (default ``DEFAULT_MAX_UPDATES``)."""
        if self.epochs is not None:
            return self.epochs * -(-num_items // self.batch_size)
        return self.max_updates if self.max_updates is not None else DEFAULT_MAX_UPDATES

    def learning_rate(self, mode: str) -> float:
        """``lr``, or the measured safe default of ``mode`` ("episodic" or "transductive") when it is None."""
        if self.lr is not None:
            return self.lr
        return EPISODIC_LR if mode == "episodic" else TRANSDUCTIVE_LR

    @property
    def effective_lora_alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def help_text(cls, name: str) -> str:
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
