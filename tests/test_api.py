"""``TTRVModel``: config overrides for one call, dict items for ``adapt_dataset``, what a saved adapter records."""

import json

import pytest
import torch

from ttrv_edge import TTRVConfig, TTRVModel
from ttrv_edge.models.lora import lora_state

FAST = dict(rollouts=4, steps=2, max_new_tokens=4, lr=5e-2, seed=3, consensus=1.0)


@pytest.fixture(scope="module")
def model(tiny_idefics3_dir):
    return TTRVModel.from_pretrained(str(tiny_idefics3_dir), **FAST)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapt_takes_config_overrides_for_one_call(model, test_image):
    start = lora_state(model.vlm.model)
    result = model.adapt(test_image, "Which shape?", choices=["circle", "square"], keep=True, steps=1)
    assert len(result.steps) == 1  # steps=1 for this call
    if result.steps[0].updated:
        assert not _same(start, lora_state(model.vlm.model))  # keep=True: the adapted weights stay
    assert model.config == TTRVConfig(**FAST) and model.loop.config == model.config  # the override was for one call
    assert all(group["lr"] == FAST["lr"] for group in model.loop.optimizer.param_groups)
    model.reset()
    model.adapt(test_image, "Which shape?", choices=["circle", "square"], lr=1e-3)
    assert _same(start, lora_state(model.vlm.model))  # keep=False (the model's config): reset afterwards
    assert all(group["lr"] == FAST["lr"] for group in model.loop.optimizer.param_groups)
    with pytest.raises(ValueError, match="lora_rank: fixed when the model loads"):
        model.adapt(test_image, "Which shape?", lora_rank=4)
    with pytest.raises(ValueError, match="--baseline"):
        model.adapt(test_image, "Which shape?", baseline="best")


def test_adapt_dataset_takes_dicts_and_items(model, test_image, tmp_path):
    from ttrv_edge import Item, Question

    test_image.save(tmp_path / "a.png")
    items = [
        {"image": str(tmp_path / "a.png"), "question": "Which shape?", "choices": ["circle", "square"]},
        {"image": test_image.rotate(90), "question": "How many shapes?", "choices": "one,two,three"},
        Item(str(tmp_path / "a.png"), Question("Which colour?", labels=("red", "blue"))),
    ]
    results = model.adapt_dataset(items, epochs=1, batch_size=3)
    assert [r.question for r in results] == ["Which shape?", "How many shapes?", "Which colour?"]
    assert results[1].choices == ["one", "two", "three"] and results[1].image.startswith("<Image")
    with pytest.raises(ValueError, match='"image"'):
        model.adapt_dataset([{"question": "no image"}])
    with pytest.raises(ValueError, match="unknown item keys answer"):
        model.adapt_dataset([{"image": str(tmp_path / "a.png"), "answer": "A"}])


def test_saved_adapter_names_its_base_and_carries_a_card(model, tiny_idefics3_dir, test_image, tmp_path):
    out = tmp_path / "adapter"
    model.adapt(test_image, "Which shape?", choices=["circle", "square"], save_to=out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_idefics3_dir.name
    card = (out / "README.md").read_text()
    assert "episodic" in card and "rollouts=4" in card and f'adapter="{out}"' in card
    assert "library_name: peft" in card and "ttrv-edge" in card
    again = TTRVModel.from_pretrained(str(tiny_idefics3_dir), adapter=str(out), **FAST)  # still loads
    assert again.base_model == tiny_idefics3_dir.name


def test_default_learning_rate_follows_the_mode(tiny_idefics3_dir, test_image):
    """lr=None: episodic runs at 5e-3 and transductive at 5e-4 (the values measured safe on the shift benchmark);
    an explicit lr wins in both modes."""
    from ttrv_edge.config import EPISODIC_LR, TRANSDUCTIVE_LR

    seen = []
    model = TTRVModel.from_pretrained(str(tiny_idefics3_dir), rollouts=4, steps=1, max_new_tokens=4, max_updates=1)
    real = model.loop.update
    model.loop.update = lambda groups: seen.append(model.loop.optimizer.param_groups[0]["lr"]) or real(groups)
    item = {"image": test_image, "question": "Which shape?", "choices": ["circle", "square"]}
    model.adapt(test_image, "Which shape?", choices=["circle", "square"])
    model.adapt_dataset([item, item])
    model.adapt(test_image, "Which shape?", choices=["circle", "square"], lr=1e-3)
    assert seen[0] == EPISODIC_LR and TRANSDUCTIVE_LR in seen[1:-1] and seen[-1] == 1e-3, seen
    assert TTRVConfig().lr is None and TTRVConfig().learning_rate("transductive") == TRANSDUCTIVE_LR
