"""Safe files: atomic writes, adapter validation, and a transductive run that resumes to the exact same adapter."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ttrv_edge.api import TTRVModel
from ttrv_edge.io import checkpoints
from ttrv_edge.io.answers import Question
from ttrv_edge.io.checkpoints import atomic_write_bytes, check_adapter_dir, save_adapter
from ttrv_edge.io.inputs import Item
from ttrv_edge.models import lora_state

FAST = dict(rollouts=6, max_new_tokens=4, lr=5e-2, seed=7)


@dataclass(frozen=True)
class SignalQuestion(Question):
    """Answers depend on the sampled text, so groups carry signal and the run depends on the weights."""

    calls: list = field(default_factory=list, compare=False)

    def extract(self, text: str) -> str | None:
        return "xyz"[len(text) % 3]


# ------------------------------------------------------------------------------------------------ atomic writes


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def crash(fd):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_interrupted_adapter_save_leaves_the_good_adapter(tmp_path, monkeypatch, tiny_idefics3_dir):
    api = TTRVModel.from_pretrained(str(tiny_idefics3_dir), **FAST)
    out = save_adapter(api.vlm.model, tmp_path / "adapter")
    good = {p.name: p.read_bytes() for p in out.iterdir()}
    with torch.no_grad():
        for name, p in api.vlm.model.named_parameters():
            if "lora_B" in name:
                p.add_(1.0)

    def half_written(self, directory, **kwargs):  # peft dies half-way through its own write
        (Path(directory) / "adapter_model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(type(api.vlm.model), "save_pretrained", half_written)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(api.vlm.model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # the staging folder is gone
    check_adapter_dir(out)


def test_saved_adapter_round_trips_exactly(tmp_path, tiny_idefics3_dir):
    api = TTRVModel.from_pretrained(str(tiny_idefics3_dir), **FAST)
    with torch.no_grad():
        for name, p in api.vlm.model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    out = api.save_adapter(tmp_path / "a")
    assert not list(out.glob("*.bin")) and (out / "adapter_model.safetensors").is_file()
    api.save_adapter(out)  # over an existing folder: files replaced one by one
    loaded = TTRVModel.from_pretrained(str(tiny_idefics3_dir), adapter=str(out), **FAST)
    ours, theirs = lora_state(api.vlm.model), lora_state(loaded.vlm.model)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# ------------------------------------------------------------------------------------------------ bad adapters


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory, tiny_idefics3_dir):
    api = TTRVModel.from_pretrained(str(tiny_idefics3_dir), **FAST)
    return api.save_adapter(tmp_path_factory.mktemp("good") / "adapter")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def _truncate(d: Path):
    weights = d / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])


def _pickle_only(d: Path):
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")


def _not_lora(d: Path):
    config = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))


def _bad_json(d: Path):
    (d / "adapter_config.json").write_text("{not json")


def _nan(d: Path):
    tensors = load_file(d / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, d / "adapter_model.safetensors")


def _extra_tensor(d: Path):
    tensors = load_file(d / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
    save_file(tensors, d / "adapter_model.safetensors")


def _renamed_layers(d: Path):  # an adapter of another architecture: its layer names match nothing here
    tensors = load_file(d / "adapter_model.safetensors")
    renamed = {k.replace("text_model", "language_model"): v for k, v in tensors.items()}
    save_file(renamed, d / "adapter_model.safetensors")


def _wrong_rank(d: Path):  # the config says rank 4, the tensors are rank 8
    config = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))


BAD_ADAPTERS = {
    "truncated-safetensors": (_truncate, "not a readable safetensors file"),
    "pickle-only": (_pickle_only, "a pickle"),
    "not-lora": (_not_lora, "not a LoRA adapter"),
    "bad-config-json": (_bad_json, "not valid JSON"),
    "nan-weights": (_nan, "non-finite"),
    "non-lora-tensor": (_extra_tensor, "non-LoRA tensors"),
    "foreign-layer-names": (_renamed_layers, "does not fit this model"),
    "wrong-rank": (_wrong_rank, "does not fit this model"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapter_is_one_clear_error(case, good_adapter, tmp_path, monkeypatch, tiny_idefics3_dir):
    damage, message = BAD_ADAPTERS[case]
    bad = _copy(good_adapter, tmp_path / case)
    damage(bad)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ValueError) as raised:
        TTRVModel.from_pretrained(str(tiny_idefics3_dir), adapter=str(bad), **FAST)
    text = str(raised.value)
    assert text.startswith("--adapter: ") and str(bad) in text and message in text and "\n" not in text


def test_cli_bad_adapter_exits_2_with_one_line(capsys, good_adapter, tmp_path, tiny_idefics3_dir, test_image):
    from ttrv_edge.cli import main

    bad = _copy(good_adapter, tmp_path / "bad")
    _truncate(bad)
    image = tmp_path / "i.png"
    test_image.save(image)
    out = tmp_path / "out"  # a folder holding other files is refused as --out before the adapter is checked
    code = main(["adapt", str(image), "--model", str(tiny_idefics3_dir), "--adapter", str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: --adapter: ")


# ------------------------------------------------------------------------------------------------ resume


class Interrupted(Exception):
    pass


def _items(folder: Path, test_image, n=3) -> list[Item]:
    folder.mkdir(exist_ok=True)
    items = []
    for k in range(n):
        test_image.rotate(90 * k).save(folder / f"{k}.png")
        items.append(Item(str(folder / f"{k}.png"), SignalQuestion("What?")))
    return items


def _run(tiny_dir, test_image, checkpoint_dir, *, resume=False, stop_after=None, crash_saving=None):
    """One transductive run (3 inputs x 2 epochs = 6 steps, a guard check every 2); optionally interrupted after
    ``stop_after`` steps, or while writing the progress file of checkpoint number ``crash_saving``."""
    api = TTRVModel.from_pretrained(str(tiny_dir), epochs=2, collapse_check_every=2, **FAST)
    steps, saves = [], []
    step = api.loop.step

    def counting_step(*args, **kwargs):
        if stop_after is not None and len(steps) == stop_after:
            raise Interrupted
        steps.append(1)
        return step(*args, **kwargs)

    write = checkpoints.atomic_write_bytes

    def crashing_write(path, data):
        if Path(path).name == "progress.json":
            saves.append(1)
            if len(saves) == crash_saving:
                raise Interrupted
        return write(path, data)

    api.loop.step = counting_step
    original, checkpoints.atomic_write_bytes = checkpoints.atomic_write_bytes, crashing_write
    try:
        items = _items(Path(checkpoint_dir).parent / "images", test_image)
        results = api.adapt_dataset(items, checkpoint_dir=checkpoint_dir, resume=resume)
    finally:
        checkpoints.atomic_write_bytes = original
    return api, results, len(steps)


def _comparable(results):
    rows = [r.to_dict() for r in results]
    for row in rows:
        row["image"] = Path(row["image"]).name  # the runs live in different folders
        for s in row["steps"]:
            s.pop("seconds")
    return rows


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_idefics3_dir):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((6, 6, 30, 30), fill=(220, 30, 30))
    reference, expected, steps = _run(tiny_idefics3_dir, image, tmp_path_factory.mktemp("reference") / "ck")
    assert steps == 6 and reference.run_info["resumed_from_step"] is None
    return image, reference, expected


@pytest.mark.parametrize("interruption", ["after-step-4", "while-saving-checkpoint-5"])
def test_interrupted_run_resumes_to_the_same_adapter(tmp_path, tiny_idefics3_dir, reference_run, interruption):
    test_image, reference, expected = reference_run
    interrupted = tmp_path / "cut"
    with pytest.raises(Interrupted):
        if interruption == "after-step-4":
            _run(tiny_idefics3_dir, test_image, interrupted, stop_after=4)
        else:
            _run(tiny_idefics3_dir, test_image, interrupted, crash_saving=5)  # step 5's tensors exist, its JSON not
    resumed, results, steps = _run(tiny_idefics3_dir, test_image, interrupted, resume=True)
    assert resumed.run_info["resumed_from_step"] == 4 and steps == 2
    ours, theirs = lora_state(resumed.vlm.model), lora_state(reference.vlm.model)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert _comparable(results) == _comparable(expected)
    assert sum(s["updated"] for r in _comparable(results) for s in r["steps"]) >= 2  # the weights did move
    assert resumed.run_info["diversity"] == reference.run_info["diversity"]
    files = sorted(p.name for p in interrupted.iterdir())  # stale step files and temporaries are gone
    assert (
        len(files) == 3 and files[0].startswith("best-") and files[1:] == ["progress.json", "step-000006.safetensors"]
    )


def test_resume_refuses_other_options_and_fresh_runs_refuse_old_checkpoints(tmp_path, tiny_idefics3_dir, test_image):
    folder = tmp_path / "ck"
    _run(tiny_idefics3_dir, test_image, folder)
    with pytest.raises(ValueError, match="--checkpoint-dir: .* holds the checkpoint of an earlier run"):
        _run(tiny_idefics3_dir, test_image, folder)
    api = TTRVModel.from_pretrained(str(tiny_idefics3_dir), epochs=2, collapse_check_every=2, **{**FAST, "lr": 0.1})
    with pytest.raises(ValueError, match=r"--resume: .*other options \(lr: 0.05 there, 0.1 now\)"):
        api.adapt_dataset(_items(tmp_path / "images", test_image), checkpoint_dir=folder, resume=True)
    with pytest.raises(ValueError, match="--resume: .*other inputs"):
        api2 = TTRVModel.from_pretrained(str(tiny_idefics3_dir), epochs=2, collapse_check_every=2, **FAST)
        api2.adapt_dataset(_items(tmp_path / "images", test_image, n=2), checkpoint_dir=folder, resume=True)
    (folder / "progress.json").write_text("{truncated")
    with pytest.raises(ValueError, match="progress.json is unreadable"):
        _run(tiny_idefics3_dir, test_image, folder, resume=True)


def test_cli_resume_needs_a_checkpoint_dir(capsys, tmp_path, test_image):
    from ttrv_edge.cli import main

    test_image.save(tmp_path / "a.png")
    code = main(["adapt", str(tmp_path), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "--resume needs --checkpoint-dir" in err and len(err.strip().splitlines()) == 1
