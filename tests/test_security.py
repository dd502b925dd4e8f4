"""Untrusted models and data: remote code never runs without --trust-remote-code, data paths stay in their root,
and the package itself never unpickles or enables remote code (a static check of its source)."""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import pytest

import ttrv_edge
from ttrv_edge.api import TTRVModel
from ttrv_edge.cli import main

PACKAGE = Path(ttrv_edge.__file__).parent
EVIL_CODE = """import pathlib
pathlib.Path({marker!r}).write_text("remote code ran")
from transformers import PretrainedConfig, PreTrainedModel


class EvilConfig(PretrainedConfig):
    model_type = "evil_vlm"


class EvilModel(PreTrainedModel):
    config_class = EvilConfig
"""


def _evil_model(folder: Path, marker: Path, model_type: str = "evil_vlm", base: Path | None = None) -> Path:
    """A model folder whose config asks transformers to import its own code, which would write ``marker``."""
    if base is not None:
        shutil.copytree(base, folder)
    folder.mkdir(exist_ok=True)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {"architectures": ["EvilModel"]}
    config.update(
        model_type=model_type,
        auto_map={
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForImageTextToText": "modeling_evil.EvilModel",
        },
    )
    config_file.write_text(json.dumps(config))
    for module in ("configuration_evil", "modeling_evil"):
        (folder / f"{module}.py").write_text(EVIL_CODE.format(marker=str(marker)))
    return folder


def _one_line_error(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return code, err


def test_remote_code_model_fails_cleanly_without_the_flag(capsys, tmp_path, test_image):
    marker = tmp_path / "MARKER"
    model = _evil_model(tmp_path / "evil", marker)
    test_image.save(tmp_path / "i.png")
    code, err = _one_line_error(capsys, "adapt", tmp_path / "i.png", "--model", model)
    assert code == 2 and err.startswith("error: --model: ") and "--trust-remote-code" in err
    assert not marker.exists()


def test_known_architecture_with_auto_map_uses_the_library_code(tmp_path, tiny_idefics3_dir):
    """A real model folder that also ships code: loaded with transformers' own class, its code never imported."""
    marker = tmp_path / "MARKER"
    model = _evil_model(tmp_path / "tiny-with-code", marker, model_type="idefics3", base=Path(tiny_idefics3_dir))
    api = TTRVModel.from_pretrained(str(model), rollouts=2)
    assert type(api.vlm.model.get_base_model()).__module__.startswith("transformers.")
    assert not marker.exists()


def test_remote_code_runs_only_with_the_flag(tmp_path, monkeypatch):
    """The control that makes the tests above meaningful: with the flag the folder's code does run. transformers'
    module cache is pointed at tmp_path so nothing is written outside it."""
    import transformers.dynamic_module_utils as dynamic

    marker = tmp_path / "MARKER"
    model = _evil_model(tmp_path / "evil", marker)
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    with pytest.raises(ValueError, match="--model"):  # the evil model has no weights: it fails after its code ran
        TTRVModel.from_pretrained(str(model), trust_remote_code=True)
    assert marker.read_text() == "remote code ran"


def test_jsonl_escape_needs_allow_outside_root(capsys, tmp_path, tiny_idefics3_dir, test_image):
    root = tmp_path / "data"
    root.mkdir()
    test_image.save(root / "in.png")
    test_image.save(tmp_path / "out.png")
    (root / "set.jsonl").write_text('{"image": "in.png"}\n{"image": "../out.png"}\n')
    argv = ["adapt", root / "set.jsonl", "--model", tiny_idefics3_dir, "--out", tmp_path / "o", "--json"]
    argv += ["--rollouts", "2", "--epochs", "1", "--max-new-tokens", "2"]
    assert main([str(a) for a in argv]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["items"]) == 1 and "outside the data root" in report["skipped"][0]["reason"]
    assert main([str(a) for a in argv] + ["--allow-outside-root"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["items"]) == 2 and report["skipped"] == []


# ------------------------------------------------------------------------------------------------ static checks

UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _python_files():
    roots = [PACKAGE]
    kernels = PACKAGE / "kernels"
    if not kernels.exists():  # installed from the repo's kernels/ folder (package-dir)
        import ttrv_edge.kernels as k

        roots.append(Path(k.__file__).parent)
    return sorted({f for root in roots for f in root.rglob("*.py")})


def _problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"imports {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        keywords = {k.arg: k.value for k in node.keywords}
        if name == "load" and isinstance(func, ast.Attribute) and getattr(func.value, "id", "") == "torch":
            value = keywords.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
        if name in ("eval", "exec") and isinstance(func, ast.Name):
            found.append(f"line {node.lineno}: {name}()")
        value = keywords.get("trust_remote_code")
        if isinstance(value, ast.Constant) and value.value is True:
            found.append(f"line {node.lineno}: trust_remote_code=True hard-coded")
        if name == "save_pretrained" and isinstance(keywords.get("safe_serialization"), ast.Constant):
            if keywords["safe_serialization"].value is False:
                found.append(f"line {node.lineno}: save_pretrained(safe_serialization=False)")
    return found


def test_the_checker_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport torch\ntorch.load('x')\ntorch.load('y', weights_only=False)\n"
        "f(trust_remote_code=True)\neval('1')\nm.save_pretrained('d', safe_serialization=False)\n"
    )
    assert len(_problems(bad)) == 6


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: p.name)
def test_package_source_never_unpickles_or_trusts_remote_code(path):
    assert _problems(path) == []
