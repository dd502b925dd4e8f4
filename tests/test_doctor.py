"""`ttrv-edge doctor`: the report of every tiny family checked against the model itself (parameters summed over the
modules, LoRA counts against a LoRA-attached load, image tokens against the processor and the model's forward, the
planner's verdicts against its numbers), broken folders as one-line errors, the table and --json."""

import json
import shutil

import pytest
import torch

from ttrv_edge.cli import main
from ttrv_edge.doctor import PROBE_SIZES, diagnose, rows
from ttrv_edge.doctor.checks import probe_image
from ttrv_edge.io.answers import DEFAULT_QUESTION, Question
from ttrv_edge.models.families import FAMILIES


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _unique_count(params) -> int:
    return sum({id(p): p.numel() for p in params}.values())


@pytest.fixture(scope="module")
def reports(tiny_family_dir):
    """The doctor's report of each tiny family (built once per module)."""
    cache = {}

    def get(model_type):
        if model_type not in cache:
            cache[model_type] = diagnose(str(tiny_family_dir(model_type)))
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_doctor_reports_each_family(model_type, reports, tiny_family_dir):
    from ttrv_edge.models import load_vlm, vision_tower

    report = reports(model_type)
    assert report["usable"] and report["problems"] == []
    assert report["family"] == {"model_type": model_type, "name": FAMILIES[model_type], "tested": True}
    assert report["export_supported"] is True and report["chat_template"] is True

    vlm = load_vlm(str(tiny_family_dir(model_type)))  # LoRA on the language model, as adapt loads it
    base = vlm.model.get_base_model()
    params = report["parameters"]
    frozen = [p for n, p in base.named_parameters() if "lora_" not in n]
    assert params["total"] == _unique_count(frozen)
    assert params["vision_tower"] == _unique_count(vision_tower(vlm.model).parameters()) > 0
    assert params["vision_tower"] + params["connector"] + params["language_model"] == params["total"]
    assert params["language_model"] > 0
    lora = [p for n, p in vlm.model.named_parameters() if "lora_" in n]
    assert report["lora"]["language"]["parameters"] == sum(p.numel() for p in lora)
    assert report["lora"]["language"]["modules"] * 2 == len(lora)  # lora_A and lora_B per module
    assert report["lora"]["vision"]["modules"] > 0 and report["lora"]["vision"]["parameters"] > 0

    # image tokens: counted in what the processor gives for the probe image, and the model's forward accepts them
    image = report["image_tokens"]
    inputs = vlm.prompt_inputs(probe_image(PROBE_SIZES[0]), Question(DEFAULT_QUESTION).prompt())
    assert image["per_image"] == int((inputs["input_ids"] == image["token_id"]).sum()) > 0
    assert image["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert image["at_sizes"]["{}x{}".format(*PROBE_SIZES[0])] == image["per_image"]
    assert image["depends_on_size"] == (len(set(image["at_sizes"].values())) > 1)
    with torch.no_grad():
        vlm.model(**inputs)  # raises when image features and image tokens do not match

    gen = report["generation"]["modelled"]
    assert gen["eos_token_ids"] == vlm.eos_token_ids and gen["suppressed_token_ids"] == vlm.suppress_token_ids
    assert report["generation"]["ignored"] == {}  # the builders save no sampling settings

    est = report["estimate"]
    cpu, gpu = est["cpu"], est["gpu"]
    assert est["rollouts"] == 8 and est["prompt_tokens"] == image["prompt_tokens"]
    assert cpu["peak_bytes"] > cpu["resident_bytes"] > cpu["weights_bytes"] > 0
    assert gpu["peak_bytes"] > gpu["resident_bytes"] == gpu["weights_bytes"] > 0
    assert gpu["weights_bytes"] < cpu["weights_bytes"]  # bf16 against fp32
    assert cpu["fits"] == (cpu["peak_bytes"] <= cpu["machine_memory_bytes"])
    assert gpu["fits"] == (gpu["peak_bytes"] <= gpu["budget_bytes"]) and gpu["fits"]  # a tiny model fits 6 GB
    assert cpu["sample_micro_batch"] == cpu["train_micro_batch"] == 8  # no CPU budget: all rollouts at once
    assert gpu["sample_micro_batch"] == gpu["train_micro_batch"] == 8


def test_gpu_verdict_follows_the_budget(reports, tiny_idefics3_dir):
    """A budget just under the N-row estimate gives smaller micro-batches; one under a single row does not fit."""
    full = reports("idefics3")["estimate"]["gpu"]
    tight = diagnose(str(tiny_idefics3_dir), gpu_budget=f"{full['peak_bytes'] - 1}B")["estimate"]["gpu"]
    assert tight["fits"] and tight["peak_bytes"] <= tight["budget_bytes"] < full["peak_bytes"]
    assert min(tight["sample_micro_batch"], tight["train_micro_batch"]) < 8
    none = diagnose(str(tiny_idefics3_dir), gpu_budget="64KB")["estimate"]["gpu"]
    assert not none["fits"] and "sample_micro_batch" not in none and none["peak_bytes"] > none["budget_bytes"]


def test_table_and_json(capsys, tiny_idefics3_dir):
    code, out, err = _run(capsys, "doctor", str(tiny_idefics3_dir), "--json")
    assert code == 0 and err == ""
    report = json.loads(out)  # exactly one JSON document
    assert report["usable"] and report["family"]["model_type"] == "idefics3"
    code, out, _ = _run(capsys, "doctor", str(tiny_idefics3_dir))
    assert code == 0
    for check, _finding in rows(report):
        assert check.strip() in out
    assert "Idefics3 (SmolVLM)" in out and "fits in" in out


def test_root_help_lists_doctor(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and "doctor" in out and "Check a model without adapting it" in out
    code, out, _ = _run(capsys, "doctor", "--help")
    assert code == 0 and "image tokens per image" in out and "--gpu-budget" in out


@pytest.mark.parametrize(
    "model_type, break_it",
    [
        ("idefics3", lambda d: (d / "processor_config.json").write_text('{"processor_class": ')),
        ("qwen2_vl", lambda d: (d / "tokenizer.json").unlink()),
    ],
    ids=["corrupt-processor-config", "no-tokenizer"],
)
def test_broken_processor_is_one_line(capsys, tiny_family_dir, tmp_path, model_type, break_it):
    folder = tmp_path / "model"
    shutil.copytree(tiny_family_dir(model_type), folder)
    break_it(folder)
    code, out, err = _run(capsys, "doctor", str(folder))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: doctor: cannot load the processor of {folder} (")


def test_missing_folder_and_unloadable_model(capsys, tiny_idefics3_dir, tmp_path):
    code, _, err = _run(capsys, "doctor", str(tmp_path / "nowhere"))
    assert code == 2 and err.startswith("error: doctor: ") and "--model" not in err and len(err.splitlines()) == 1
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_idefics3_dir, folder)
    (folder / "model.safetensors").unlink()
    code, _, err = _run(capsys, "doctor", str(folder))
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: doctor: cannot load {folder} as an image-text-to-text model")


def test_no_chat_template_is_reported_and_not_usable(capsys, tiny_idefics3_dir, tmp_path):
    folder = tmp_path / "no-template"
    shutil.copytree(tiny_idefics3_dir, folder)
    (folder / "chat_template.jinja").unlink()
    for name in ("tokenizer_config.json", "processor_config.json"):
        config = json.loads((folder / name).read_text())
        config.pop("chat_template", None)
        (folder / name).write_text(json.dumps(config))
    code, out, err = _run(capsys, "doctor", str(folder), "--json")
    assert code == 2 and len(err.splitlines()) == 1 and "no chat template" in err
    report = json.loads(out)
    assert report["chat_template"] is False and not report["usable"] and report["estimate"] is None


def test_unknown_model_type_is_not_tested(monkeypatch, tiny_idefics3_dir):
    monkeypatch.delitem(FAMILIES, "idefics3")  # as if it were a model_type ttrv-edge has no tests for
    report = diagnose(str(tiny_idefics3_dir))
    assert report["family"]["tested"] is False and report["usable"]
    assert dict(rows(report))["family"] == "model_type idefics3: not tested"
