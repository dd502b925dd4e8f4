"""The `ttrv-edge` command: JSON output, saved adapter, one-line errors."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ttrv_edge.cli import main

ARGS = ["--rollouts", "4", "--steps", "2", "--max-new-tokens", "4", "--seed", "1"]


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_adapt_json_end_to_end(capsys, tiny_idefics3_dir, test_image, tmp_path):
    image = tmp_path / "photo.jpg"
    test_image.save(image)
    out = tmp_path / "adapter"
    code, stdout, _ = _run(
        capsys,
        "adapt",
        str(image),
        "--model",
        str(tiny_idefics3_dir),
        "--choices",
        "circle,square,triangle",
        "--question",
        "Which shape?",
        "--out",
        str(out),
        "--json",
        *ARGS,
    )
    assert code == 0
    report = json.loads(stdout)  # exactly one JSON document on stdout
    assert set(report) >= {"model", "mode", "items", "adapter_dir", "seconds"}
    assert report["mode"] == "episodic" and report["adapter_dir"] == str(out)
    (item,) = report["items"]
    assert item["image"] == str(image) and item["choices"] == ["circle", "square", "triangle"]
    for phase in ("before", "after"):
        assert item[phase]["answer"] in (None, "A", "B", "C")
        options = {None: None, "A": "circle", "B": "square", "C": "triangle"}
        assert item[phase]["answer_text"] == options[item[phase]["answer"]]
        assert sum(item[phase]["distribution"].values()) == pytest.approx(1.0)
    assert 1 <= len(item["steps"]) <= 2
    assert set(item["steps"][0]) >= {"step", "mean_reward", "consensus", "loss", "seconds"}
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not list(out.glob("*.bin"))


def test_adapt_jsonl_is_transductive(capsys, tiny_idefics3_dir, test_image, tmp_path):
    test_image.save(tmp_path / "a.png")
    test_image.rotate(90).save(tmp_path / "b.png")
    lines = [
        {"image": "a.png", "question": "Which shape?", "choices": ["circle", "square"]},
        {"image": "b.png", "question": "How many?", "choices": "one,two,three"},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    code, stdout, _ = _run(
        capsys,
        "adapt",
        str(data),
        "--model",
        str(tiny_idefics3_dir),
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "o"),
        "--json",
        *ARGS,
    )
    assert code == 0
    report = json.loads(stdout)
    assert report["mode"] == "transductive"
    assert [i["question"] for i in report["items"]] == ["Which shape?", "How many?"]
    assert report["items"][1]["choices"] == ["one", "two", "three"]


def test_adapt_folder_prints_a_table(capsys, tiny_idefics3_dir, test_image, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    test_image.save(folder / "x.png")
    code, stdout, _ = _run(
        capsys,
        "adapt",
        str(folder),
        "--model",
        str(tiny_idefics3_dir),
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "o"),
        *ARGS,
    )
    assert code == 0 and "x.png" in stdout


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--rollouts", "0"], "--rollouts"),
        (["--rollouts", "many"], "--rollouts"),
        (["--lr", "-1"], "--lr"),
        (["--temperature", "0"], "--temperature"),
        (["--choices", "cat"], "--choices"),
        (["--backend", "cuda"], "--backend"),
        (["--reward", "best"], "--reward"),
        (["--labels", "/no/such/labels.txt"], "--labels"),
        (["--model", "/no/such/model"], "--model"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_arguments_give_one_line_errors(capsys, test_image, tmp_path, extra, option):
    image = tmp_path / "i.png"
    test_image.save(image)
    code, stdout, stderr = _run(capsys, "adapt", str(image), *extra)
    assert code != 0
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:") and option in lines[0]
    assert "Traceback" not in stderr


def test_missing_image_names_the_file(capsys, tmp_path):
    code, _, stderr = _run(capsys, "adapt", str(tmp_path / "nope.jpg"))
    assert code == 2 and "nope.jpg" in stderr and len(stderr.strip().splitlines()) == 1


def test_console_script_help_and_error_exit_code():
    helped = subprocess.run([sys.executable, "-m", "ttrv_edge", "adapt", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--rollouts" in helped.stdout and "--json" in helped.stdout
    failed = subprocess.run(
        [sys.executable, "-m", "ttrv_edge", "adapt", "x.jpg", "--steps", "-3"], capture_output=True, text=True
    )
    assert failed.returncode == 2 and "Traceback" not in failed.stderr and "--steps" in failed.stderr


# ------------------------------------------------------------------------------------------------ generated options


def _help_lines(capsys, monkeypatch, *argv) -> list[str]:
    """The rendered help of a command, one option per line (a terminal wide enough that nothing wraps)."""
    monkeypatch.setenv("COLUMNS", "1000")
    code, stdout, _ = _run(capsys, *argv, "--help")
    assert code == 0
    return [" ".join(line.strip("│ ").split()) for line in stdout.splitlines()]


def _shown_default(value) -> str:
    if value is None:
        return "(None)"
    return str(value)


def test_every_config_field_is_an_adapt_option_with_its_help_and_default(capsys, monkeypatch):
    """Also for fields added to TTRVConfig later: the options are generated from the dataclass."""
    from dataclasses import fields

    from ttrv_edge.config import CHOICES, TTRVConfig

    lines = _help_lines(capsys, monkeypatch, "adapt")
    for field in fields(TTRVConfig):
        flag = "--" + field.name.replace("_", "-")
        (line,) = [line for line in lines if line.startswith(flag + " ")]
        if isinstance(field.default, bool):
            assert line.startswith(f"{flag} --no-{flag[2:]} ")
            shown = flag[2:] if field.default else f"no-{flag[2:]}"
        else:
            shown = _shown_default(field.default)
        assert line.endswith(f"[default: {shown}]"), line
        assert " ".join(TTRVConfig.help_text(field.name).split()) in line
        if field.name in CHOICES:
            assert "<" + "|".join(CHOICES[field.name]) + ">" in line
    for flag in ("--model", "--question", "--choices", "--labels", "--numeric", "--adapter", "--out", "--overwrite"):
        assert any(line.startswith(flag + " ") for line in lines), flag
    for flag in ("--trust-remote-code", "--checkpoint-dir", "--resume", "--allow-outside-root", "--json"):
        assert any(line.startswith(flag + " ") for line in lines), flag


def _captured_config(monkeypatch, capsys, test_image, tmp_path, *extra):
    from ttrv_edge.api import TTRVModel

    seen = {}

    def fake_load(model, config, **kwargs):
        seen["config"] = config
        raise ValueError("stop after the config")

    monkeypatch.setattr(TTRVModel, "from_pretrained", fake_load)
    image = tmp_path / "i.png"
    test_image.save(image)
    code, _, stderr = _run(capsys, "adapt", str(image), "--out", str(tmp_path / "o"), *extra)
    assert code == 2 and "stop after the config" in stderr
    return seen["config"]


def test_non_default_config_options_reach_the_config(monkeypatch, capsys, test_image, tmp_path):
    from ttrv_edge.config import TTRVConfig

    config = _captured_config(
        monkeypatch,
        capsys,
        test_image,
        tmp_path,
        *("--batch-size", "2", "--baseline", "batch", "--entropy-signal", "self-certainty", "--keep"),
        *("--lora-alpha", "4", "--memory-budget", "1GB", "--no-collapse-guard", "--eps-high", "0.3"),
    )
    changed = {"batch_size": 2, "baseline": "batch", "entropy_signal": "self-certainty", "keep": True}
    changed |= {"lora_alpha": 4, "memory_budget": "1GB", "collapse_guard": False, "eps_high": 0.3}
    assert config == TTRVConfig(**changed)
    assert _captured_config(monkeypatch, capsys, test_image, tmp_path) == TTRVConfig()  # defaults: the dataclass's


def test_eval_takes_the_config_options_with_the_benchmark_defaults(capsys, monkeypatch):
    from ttrv_edge.demo import BENCH_EPOCHS, BENCH_LR
    from ttrv_edge.demo.shift import CORRUPTIONS

    lines = _help_lines(capsys, monkeypatch, "eval")
    corruption = next(line for line in lines if line.startswith("--corruption "))
    assert all(name in corruption for name in CORRUPTIONS)
    assert next(line for line in lines if line.startswith("--epochs ")).endswith(f"[default: {BENCH_EPOCHS}]")
    assert next(line for line in lines if line.startswith("--lr ")).endswith(f"[default: {BENCH_LR}]")
    assert any(line.startswith("--entropy-signal ") for line in lines)


# ------------------------------------------------------------------------------------------------ newcomer fixes


def test_bare_command_prints_the_help_and_version(capsys):
    code, stdout, stderr = _run(capsys)
    assert code == 0 and "error" not in stderr and "Usage: ttrv-edge" in stdout and "adapt" in stdout
    code, stdout, _ = _run(capsys, "--version")
    from ttrv_edge import __version__

    assert code == 0 and stdout.strip() == f"ttrv-edge {__version__}"
    listed = subprocess.run([sys.executable, "-m", "ttrv_edge", "--help"], capture_output=True, text=True)
    assert listed.returncode == 0
    assert all(name in listed.stdout for name in ("adapt", "demo-train", "eval", "export", "answer"))


def test_out_that_is_not_an_adapter_folder_is_refused_before_loading(capsys, test_image, tmp_path):
    image = tmp_path / "i.png"
    test_image.save(image)
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.txt").write_text("keep me")
    code, stdout, stderr = _run(capsys, "adapt", str(image), "--out", str(folder), "--model", "/no/such/model")
    assert code == 2 and stdout == "" and "--out" in stderr and "--overwrite" in stderr
    assert len(stderr.strip().splitlines()) == 1 and (folder / "thesis.txt").read_text() == "keep me"


def test_adapter_folder_records_the_base_model_name_and_a_card(capsys, tiny_idefics3_dir, test_image, tmp_path):
    image = tmp_path / "photo.png"
    test_image.save(image)
    out = tmp_path / "adapter"
    argv = ["adapt", str(image), "--model", str(tiny_idefics3_dir), "--out", str(out), "--choices", "a,b", *ARGS]
    code, stdout, stderr = _run(capsys, *argv)
    assert code == 0 and "no --question given" in stderr and "replaced" not in stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_idefics3_dir.name  # not the absolute path it was loaded from
    card = (out / "README.md").read_text()
    assert tiny_idefics3_dir.name in card and "rollouts=4" in card and "TTRVModel.from_pretrained" in card
    assert str(tiny_idefics3_dir) not in card
    code, _, stderr = _run(capsys, *argv, "--question", "Which letter?")
    assert code == 0 and f"replaced the adapter saved before in {out}" in stderr and "no --question" not in stderr


def test_table_shows_the_chosen_option_beside_its_letter(capsys):
    from ttrv_edge.cli import _print_table

    def prediction(answer):
        return {"answer": answer, "distribution": {"C": 0.75, "<none>": 0.25}, "majority": "C", "text": "x"}

    item = {"image": "a.png", "choices": ["red", "green", "blue"], "before": prediction(None), "after": prediction("C")}
    item["steps"] = [{"mean_reward": -0.2, "updated": True}]
    _print_table({"mode": "episodic", "seconds": 1.0, "items": [item], "adapter_dir": "o"})
    stdout = capsys.readouterr().out
    assert "C (blue)" in stdout and "no answer" in stdout


def test_demo_train_never_writes_into_the_package_unless_asked(capsys, monkeypatch, tmp_path):
    import ttrv_edge.demo.train as demo_train

    written = []
    monkeypatch.setattr(demo_train, "train", lambda out, **kwargs: written.append(Path(out)) or {"steps": 0})
    monkeypatch.chdir(tmp_path)
    assert main(["demo-train", "--steps", "1"]) == 0
    assert written == [Path("demo-model")] and json.loads(capsys.readouterr().out)["out"] == "demo-model"
    code, _, stderr = _run(capsys, "demo-train", "--out", str(demo_train.MODEL_DIR))
    assert code == 2 and "--overwrite-packaged" in stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    code, _, stderr = _run(capsys, "demo-train", "--out", "mine")
    assert code == 2 and "not a model folder" in stderr
    assert main(["demo-train", "--overwrite-packaged"]) == 0
    assert written == [Path("demo-model"), demo_train.MODEL_DIR]


def test_offline_hub_id_fails_fast_with_how_to_get_the_model(capsys, monkeypatch, test_image, tmp_path):
    image = tmp_path / "i.png"
    test_image.save(image)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    code, stdout, stderr = _run(capsys, "adapt", str(image), "--model", "nobody-ttrv/not-a-model", "--out", "o")
    assert time.perf_counter() - started < 5
    assert code == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1, stderr
    assert "huggingface-cli download nobody-ttrv/not-a-model --local-dir DIR" in stderr
    assert "--model" in stderr and "snapshot_download" in stderr and "HF_HUB_OFFLINE" in stderr


def test_unreachable_hub_uses_the_cache_or_fails_in_one_line(monkeypatch, tmp_path):
    from ttrv_edge.models import hub
    from ttrv_edge.models.loading import resolve_model_path

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=hub.CONNECT_SECONDS: False)
    with pytest.raises(ValueError, match="cannot be reached.*huggingface-cli download nobody-ttrv/x --local-dir"):
        resolve_model_path("nobody-ttrv/x")
    snapshot = tmp_path / "models--nobody-ttrv--x" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--nobody-ttrv--x" / "refs").mkdir()
    (tmp_path / "models--nobody-ttrv--x" / "refs" / "main").write_text("abc123")
    assert Path(hub.cached_snapshot("nobody-ttrv/x", cache_dir=str(tmp_path))) == snapshot
    monkeypatch.setattr(hub, "cached_snapshot", lambda repo_id: str(snapshot))
    assert resolve_model_path("nobody-ttrv/x") == str(snapshot)  # offline: the cached copy, no network call


def test_adapt_help_lists_every_tiny_model(capsys, monkeypatch):
    from ttrv_edge.models.families import TINY_NAMES

    text = " ".join(_help_lines(capsys, monkeypatch, "adapt"))
    listed = [name for name in TINY_NAMES if name != "tiny-qwen2_vl"]  # the old spelling stays a silent alias
    assert all(name in text for name in listed), [name for name in listed if name not in text]
    assert "doctor" in text
