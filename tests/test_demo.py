"""Tests of the bundled demo: scene generator, corruptions, the packaged model, one benchmark condition."""

import json
import math

import numpy as np
import pytest

from ttrv_edge.demo.scenes import COLOURS, COUNT_WORDS, SHAPES, SceneObject, draw_scene, make_scene
from ttrv_edge.demo.shift import CORRUPTIONS, corrupt
from ttrv_edge.io.answers import LETTERS


def test_scenes_are_deterministic_from_the_seed():
    for seed in (0, 17, 123456):
        a, b = make_scene(seed), make_scene(seed)
        assert a == b
        assert np.array_equal(np.asarray(a.image()), np.asarray(b.image()))
    assert make_scene(1).image().tobytes() != make_scene(2).image().tobytes()


def test_answers_match_the_scene_content():
    kinds = set()
    for seed in range(300):
        scene = make_scene(seed)
        kinds.add(scene.kind)
        assert len(scene.choices) == 4 and len(set(scene.choices)) == 4
        word = scene.choices[LETTERS.index(scene.answer)]
        big = scene.largest
        expected = {"shape": big.shape, "colour": big.colour, "count": COUNT_WORDS[len(scene.objects) - 1]}[scene.kind]
        assert word == expected
        assert scene.question.extract(scene.target) == scene.answer  # the training target reads as the answer
        others = [o.radius for o in scene.objects if o is not big]
        assert all(big.radius >= 1.29 * r for r in others)  # "the largest" is unambiguous
        for i, o in enumerate(scene.objects):  # no two objects overlap
            for p in scene.objects[i + 1 :]:
                assert math.hypot(o.cx - p.cx, o.cy - p.cy) > o.radius + p.radius
    assert kinds == {"shape", "colour", "count"}


def test_drawn_pixels_show_the_object_colour():
    for shape in SHAPES:
        image = draw_scene([SceneObject(shape, "blue", 32.0, 32.0, 12.0)], ("flat", (128, 128, 128), (0, 0, 0)))
        assert image.size == (64, 64)
        assert image.getpixel((32, 32)) == COLOURS["blue"]
        assert image.getpixel((1, 1)) == (128, 128, 128)
    with pytest.raises(ValueError, match="kind"):
        make_scene(0, kind="size")


def test_unshuffled_choices_follow_the_pool_order():
    scene = make_scene(5, kind="shape", shuffle=False)
    assert list(scene.choices) == sorted(scene.choices, key=SHAPES.index)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_corruption_changes_the_image_and_keeps_its_size(name):
    image = make_scene(3).image()
    clean = np.asarray(image, dtype=np.int16)
    diffs = []
    for severity in (1, 5):
        out = corrupt(image, name, severity, seed=3)
        assert out.size == image.size and out.mode == "RGB"
        diffs.append(np.abs(np.asarray(out, dtype=np.int16) - clean).mean())
    assert diffs[0] > 0.1 and diffs[1] > diffs[0], (name, diffs)  # changed, and more at the higher severity
    assert np.array_equal(np.asarray(corrupt(image, name, 3, seed=3)), np.asarray(corrupt(image, name, 3, seed=3)))
    with pytest.raises(ValueError, match="--severity"):
        corrupt(image, name, 6)


def test_unknown_corruption_is_a_value_error():
    with pytest.raises(ValueError, match="--corruption"):
        corrupt(make_scene(0).image(), "fog", 1)


@pytest.fixture(scope="module")
def demo_loop():
    from ttrv_edge.api import TTRVModel

    return TTRVModel.from_pretrained(
        "demo", rollouts=4, views=1, epochs=1, batch_size=2, max_new_tokens=8, steps=1
    ).loop


def test_packaged_model_answers_clean_scenes(demo_loop):
    from ttrv_edge.demo.eval import summarise

    scenes = [make_scene(seed) for seed in range(32)]  # all three question kinds
    assert {s.kind for s in scenes} == {"shape", "colour", "count"}
    items = [demo_loop.prepare(f"s{i}", s.image(), s.question) for i, s in enumerate(scenes)]
    predictions = [demo_loop.predict(item, seed=i) for i, item in enumerate(items)]
    # the shipped model answers 0.918 of the 256 clean benchmark scenes greedily (README); chance is 0.25
    assert summarise(predictions, [s.answer for s in scenes])["greedy"] >= 0.8


def test_eval_runs_one_condition_before_and_after(demo_loop):
    from ttrv_edge.demo.eval import evaluate

    before = {n: p.detach().clone() for n, p in demo_loop.vlm.model.named_parameters() if "lora_" in n}
    result = evaluate(demo_loop, "blur", 3, "ttrv", n=4)
    assert result["n"] == 4 and set(result["before"]) >= {"greedy", "majority", "sampled", "entropy"}
    assert result["updates"] > 0, "TTRV never updated: 'after' would just repeat 'before'"
    assert result["after"]["entropy"] != result["before"]["entropy"], "'after' does not reflect the adapted model"
    after = {n: p for n, p in demo_loop.vlm.model.named_parameters() if "lora_" in n}
    assert all(np.array_equal(before[n].numpy(), after[n].detach().numpy()) for n in before)  # reset afterwards
    with pytest.raises(ValueError, match="--method"):
        evaluate(demo_loop, "blur", 3, "magic", n=1)


def test_cli_eval_prints_one_json_document(capsys):
    from ttrv_edge.cli import main

    code = main(["eval", "--corruption", "contrast", "--severity", "2", "--n", "2", "--rollouts", "2", "--json"])
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert record["corruption"] == "contrast" and record["n"] == 2 and record["method"] == "base"


def test_sincos_positions_give_every_patch_a_distinct_unit_scale_code():
    from ttrv_edge.demo.train import sincos_positions

    table = sincos_positions(8, 128)
    assert table.shape == (64, 128)
    distances = np.linalg.norm(table.numpy()[:, None] - table.numpy()[None], axis=-1)
    assert distances[~np.eye(64, dtype=bool)].min() > 0.1  # no two patches share a position code
    assert 0.5 < float(table.pow(2).mean().sqrt()) < 1.0  # unit-scale, not N(0, 0.02)


def test_train_runs_both_phases_and_saves_a_loadable_model(tmp_path):
    from transformers import AutoModelForImageTextToText

    from ttrv_edge.demo.train import sincos_positions, train

    out = tmp_path / "demo"
    lines = []
    summary = train(
        out,
        steps=2,
        vision_steps=2,
        batch_size=2,
        vision_batch_size=2,
        hidden=32,
        layers=1,
        pool_size=8,
        eval_every=2,
        threads=1,
        log=lines.append,
    )
    assert summary["steps"] == 2 and summary["recipe"]["vision_steps"] == 2
    assert any(line.startswith("VAL after vision warm-up") for line in lines)
    assert json.loads((out / "train_log.json").read_text())["history"][0]["step"] == 2
    model = AutoModelForImageTextToText.from_pretrained(out)
    positions = model.model.vision_model.embeddings.position_embedding.weight.float()
    # trained for 4 steps from the sin-cos start: still close to it, far from the N(0, 0.02) default
    assert float((positions.detach() - sincos_positions(8, 32)).abs().max()) < 0.05


def test_train_rejects_bad_options_before_building_anything(tmp_path):
    from ttrv_edge.demo.train import train

    with pytest.raises(ValueError, match="--smoothing"):
        train(tmp_path / "x", smoothing=1.5)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.building").exists()
