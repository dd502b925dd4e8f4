"""Files that must survive crashes and must not run code: adapters, run checkpoints, resume state.

- Every file is written atomically: a temporary file in the same folder, flushed and fsynced, then ``os.replace``
  over the target, then the folder fsynced. A reader (or a crash) sees the old file or the new one, never half of
  one. A LoRA adapter folder is written by peft into a temporary sibling folder first; a new folder is renamed into
  place whole, an existing one gets its files replaced one by one, weights before config. (Deviation: between those
  two renames a crash leaves new weights with the old config; both are complete files, and for the same run they
  describe the same adapter.)
- Tensors are stored as safetensors only; JSON holds everything else. Nothing here unpickles, and adapters saved
  as ``adapter_model.bin`` (a pickle) are refused rather than loaded.
- ``check_adapter_dir`` validates an adapter folder before loading it (config, safetensors header, finite values,
  keys that are LoRA factors or the vision-tower norms its config lists in ``modules_to_save``: ``--train-norms``);
  ``verify_adapter_loaded`` checks afterwards that every tensor of the file landed in the model,
  because peft loads an adapter of another model silently, with fresh LoRA weights where the names do not match.
- ``RunCheckpoint`` stores a transductive run: ``progress.json`` (format, options, inputs, next step, results so
  far, collapse-guard state) and safetensors files with the adapted weights (``lora_state``: LoRA factors and, with
  ``--train-norms``, the vision norms) and the optimizer state (AdamW moments and step counters as tensors,
  hyper-parameters as JSON metadata) of the last step and of the guard's best snapshot.
  Tensor files carry the step in their name and are written before ``progress.json`` points at them, so an
  interruption at any moment leaves the previous consistent checkpoint. The sampling order and seeds are functions of
  ``seed`` and the step, so resuming replays them instead of storing RNG states. A data-parallel run
  (``rl/distributed.py``) has rank 0 save and load the folder and send the state to the other ranks, so only rank 0
  needs it; the world size is not part of a run's options, and a P=2 run may be resumed with P=1 or P=4.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from ..models.lora import VISION_MARKERS, Snapshot, is_adapted_param, load_lora_state, lora_state
from .images import display_name

if TYPE_CHECKING:
    from ..rl.guards import CollapseGuard

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROGRESS = "progress.json"
FORMAT = "ttrv-edge-run"
VERSION = 1
RESUME_IGNORED_OPTIONS = ("checkpoint_every", "keep")
"""Options that may differ between an interrupted run and its resumption (they do not change the trajectory)."""


# ------------------------------------------------------------------------------------------------ atomic writes


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is never seen half-written (temp file, fsync, os.replace)."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save ``tensors`` as a safetensors file, atomically."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(Path(path), safetensors_bytes(contiguous, metadata=metadata))


def load_tensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a corrupt file is a ValueError naming it and ``what`` it is."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{what}: {display_name(path)} is not a readable safetensors file ({first})") from None


# ------------------------------------------------------------------------------------------------ LoRA adapters


def save_adapter(model, directory: Path, card: str | None = None, base_model: str | None = None) -> Path:
    """Save the LoRA adapter of the peft ``model`` (safetensors + config) to ``directory``, atomically. ``card``
    replaces peft's template README.md, ``base_model`` the path peft records in adapter_config.json (the base model
    as the user named it, ``io/adapter_dirs.py``)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"--out: {display_name(directory)} exists and is not a folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if card is not None:
            (staging / "README.md").write_text(card, encoding="utf-8")
        if base_model is not None:
            config = json.loads((staging / ADAPTER_CONFIG).read_text(encoding="utf-8"))
            config["base_model_name_or_path"] = base_model
            (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
        files = sorted(staging.iterdir(), key=lambda p: (p.name != ADAPTER_WEIGHTS, p.name != ADAPTER_CONFIG, p.name))
        for file in files:
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        if not directory.exists():
            _fsync_dir(staging)
            os.rename(staging, directory)
        else:
            for file in files:
                os.replace(file, directory / file.name)
            _fsync_dir(directory)
        _fsync_dir(directory.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def check_adapter_dir(path) -> None:
    """Refuse, with one line naming it, an adapter folder that is missing, corrupt, pickled or not LoRA."""
    path = Path(path)
    name = display_name(path)
    if not path.exists():
        raise ValueError(f"--adapter: {name}: no such folder")
    if not path.is_dir():
        raise ValueError(f"--adapter: {name} is a file; give the adapter's folder (with {ADAPTER_CONFIG})")
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise ValueError(f"--adapter: {name} has no {ADAPTER_CONFIG} (expected a saved LoRA adapter folder)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"--adapter: {display_name(config_file)} is not valid JSON ({error.__class__.__name__})"
        ) from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"--adapter: {name} is not a LoRA adapter (peft_type {kind!r}); only LoRA is supported")
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (path / "adapter_model.bin").exists():
            raise ValueError(
                f"--adapter: {name} holds only adapter_model.bin, a pickle; ttrv-edge loads safetensors only "
                f"(re-save it with safe_serialization=True)"
            )
        raise ValueError(f"--adapter: {name} has no {ADAPTER_WEIGHTS}")
    tensors, _ = load_tensors(weights, "--adapter")
    if not tensors:
        raise ValueError(f"--adapter: {display_name(weights)} holds no tensors")
    norms = _saved_norms(config)
    foreign = sorted(k for k in tensors if "lora_" not in k and not _is_norm_key(k, norms))
    if foreign:
        raise ValueError(f"--adapter: {display_name(weights)} holds non-LoRA tensors (e.g. {foreign[0]})")
    bad = sorted(k for k, t in tensors.items() if not t.is_floating_point() or not torch.isfinite(t).all())
    if bad:
        raise ValueError(f"--adapter: {display_name(weights)} holds non-finite or non-float values (e.g. {bad[0]})")


def _saved_norms(config: dict) -> list[str]:
    """The norm modules an adapter config trains (``modules_to_save``); ValueError unless all are vision-side."""
    names = config.get("modules_to_save") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"--adapter: modules_to_save must be a list of module names, got {names!r}")
    outside = [n for n in names if not any(marker in n for marker in VISION_MARKERS)]
    if outside:
        raise ValueError(f"--adapter: the adapter trains {outside[0]}, outside the vision tower; only its norms may be")
    return names


def _is_norm_key(key: str, norms: list[str]) -> bool:
    module, _, leaf = key.rpartition(".")
    return leaf in ("weight", "bias") and any(module.endswith(name) for name in norms)


def _file_key(param_name: str) -> str:
    """peft's on-disk name of an adapted parameter: the adapter name ("default") removed, and for a trainable norm
    the ``modules_to_save.default`` level (peft stores the trained copy under the module's own name)."""
    return re.sub(r"\.default(?=\.|$)", "", param_name.replace(".modules_to_save.default.", "."))


def verify_adapter_loaded(model, path) -> None:
    """Check that the adapter file in ``path`` is exactly what the model's LoRA parameters now hold."""
    weights = Path(path) / ADAPTER_WEIGHTS
    tensors, _ = load_tensors(weights, "--adapter")
    params = {_file_key(n): p for n, p in model.named_parameters() if is_adapted_param(n)}
    unused = sorted(set(tensors) - set(params))
    missing = sorted(set(params) - set(tensors))
    if unused or missing:
        example = (unused or missing)[0]
        raise ValueError(
            f"--adapter: {display_name(path)} does not fit this model: {len(unused)} of its {len(tensors)} tensors "
            f"match no LoRA layer or trained norm and {len(missing)} of those have no tensor (e.g. {example}); was "
            f"it saved for another model?"
        )
    for key, tensor in tensors.items():
        if tensor.shape != params[key].shape or not torch.equal(tensor.to(params[key]), params[key].detach()):
            raise ValueError(f"--adapter: {display_name(path)} does not fit this model ({key} did not load)")


# ------------------------------------------------------------------------------------------------ optimizer state


def snapshot_tensors(model_state: dict[str, torch.Tensor], optimizer_state: dict) -> tuple[dict, dict]:
    """A ``Snapshot``'s tensors ("lora/..." and "optim/...") and JSON metadata, for one safetensors file."""
    tensors = {f"lora/{k}": v for k, v in model_state.items()}
    extra: dict = {"param_groups": optimizer_state["param_groups"], "scalars": {}}
    for index, values in optimizer_state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim/{index}.{key}"] = value
            else:
                extra["scalars"].setdefault(str(index), {})[key] = value
    return tensors, extra


def snapshot_from_tensors(tensors: dict[str, torch.Tensor], extra: dict) -> Snapshot:
    lora = {k[len("lora/") :]: v for k, v in tensors.items() if k.startswith("lora/")}
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            index, key = name[len("optim/") :].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    for index, values in extra["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return Snapshot(lora=lora, optimizer={"state": state, "param_groups": extra["param_groups"]})


def _load_optimizer(optimizer: torch.optim.Optimizer, state: dict, what: str) -> None:
    current = [g["params"] for g in optimizer.state_dict()["param_groups"]]
    if [g.get("params") for g in state["param_groups"]] != current:
        raise ValueError(f"{what}: the optimizer state does not match this model's LoRA parameters")
    optimizer.load_state_dict(state)


def save_snapshot(path: Path, snapshot: Snapshot, step: int) -> None:
    tensors, extra = snapshot_tensors(snapshot.lora, snapshot.optimizer)
    metadata = {"format": FORMAT, "version": str(VERSION), "step": str(step), "optimizer": json.dumps(extra)}
    atomic_save_tensors(path, tensors, metadata)


def load_snapshot(path: Path, what: str) -> Snapshot:
    tensors, metadata = load_tensors(path, what)
    if metadata.get("format") != FORMAT or "optimizer" not in metadata:
        raise ValueError(f"{what}: {display_name(path)} is not a ttrv-edge checkpoint file")
    return snapshot_from_tensors(tensors, json.loads(metadata["optimizer"]))


# ------------------------------------------------------------------------------------------------ run checkpoints


@dataclass
class ResumeState:
    """What a checkpoint holds: where to continue, the results so far, the guard's state and (``weights``) the LoRA
    weights and optimizer state it continues from, for ranks that did not read the folder themselves."""

    next_step: int
    stopped: bool
    results: list[dict]
    guard: dict
    best: Snapshot | None
    weights: Snapshot | None = None


class RunCheckpoint:
    """The checkpoint folder of one transductive run (see the module docstring for the layout)."""

    def __init__(self, directory: Path, config, labels: list[str]):
        self.directory = Path(directory)
        self.config = config
        self.labels = list(labels)
        self._best_step: int | None = None

    @property
    def progress_file(self) -> Path:
        return self.directory / PROGRESS

    def exists(self) -> bool:
        return self.progress_file.exists()

    def require_fresh(self) -> None:
        """Refuse to start a new run over the checkpoint of an earlier one (``--resume`` continues it)."""
        if self.exists():
            raise ValueError(
                f"--checkpoint-dir: {display_name(self.directory)} holds the checkpoint of an earlier run; pass "
                f"--resume to continue it, or use another folder"
            )

    def save(self, model, optimizer, next_step: int, results: list, guard: CollapseGuard, stopped: bool) -> None:
        """Write the state after ``next_step`` steps: tensors first, then progress.json pointing at them."""
        self.directory.mkdir(parents=True, exist_ok=True)
        weights = f"step-{next_step:06d}.safetensors"
        save_snapshot(self.directory / weights, Snapshot(lora_state(model), optimizer.state_dict()), next_step)
        best = None
        if guard.best is not None:
            best = f"best-{guard.best_step:06d}.safetensors"
            if self._best_step != guard.best_step or not (self.directory / best).exists():
                save_snapshot(self.directory / best, guard.best, guard.best_step)
                self._best_step = guard.best_step
        progress = {
            "format": FORMAT,
            "version": VERSION,
            "next_step": next_step,
            "stopped": stopped,
            "weights": weights,
            "best": best,
            "config": self.config.to_dict(),
            "items": self.labels,
            "results": [r.to_dict() for r in results],
            "guard": guard.state(),
        }
        atomic_write_bytes(self.progress_file, json.dumps(progress).encode("utf-8"))
        self._remove_stale({weights, best})

    def _remove_stale(self, keep: set) -> None:
        for file in self.directory.glob("*.safetensors"):
            if re.fullmatch(r"(step|best)-\d{6}\.safetensors", file.name) and file.name not in keep:
                file.unlink(missing_ok=True)

    def load(self, model, optimizer) -> ResumeState:
        """Restore the LoRA weights and optimizer state of the checkpoint and return the rest of it."""
        what = "--resume"
        try:
            progress = json.loads(self.progress_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(
                f"{what}: {display_name(self.progress_file)} is unreadable ({error.__class__.__name__})"
            ) from None
        if not isinstance(progress, dict) or progress.get("format") != FORMAT or progress.get("version") != VERSION:
            raise ValueError(f"{what}: {display_name(self.progress_file)} is not a ttrv-edge checkpoint (version 1)")
        self._check_same_run(progress)
        snapshot = load_snapshot(self.directory / progress["weights"], what)
        try:
            load_lora_state(model, snapshot.lora)
        except (ValueError, RuntimeError) as error:
            raise ValueError(f"{what}: the checkpoint does not fit this model ({error})") from None
        _load_optimizer(optimizer, snapshot.optimizer, what)
        best = load_snapshot(self.directory / progress["best"], what) if progress.get("best") else None
        self._best_step = progress["guard"]["best_step"] if best is not None else None
        return ResumeState(
            next_step=int(progress["next_step"]),
            stopped=bool(progress["stopped"]),
            results=progress["results"],
            guard=progress["guard"],
            best=best,
            weights=snapshot,
        )

    def _check_same_run(self, progress: dict) -> None:
        ours, theirs = json.loads(json.dumps(self.config.to_dict())), progress.get("config", {})  # tuples -> lists
        for key in sorted(set(ours) | set(theirs)):
            if key not in RESUME_IGNORED_OPTIONS and ours.get(key) != theirs.get(key):
                raise ValueError(
                    f"--resume: the checkpoint in {display_name(self.directory)} was made with other options "
                    f"({key}: {theirs.get(key)!r} there, {ours.get(key)!r} now)"
                )
        if progress.get("items") != self.labels:
            raise ValueError(f"--resume: the checkpoint in {display_name(self.directory)} was made on other inputs")
