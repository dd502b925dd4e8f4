"""TTRV's rewards as reward functions for TRL's ``GRPOTrainer``, for training that already runs on TRL.

    from trl import GRPOConfig, GRPOTrainer
    from ttrv_edge.integrations.trl import ttrv_reward

    trainer = GRPOTrainer(model=..., reward_funcs=ttrv_reward, args=GRPOConfig(num_generations=8, ...),
                          train_dataset=dataset)  # columns: "prompt", optionally "prompt_id" and "choices"

Three functions, each called as TRL calls a reward function, ``f(completions, **kwargs) -> list[float]`` (one reward
per completion, in order; ``prompts`` and the dataset's other columns arrive as keyword lists aligned with
``completions``):

- ``frequency_reward``: r_i = p(a_i), the share of the prompt's completions that give the same answer (0 when a_i
  is unreadable);
- ``ttrv_reward``: r_i = p(a_i) + alpha * r_ent, r_ent = -H(p) / log K, alpha = 0.75 (docs/method.md §3);
- ``gated_reward``: TTRL's 0/1 majority reward behind the SCRL-style gate: 1 for the majority answer when it holds at
  least ``gate_share`` (0.5) of the completions and leads the runner-up by at least ``gate_margin`` (0.25, in shares
  of N); a group that fails the gate gets 0 for every completion.

The numbers come from ttrv-edge's own reward code (``ttrv_edge.rl.rewards.compute_rewards`` over the reference ops of
``ttrv_edge.kernels``), so they equal what ``ttrv-edge adapt`` computes for the same answers. Variants take keyword
arguments and work with ``functools.partial`` (``partial(ttrv_reward, alpha=0.5)``; TRL logs a partial under the
wrapped function's name); ``variant(ttrv_reward, alpha=0.5)`` returns a plain function named
``ttrv_reward_alpha0.5``, so that two variants log apart.

**Groups.** Completions are grouped by the ``prompt_id`` column when the dataset has one, else by the prompt
(a string, or a conversational prompt serialised as sorted-key JSON) together with the ``image``/``images`` column
when there is one (hashed pixels), so that one question asked of many images makes many groups. The same prompt
twice in one generation batch makes one group of 2N. When ``torch.distributed`` is initialised with more than one
process, every process's (group, answer) pairs are all-gathered first, so a prompt whose completions TRL split across
processes is counted whole; each process gets back its own rewards. TRL calls reward functions on every process in
step, which this collective needs: calling one of these functions on some processes only would hang.

**Answers.** With a ``choices`` column (a list of option texts, or one comma-separated string), an answer is the
option's letter, read as ``ttrv-edge --choices`` reads it ("B", "(b)", "The answer is B", the option's text); without
one, it is the normalised text of ``ttrv_edge.io.answers.normalise`` (first line, lower case, punctuation removed,
single spaces). A conversational completion is read from its last assistant message (string content, or the text
parts of a list of parts). Unreadable completions count in N but never as an answer (docs/method.md §2-3).

**What differs from ttrv-edge's own loop.** Only the rewards are ttrv-edge's; TRL samples and trains with its own
settings. In particular:

- the entropy term cancels under TRL's per-group normalisation exactly as in the paper: r_ent is the same for every
  completion of a prompt and TRL always subtracts the group mean (every ``scale_rewards``; ``"batch"`` only changes
  the std it divides by), so ``ttrv_reward`` and ``frequency_reward`` give the same update under the default
  ``scale_rewards="group"``. ttrv-edge's ``baseline="batch"`` (batch mean) and ``entropy_signal="self-certainty"``
  have no counterpart here;
- advantages use TRL's sample std (N - 1) and its epsilon (1e-4), not the population std and 1e-6;
- TRL keeps zero-advantage groups (consensus, gate failed) in its token normaliser, which shrinks the step of the
  other groups; ttrv-edge leaves them out (docs/method.md §6);
- sampling uses TRL's generation settings (``temperature``, ``top_p``, ``top_k``, ``max_completion_length``, the
  model's generation config), not ttrv-edge's one-distribution rule (§7); what trains is the model or
  ``peft_config`` given to TRL (ttrv-edge: LoRA on the language model); no consensus early stop, collapse stop,
  NaN/Inf guard, views or memory planner.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

from ..io.answers import Question, parse_options
from ..rl.rewards import compute_rewards

__all__ = [
    "GATE_MARGIN",
    "GATE_SHARE",
    "TTRV_ALPHA",
    "completion_text",
    "frequency_reward",
    "gated_reward",
    "group_keys",
    "ttrv_reward",
    "variant",
]

TTRV_ALPHA = 0.75
GATE_SHARE = 0.5
GATE_MARGIN = 0.25
IMAGE_COLUMNS = ("image", "images")


def frequency_reward(completions: Sequence, prompts: Sequence | None = None, **kwargs: Any) -> list[float]:
    """r_i = p(a_i): the share of the prompt's completions giving the same readable answer (0 when unreadable)."""
    return _rewards(completions, prompts, kwargs, reward="ttrv", alpha=0.0)


def ttrv_reward(
    completions: Sequence, prompts: Sequence | None = None, *, alpha: float = TTRV_ALPHA, **kwargs: Any
) -> list[float]:
    """TTRV's reward r_i = p(a_i) + alpha * r_ent, r_ent = -H(p) / log K (0 when K <= 1); docs/method.md §3."""
    return _rewards(completions, prompts, kwargs, reward="ttrv", alpha=float(alpha))


def gated_reward(
    completions: Sequence,
    prompts: Sequence | None = None,
    *,
    gate_share: float = GATE_SHARE,
    gate_margin: float = GATE_MARGIN,
    **kwargs: Any,
) -> list[float]:
    """1 for the majority answer's completions when the majority holds >= ``gate_share`` of the group and leads the
    runner-up by >= ``gate_margin`` (shares of N), else 0; a group that fails the gate is all 0 (SCRL-style)."""
    if not 0.0 < gate_share <= 1.0 or not 0.0 <= gate_margin <= 1.0:
        raise ValueError(f"gate_share must be in (0, 1] and gate_margin in [0, 1], got {gate_share}, {gate_margin}")
    return _rewards(
        completions, prompts, kwargs, reward="gated", gate_share=float(gate_share), gate_margin=float(gate_margin)
    )


def variant(func: Callable[..., list[float]], **options: float) -> Callable[..., list[float]]:
    """``func`` with ``options`` fixed, as a plain function named after them (``ttrv_reward_alpha0.5``): TRL logs
    ``rewards/<name>/mean``, and names a ``functools.partial`` after the function it wraps."""

    def configured(completions, prompts=None, **kwargs):
        return func(completions, prompts, **{**kwargs, **options})

    suffix = "_".join(f"{key}{value:g}" for key, value in sorted(options.items()))
    configured.__name__ = configured.__qualname__ = f"{func.__name__}_{suffix}" if suffix else func.__name__
    configured.__doc__ = func.__doc__
    return configured


def completion_text(completion: Any) -> str:
    """The text of a completion: a string as is; a conversational completion (a list of messages) by the content of
    its last assistant message with text, string content or the text parts of a list of parts."""
    if isinstance(completion, str):
        return completion
    messages = [completion] if isinstance(completion, dict) else list(completion or ())
    texts = [_content_text(m.get("content")) for m in messages if m.get("role", "assistant") == "assistant"]
    texts = [t for t in texts if t.strip()]
    return texts[-1] if texts else ""


def group_keys(
    prompts: Sequence | None, prompt_ids: Sequence | None = None, images: Sequence | None = None
) -> list[str]:
    """One key per completion, equal within a group and on every process: the ``prompt_id`` when given (and not None),
    else the prompt serialised as sorted-key JSON plus its images' hashed pixels; hashed to 40 hex digits."""
    count = len(prompt_ids) if prompt_ids is not None else len(prompts) if prompts is not None else 0
    keys = []
    for i in range(count):
        if prompt_ids is not None and prompt_ids[i] is not None:
            raw = "id:" + _stable_json(prompt_ids[i])
        elif prompts is None:
            raise ValueError("group completions needs the prompts or a prompt_id column")
        else:
            raw = "prompt:" + _stable_json(prompts[i])
            if images is not None:
                raw += "|images:" + _stable_json(images[i])
        keys.append(hashlib.sha1(raw.encode("utf-8")).hexdigest())
    return keys


def _rewards(completions: Sequence, prompts: Sequence | None, columns: dict, **options: Any) -> list[float]:
    completions = list(completions)
    prompt_ids = columns.get("prompt_id")
    choices = columns.get("choices")
    images = next((columns[c] for c in IMAGE_COLUMNS if columns.get(c) is not None), None)
    for name, column in (("prompts", prompts), ("prompt_id", prompt_ids), ("choices", choices), ("image", images)):
        if column is not None and len(column) != len(completions):
            raise ValueError(f"{name} has {len(column)} entries for {len(completions)} completions")
    if prompts is None and prompt_ids is None:
        raise ValueError("group completions needs the prompts or a prompt_id column")
    keys = group_keys(prompts, prompt_ids, images)
    questions: dict[tuple[str, ...] | None, Question] = {}
    answers = []
    for i, completion in enumerate(completions):
        options_of_row = _choices(choices[i]) if choices is not None else None
        if options_of_row not in questions:
            questions[options_of_row] = Question(choices=options_of_row)
        answers.append(questions[options_of_row].extract(completion_text(completion)))
    pairs, offset = _all_gather(list(zip(keys, answers)))
    rewards = _group_rewards(pairs, **options)
    return rewards[offset : offset + len(completions)]


def _group_rewards(pairs: list[tuple[str, str | None]], **options: Any) -> list[float]:
    """The reward of every (group key, answer) pair: groups of equal size go through ``compute_rewards`` together."""
    members: dict[str, list[int]] = {}
    for index, (key, _) in enumerate(pairs):
        members.setdefault(key, []).append(index)
    by_size: dict[int, list[list[int]]] = {}
    for indices in members.values():
        by_size.setdefault(len(indices), []).append(indices)
    rewards = [0.0] * len(pairs)
    for groups in by_size.values():
        answers = [[pairs[i][1] for i in indices] for indices in groups]
        values = compute_rewards(answers, **options).rewards.tolist()
        for indices, row in zip(groups, values):
            for index, value in zip(indices, row):
                rewards[index] = float(value)
    return rewards


def _all_gather(pairs: list) -> tuple[list, int]:
    """Every process's pairs in rank order, and where this process's start; the pairs themselves without
    torch.distributed or with one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return pairs, 0
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, pairs)
    offset = sum(len(part) for part in gathered[: dist.get_rank()])
    return [pair for part in gathered for pair in part], offset


def _choices(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    options = parse_options(value, "choices") if isinstance(value, str) else tuple(str(v) for v in value)
    return options or None


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = [p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type", "text") == "text"]
    return " ".join(p for p in parts if p)


def _stable_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_stable_object)


def _stable_object(value: Any) -> str:
    """A stable text for what JSON cannot hold (PIL images, arrays, tensors): the type, shape and hashed bytes."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch tensor
        value = value.detach().cpu().contiguous().numpy()
    if hasattr(value, "tobytes"):
        shape = getattr(value, "shape", None) or getattr(value, "size", None)
        mode = getattr(value, "mode", None) or getattr(value, "dtype", None)
        digest = hashlib.sha1(value.tobytes()).hexdigest()
        return f"{type(value).__name__}:{shape}:{mode}:{digest}"
    return f"{type(value).__name__}:{value}"
