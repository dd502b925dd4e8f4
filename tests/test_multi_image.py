"""Multi-image inputs: a JSONL line or an API call may carry several images; prompts hold one placeholder per image,
the sampler and the loss score the same tokens (log-prob gap), views transform every image of an input."""

from __future__ import annotations

import json

import pytest
from helpers import SignalQuestion
from PIL import Image, ImageDraw

from ttrv_edge.io.answers import Question
from ttrv_edge.io.images import MAX_IMAGES, image_label, load_images
from ttrv_edge.io.inputs import read_jsonl
from ttrv_edge.rl.views import load_rgb, make_views

FAST = dict(rollouts=8, max_new_tokens=4, lr=5e-2, seed=3)
QUESTION = Question("Which colour is in the second picture?", choices=("red", "blue"))


def _pictures() -> list[Image.Image]:
    first = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(first).ellipse((8, 8, 40, 40), fill=(220, 30, 30))
    second = Image.new("RGB", (48, 64), "white")
    ImageDraw.Draw(second).rectangle((8, 20, 40, 56), fill=(30, 60, 220))
    return [first, second]


def test_jsonl_images_list(tmp_path):
    for i, picture in enumerate(_pictures()):
        picture.save(tmp_path / f"p{i}.png")
    lines = [
        {"images": ["p0.png", "p1.png"], "question": "same shape?"},
        {"image": "p0.png"},
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    items = read_jsonl(tmp_path / "data.jsonl", QUESTION)
    assert items[0].image == (str(tmp_path / "p0.png"), str(tmp_path / "p1.png"))
    assert items[0].label == f"{tmp_path / 'p0.png'} + {tmp_path / 'p1.png'}"
    assert items[1].image == str(tmp_path / "p0.png") and items[1].label == str(tmp_path / "p0.png")
    loaded = load_images(items[0].image)
    assert [im.size for im in loaded] == [(64, 64), (48, 64)]


@pytest.mark.parametrize(
    "line, message",
    [
        ({"image": "p0.png", "images": ["p0.png"]}, '"image" path or an "images" list'),
        ({"images": []}, '"images" must be a list of 1 to'),
        ({"images": "p0.png"}, '"images" must be a list of 1 to'),
        ({"images": ["p0.png", 3]}, "an image must be a non-empty path string"),
        ({"images": ["p0.png", "../outside.png"]}, "outside"),
    ],
)
def test_jsonl_bad_images_lists_are_one_line_errors(tmp_path, line, message):
    _pictures()[0].save(tmp_path / "p0.png")
    (tmp_path / "data.jsonl").write_text(json.dumps(line))
    skipped = []
    with pytest.raises(ValueError, match="no usable items"):
        read_jsonl(tmp_path / "data.jsonl", QUESTION, skipped)
    assert len(skipped) == 1 and message in skipped[0].reason and "\n" not in skipped[0].reason


def test_load_images_bounds():
    with pytest.raises(ValueError, match="1 to"):
        load_images([])
    with pytest.raises(ValueError, match="1 to"):
        load_images([_pictures()[0]] * (MAX_IMAGES + 1))
    assert image_label(("a.png", "b.png")) == "a.png + b.png"


def test_views_transform_every_image():
    pictures = _pictures()
    views = make_views(load_rgb(pictures), 3, seed=0, transforms="geometric", flip=True)
    assert views[0] == pictures
    for view in views[1:]:
        assert isinstance(view, list) and [im.size for im in view] == [im.size for im in pictures]
        assert any(a.tobytes() != b.tobytes() for a, b in zip(view, pictures))
    again = make_views(load_rgb(pictures), 3, seed=0, transforms="geometric", flip=True)
    assert all(a.tobytes() == b.tobytes() for v, w in zip(views[1:], again[1:]) for a, b in zip(v, w))


@pytest.mark.parametrize("model_type", ["idefics3", "qwen2_vl"])
def test_prompt_holds_every_image_and_the_loss_scores_what_was_sampled(model_type, tiny_family_dir):
    from ttrv_edge.api import TTRVModel

    api = TTRVModel.from_pretrained(str(tiny_family_dir(model_type)), views=2, **FAST)
    vlm = api.vlm
    image_id = vlm.model.config.image_token_id
    one = vlm.prompt_inputs(_pictures()[0], QUESTION.prompt())
    two = vlm.prompt_inputs(_pictures(), QUESTION.prompt())
    count_one = int((one["input_ids"] == image_id).sum())
    count_two = int((two["input_ids"] == image_id).sum())
    assert count_one > 0 and count_two > count_one
    if model_type == "idefics3":  # fixed tokens per image: exactly twice
        assert count_two == 2 * count_one
    item = api.loop.prepare("two pictures", _pictures(), SignalQuestion("What is in the pictures?"))
    record = api.loop.step([item], step=0, seed=1)
    assert record.updated and record.logprob_gap is not None and record.logprob_gap < 1e-3


def test_api_and_cli_take_multi_image_inputs(tiny_idefics3_dir, tmp_path, capsys):
    from ttrv_edge.api import TTRVModel, as_item
    from ttrv_edge.cli import main

    pictures = _pictures()
    api = TTRVModel.from_pretrained(str(tiny_idefics3_dir), views=1, steps=1, **FAST)
    result = api.adapt(pictures, "Which colour is in the second picture?", choices=["red", "blue"])
    assert result.image.count(" + ") == 1 and len(result.steps) == 1
    image, _, label = as_item({"images": ["a.png", "b.png"], "question": "same?"})
    assert image == ["a.png", "b.png"] and label == "a.png + b.png"
    with pytest.raises(ValueError, match='"images" must be a list'):
        as_item({"images": "a.png"})
    for i, picture in enumerate(pictures):
        picture.save(tmp_path / f"p{i}.png")
    lines = [{"images": ["p0.png", "p1.png"]}, {"image": "p1.png"}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    argv = [str(tmp_path / "data.jsonl"), "--model", str(tiny_idefics3_dir), "--max-updates", "1", "--rollouts", "4"]
    argv += ["--max-new-tokens", "4", "--views", "2", "--out", str(tmp_path / "out"), "--json"]
    capsys.readouterr()
    assert main(["adapt", *argv]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [item["image"] for item in report["items"]] == [
        f"{tmp_path / 'p0.png'} + {tmp_path / 'p1.png'}",
        str(tmp_path / "p1.png"),
    ]
