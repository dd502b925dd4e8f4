"""The `ttrv-edge` command: JSON output, saved adapter, one-line errors."""

import json
import subprocess
import sys

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
