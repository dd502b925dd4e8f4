"""The Python API for apps: load a VLM once, adapt it to many images.

    from ttrv_edge import TTRVModel
    model = TTRVModel.from_pretrained("demo", rollouts=8, steps=3)
    result = model.adapt("photo.jpg", "What animal is this?", choices=["cat", "dog", "bird", "fish"])
    print(result.after.answer, result.to_dict())
    model.save_adapter("my-adapter")  # the LoRA weights, loadable with from_pretrained(..., adapter="my-adapter")

Images may be paths, PIL images or numpy arrays. Episodic ``adapt`` resets the LoRA weights afterwards unless the
config says ``keep=True``; ``reset()`` restores the LoRA weights the model was loaded with at any time. ``adapt`` and
``adapt_dataset`` take TTRVConfig fields for one call (``model.adapt(image, ..., keep=True, steps=5)``), except the
ones fixed when the model loads (``LOAD_TIME_OPTIONS``). ``adapt_dataset`` takes ``Item``s or dicts
``{"image", "question", "choices"}`` (also ``"labels"``, ``"numeric"``), as the JSONL files of the CLI. A saved
adapter folder records the base model as the caller named it ("demo", a hub id, a local folder's name) and carries
a README.md model card. The work itself is done by ``rl.loop.AdaptationLoop`` (``loop``).

Under ``torch.distributed`` (every rank runs the same script, e.g. under torchrun) ``adapt_dataset`` is
data-parallel (``rl/distributed.py``): every rank must pass the same items; each returns every result, in input
order; an item that fails on any rank is skipped on all; ``save_adapter`` writes on rank 0 only. ``adapt`` (episodic,
one image) refuses to run with more than one rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import TTRVConfig
from .io.adapter_dirs import base_model_label, model_card
from .io.answers import DEFAULT_QUESTION, Question, parse_options
from .io.checkpoints import check_adapter_dir, save_adapter, verify_adapter_loaded
from .io.images import display_name, load_images
from .io.inputs import Item, SkippedItem
from .models.loading import LoadedVLM, load_vlm
from .rl import distributed
from .rl.loop import AdaptationLoop
from .rl.records import ItemResult, Prediction, PreparedItem, item_seed

LOAD_TIME_OPTIONS = (
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "train_norms",
    "quantize",
    "memory_budget",
    "sample_micro_batch",
    "train_micro_batch",
)
"""TTRVConfig fields fixed when the model loads (they shape the LoRA layers, the base weights or the memory planner):
``from_pretrained`` takes them, a single ``adapt`` call does not."""


def make_question(
    question: str | None = None,
    choices: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    numeric: bool = False,
) -> Question:
    return Question(
        text=question or DEFAULT_QUESTION,
        choices=tuple(choices) if choices is not None else None,
        labels=tuple(labels) if labels is not None else None,
        numeric=numeric,
    )


def as_item(entry) -> tuple[object, Question, str]:
    """(image, question, label) of an ``Item`` or a dict {"image", "question", "choices", "labels", "numeric"}
    (``choices`` and ``labels`` as lists or comma-separated strings; the image a path, PIL image or array; a dict
    with "images", a list of them, instead of "image" is a multi-image input)."""
    if isinstance(entry, Item):
        return entry.image, entry.question, entry.label
    if isinstance(entry, dict) and "images" in entry and "image" not in entry:
        if not isinstance(entry["images"], (list, tuple)):
            raise ValueError(f'adapt_dataset: "images" must be a list of images, got {entry["images"]!r:.80}')
        entry = {**{k: v for k, v in entry.items() if k != "images"}, "image": list(entry["images"])}
    if not isinstance(entry, dict) or entry.get("image") is None:
        raise ValueError(
            f'adapt_dataset: each item must be an Item or a dict with an "image" or "images", got {entry!r:.80}'
        )
    unknown = sorted(set(entry) - {"image", "question", "choices", "labels", "numeric"})
    if unknown:
        raise ValueError(f"adapt_dataset: unknown item keys {', '.join(unknown)}")
    options = {
        k: parse_options(v, k) if isinstance(v, str) else v for k, v in entry.items() if k in ("choices", "labels")
    }
    question = make_question(
        entry.get("question"), options.get("choices"), options.get("labels"), entry.get("numeric", False)
    )
    return entry["image"], question, describe_image(entry["image"])


def describe_image(image) -> str:
    """How an image appears in results: its path, or its kind and size for in-memory images (the descriptions of a
    multi-image input's images joined by " + ")."""
    if isinstance(image, (list, tuple)):
        return " + ".join(describe_image(one) for one in image)
    if isinstance(image, (str, Path)):
        return str(image)
    shape = getattr(image, "shape", None) or getattr(image, "size", None)
    return f"<{type(image).__name__} {tuple(shape) if shape is not None else ''}>"


class TTRVModel:
    """Test-time adaptation of one loaded VLM; see the module docstring for an example."""

    def __init__(self, vlm: LoadedVLM, config: TTRVConfig | None = None):
        self.vlm = vlm
        self.config = config or TTRVConfig()
        self._loop = AdaptationLoop(vlm, self.config)
        self._calls = 0  # each adapt()/answer() call samples from its own random stream: item_seed(seed, ..., call)
        self._mode: str | None = None  # "episodic" or "transductive" once adapted; said in a saved adapter's card
        self.base_model = base_model_label(vlm.name)  # what a saved adapter records as its base model

    @classmethod
    def from_pretrained(
        cls,
        model: str = "demo",
        config: TTRVConfig | None = None,
        *,
        adapter: str | None = None,
        trust_remote_code: bool = False,
        device: str | None = None,
        **options,
    ) -> TTRVModel:
        """Load ``model`` with a fresh LoRA (or the saved ``adapter``).

        ``model`` is a local folder, a hub id, "demo" (the bundled demo model) or "tiny" (a tiny random VLM).

        ``options`` are TTRVConfig fields (``rollouts=16``, ``lr=1e-4`` ...) applied on top of ``config``. Under
        torchrun with CUDA, ``device`` defaults to ``cuda:LOCAL_RANK``.
        """
        config = dataclasses.replace(config or TTRVConfig(), **options)
        device = device if device is not None else distributed.device_for(distributed.launch_from_env())
        vlm = _load_checked(model, config, adapter, trust_remote_code, device)
        return cls(vlm, config)

    def _prepare(self, image, question: Question, label: str | None = None) -> PreparedItem:
        label = label or describe_image(image)
        loaded = load_images(image)  # its errors name the file already; a list is a multi-image input
        try:
            return self._loop.prepare(label, loaded, question)
        except ValueError as error:  # the processor refused the image (size, aspect ratio)
            raise ValueError(f"{display_name(label)}: the model's processor cannot use this image ({error})") from None

    def _next_call(self) -> int:
        self._calls += 1
        return self._calls - 1

    @contextmanager
    def _options(self, options: dict) -> Iterator[TTRVConfig]:
        """The config with ``options`` (TTRVConfig fields) applied, for the duration of one call."""
        fixed = sorted(set(options) & set(LOAD_TIME_OPTIONS))
        if fixed:
            raise ValueError(f"{', '.join(fixed)}: fixed when the model loads; pass it to from_pretrained")
        base = self._loop.config
        config = dataclasses.replace(base, **options) if options else base
        self._loop.config = config
        self._set_optimizer(config)
        try:
            yield config
        finally:
            self._loop.config = base
            self._set_optimizer(base)

    def _set_optimizer(self, config: TTRVConfig) -> None:
        for group in self._loop.optimizer.param_groups:  # a run sets its mode's learning rate when it starts
            group["lr"], group["weight_decay"] = config.learning_rate("episodic"), config.weight_decay

    def adapt(
        self,
        image,
        question: str | None = None,
        choices=None,
        labels=None,
        numeric=False,
        progress=None,
        save_to: str | Path | None = None,
        **options,
    ) -> ItemResult:
        """Episodic TTRV on one image; returns answers before and after, and the steps taken.

        Successive calls draw from successive random streams of the run's seed (a fresh model with the same seed
        and the same calls repeats them exactly). ``save_to``: save the adapted LoRA weights there before the reset.
        ``options``: TTRVConfig fields for this call only (``keep=True``, ``steps=5`` ...).
        """
        if distributed.current().enabled:
            raise distributed.SharedError(
                "episodic adaptation (one image) runs in one process; under torchrun give a folder or JSONL "
                "(transductive), or run without torchrun"
            )
        item = self._prepare(image, make_question(question, choices, labels, numeric))
        with self._options(options) as config:
            self._mode = "episodic"
            if save_to is None:
                return self._loop.adapt_episode(item, index=self._next_call(), progress=progress)
            self._loop.config = dataclasses.replace(config, keep=True)  # reset below, after saving
            result = self._loop.adapt_episode(item, index=self._next_call(), progress=progress)
            self._save(Path(save_to), config)
            if not config.keep:
                self._loop.reset()
            return result

    def adapt_dataset(
        self,
        items: Iterable[Item | dict],
        progress=None,
        *,
        skipped: list[SkippedItem] | None = None,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        **options,
    ) -> list[ItemResult]:
        """Transductive TTRV over ``items`` (a budget of ``max_updates`` updates, or ``epochs`` passes), then every item
        answered by the adapted model.

        A bad image raises ValueError naming it, unless a ``skipped`` list is given: then it is recorded there and
        the other items are processed. ``checkpoint_dir``/``resume``: checkpoint the run, or continue it from there.
        ``run_info`` afterwards tells what the guards did (collapse, non-finite steps) and whether it resumed.
        Items are ``Item``s or dicts {"image", "question", "choices"}; ``options``: TTRVConfig fields for this call.
        """
        group = distributed.current()
        prepared, failed, labels = [], {}, []
        for index, entry in enumerate(items):
            image, question, label = as_item(entry)
            labels.append(f"{label}\n{question.text}")
            try:
                prepared.append((index, self._prepare(image, question, label)))
            except ValueError as error:
                if skipped is None and not group.enabled:
                    raise
                failed[index] = SkippedItem(label, str(error))
        if group.enabled:  # the ranks agree on the items, so that they keep one schedule
            failed = _failed_anywhere(group, failed, labels)
            if failed and skipped is None:
                raise distributed.SharedError(failed[min(failed)].reason)
        if skipped is not None:
            skipped.extend(failed[i] for i in sorted(failed))
        prepared = [item for index, item in prepared if index not in failed]
        if not prepared:
            raise ValueError("adapt_dataset: no usable items" + (f" ({skipped[0].reason})" if skipped else ""))
        checkpoint = Path(checkpoint_dir) if checkpoint_dir is not None else None
        with self._options(options):
            self._mode = "transductive"
            return self._loop.adapt_transductive(prepared, progress=progress, checkpoint_dir=checkpoint, resume=resume)

    @property
    def run_info(self) -> dict | None:
        """What the last ``adapt_dataset`` run reported: diversity checks, collapse, skipped steps, resume."""
        return self._loop.last_run

    def answer(self, image, question: str | None = None, choices=None, labels=None, numeric=False) -> Prediction:
        """Answer with the current LoRA weights, no adaptation."""
        item = self._prepare(image, make_question(question, choices, labels, numeric))
        return self._loop.predict(item, item_seed(self.config.seed, 4, self._next_call()))

    def reset(self) -> None:
        """Restore the LoRA weights this model was loaded with."""
        self._loop.reset()

    def save_adapter(self, directory: str | Path) -> Path:
        """Save the current LoRA weights (safetensors), adapter config and a README.md model card to ``directory``
        (under ``torch.distributed``: rank 0 alone writes; every rank holds the same weights)."""
        return self._save(Path(directory), self.config)

    def _save(self, directory: Path, config: TTRVConfig) -> Path:
        if not distributed.current().is_main:
            return directory
        peft_config = next(iter(getattr(self.vlm.model, "peft_config", {}).values()), None)
        lora = peft_config.to_dict() if peft_config is not None else {}
        card = model_card(self.base_model, config.to_dict(), lora, self._mode, directory)
        return save_adapter(self.vlm.model, directory, card=card, base_model=self.base_model)

    def work_units(self, mode: str, num_items: int) -> int:
        """Units of ``progress`` a run will report ("episodic" or "transductive" over ``num_items``)."""
        return self._loop.work_units(mode, num_items)

    def memory_report(self) -> dict:
        """Peak memory, budget, estimates and micro-batch sizes so far (``memory/planner.py``)."""
        return self._loop.memory_report()

    @property
    def loop(self) -> AdaptationLoop:
        """The adaptation loop behind this model, for code that drives single steps (the demo benchmark)."""
        return self._loop


def _failed_anywhere(group: distributed.Group, failed: dict[int, SkippedItem], inputs: list[str]) -> dict:
    """Every rank's unusable items (input index -> why), the reason of the lowest rank that failed; a reason says
    which ranks failed when not all did (a file that differs between nodes). ``inputs`` (what this rank was given)
    must agree across the ranks, else SharedError."""
    merged: dict[int, tuple[SkippedItem, list[int]]] = {}
    digest = hashlib.sha256("\n".join(inputs).encode("utf-8", "surrogateescape")).hexdigest()
    everything = group.gather([(failed, len(inputs), digest)])
    if len({(count, digest) for _, count, digest in everything}) > 1:
        raise distributed.SharedError("adapt_dataset: every rank must be given the same items, in the same order")
    for rank, (failures, _, _) in enumerate(everything):
        for index, bad in failures.items():
            merged.setdefault(index, (bad, []))[1].append(rank)
    return {
        index: bad
        if len(ranks) == group.world_size
        else SkippedItem(bad.image, f"{bad.reason} (on rank {_ranks(ranks)})")
        for index, (bad, ranks) in merged.items()
    }


def _ranks(ranks: list[int]) -> str:
    return f"{ranks[0]} only" if len(ranks) == 1 else "s " + ", ".join(map(str, ranks))


def _load_checked(model: str, config: TTRVConfig, adapter: str | None, trust_remote_code: bool, device) -> LoadedVLM:
    """``load_vlm`` with the adapter validated before and verified after loading, seeded LoRA init, and one-line
    errors for remote code and adapters that do not fit."""
    if adapter is not None:
        check_adapter_dir(adapter)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(config.seed)  # the fresh LoRA's random init follows the seed, like the rest of a run
        warnings.filterwarnings("ignore", message="Found missing adapter keys")  # verify_adapter_loaded says it
        try:
            vlm = load_vlm(
                model,
                lora_rank=config.lora_rank,
                lora_alpha=config.effective_lora_alpha,
                trust_remote_code=trust_remote_code,
                device=device,
                adapter=adapter,
                quantize=config.quantize,
                lora_targets=config.lora_targets,
                train_norms=config.train_norms,
            )
        except ValueError as error:
            if trust_remote_code or "custom code" not in str(error):
                raise
            raise ValueError(f"{error} It runs only with --trust-remote-code, for models you trust.") from None
        except RuntimeError as error:  # peft: "Error(s) in loading state_dict ... size mismatch"
            if adapter is None or "state_dict" not in str(error):
                raise
            raise ValueError(f"--adapter: {adapter} does not fit this model (tensor shapes differ)") from None
    if adapter is not None:
        verify_adapter_loaded(vlm.model, adapter)
    return vlm
