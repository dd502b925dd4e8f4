"""Run guards: NaN/Inf steps are undone bit-exactly, and the label-free collapse guard fires only on collapse."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from helpers import SignalQuestion
from PIL import Image

from ttrv_edge.api import TTRVModel
from ttrv_edge.config import TTRVConfig
from ttrv_edge.io.answers import Question
from ttrv_edge.models import lora_state
from ttrv_edge.rl.diversity import Observation, diversity
from ttrv_edge.rl.guards import NONFINITE_GRADIENT, NONFINITE_LOSS, CollapseGuard

FAST = dict(rollouts=6, views=1, max_new_tokens=4, seed=1)  # 6 rollouts: any 6 calls of SignalQuestion give 4 x, 2 y


def _optimizer_state(optimizer) -> dict:
    return {(i, k): v.clone() for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _text_projection(model):
    return next(m for n, m in model.named_modules() if n.endswith("text_model.layers.0.self_attn.q_proj"))


@pytest.fixture
def api(tiny_idefics3_dir):
    return TTRVModel.from_pretrained(str(tiny_idefics3_dir), lr=5e-2, max_updates=4, **FAST)


@pytest.fixture
def item(api, test_image):
    return api.loop.prepare("img", test_image, SignalQuestion("Describe it."))


# ------------------------------------------------------------------------------------------------ non-finite steps


def _nan_in_training(model):
    """NaN in a text projection's output, only in forwards with grad (sampling and scoring run without grad)."""
    return _text_projection(model).register_forward_hook(
        lambda m, i, out: out * math.nan if torch.is_grad_enabled() else out
    )


def test_nan_loss_skips_the_step_and_restores_weights_and_optimizer_exactly(api, item):
    loop = api.loop
    assert loop.step([item], 0, seed=1).updated  # a real step first: the optimizer state is not empty
    weights, moments = lora_state(api.vlm.model), _optimizer_state(loop.optimizer)
    assert moments
    hook = _nan_in_training(api.vlm.model)
    record = loop.step([item], 1, seed=2)
    hook.remove()
    assert record.skipped == NONFINITE_LOSS and not record.updated and record.loss is None
    assert _same(lora_state(api.vlm.model), weights) and _same(_optimizer_state(loop.optimizer), moments)
    assert not api.vlm.model.training
    after = loop.step([item], 2, seed=3)  # the run goes on
    assert after.updated and after.skipped is None and math.isfinite(after.loss)
    assert not _same(lora_state(api.vlm.model), weights)


def test_inf_gradient_with_finite_loss_is_undone(api, item):
    loop = api.loop
    weights = lora_state(api.vlm.model)
    param = next(p for n, p in api.vlm.model.named_parameters() if "lora_B" in n)
    hook = param.register_hook(lambda grad: torch.full_like(grad, math.inf))
    record = loop.step([item], 0, seed=1)
    hook.remove()
    assert record.skipped == NONFINITE_GRADIENT and not record.updated
    assert _same(lora_state(api.vlm.model), weights) and _optimizer_state(loop.optimizer) == {}


def test_without_the_guard_nan_reaches_the_weights(tiny_idefics3_dir, test_image):
    """The control: the guard, not luck, keeps the weights finite."""
    api = TTRVModel.from_pretrained(str(tiny_idefics3_dir), lr=5e-2, skip_nonfinite=False, **FAST)
    item = api.loop.prepare("img", test_image, SignalQuestion("Describe it."))
    hook = _nan_in_training(api.vlm.model)
    api.loop.step([item], 0, seed=1)
    hook.remove()
    assert any(not torch.isfinite(p).all() for n, p in api.vlm.model.named_parameters() if "lora_" in n)


def test_episodic_json_reports_skipped_steps(api, item):
    hook = _nan_in_training(api.vlm.model)
    result = api.loop.adapt_episode(item)
    hook.remove()
    steps = result.to_dict()["steps"]
    assert steps and all(s["skipped"] == NONFINITE_LOSS and s["loss"] is None for s in steps)
    assert result.after == result.before  # nothing was applied


def test_transductive_run_info_lists_skipped_steps(api, test_image):
    items = [api.loop.prepare(f"i{k}", test_image.rotate(90 * k), SignalQuestion("Describe it.")) for k in range(2)]
    original, calls = api.loop.update, []

    def nan_on_second_update(groups):
        calls.append(1)
        if len(calls) != 2:
            return original(groups)
        hook = _nan_in_training(api.vlm.model)
        try:
            return original(groups)
        finally:
            hook.remove()

    api.loop.update = nan_on_second_update
    results = api.loop.adapt_transductive(items)
    assert api.run_info["nonfinite_skips"] == [1]
    records = [s for r in results for s in r.steps]
    assert [s.step for s in records if s.skipped] == [1] and sum(s.updated for s in records) == 4 - 1


# ------------------------------------------------------------------------------------------------ diversity stats


def _observations(answers, question="q", ended=True):
    """One observation per input: its sampled answers, as texts too."""
    return [Observation(question, list(a), [str(x) for x in a], [ended] * len(a)) for a in answers]


def test_diversity_statistics_by_hand():
    answers = [["A", "A"], ["B", "B"], ["A", "B"], [None, None]]
    check = diversity(_observations(answers), step=3)
    assert check.inputs == 4 and check.readable == 3  # the unreadable input is left out of the answer statistics
    assert check.dominant_answer == "A" and check.dominant_share == pytest.approx(2 / 3)  # the tie goes to "A"
    assert check.majority_entropy == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))
    assert check.answer_entropy == pytest.approx(math.log(2) / 3)
    assert check.score == pytest.approx(math.log(2))  # pooled {A: .5, B: .5}
    assert check.information == pytest.approx(math.log(2) - math.log(2) / 3)
    assert check.text_share == pytest.approx(2 / 4) and check.dominant_text == "A"  # texts count every input ("None")
    same = diversity(_observations([["A", "A", "B", None]] * 5), 0)
    assert same.information == 0.0 and same.score > 0  # the same distribution everywhere: varied, but no information


def _guard(before, **options):
    guard = CollapseGuard(TTRVConfig(**options), start=None)
    guard.check(0, _observations(before), None, None)
    return guard


def test_guard_fires_only_on_a_drop_from_a_diverse_start():
    diverse = [["A"], ["B"], ["C"], ["D"], ["A"]]
    guard = _guard(diverse)
    four_of_five = [["Z", "Z", "A"]] * 4 + [["A", "A", "Z"]]
    assert not guard.check(1, _observations(four_of_five), None, None).collapsed  # share 0.8 < 0.9
    fired = guard.check(2, _observations([["Z", "Z", "A"]] * 5), None, None)
    assert fired.collapsed and fired.signals == ["answer", "text"] and fired.questions == ["q"]
    already_agreeing = _guard([["A"]] * 5)
    assert not already_agreeing.check(1, _observations([["A"]] * 5), None, None).collapsed  # nothing to lose
    too_few = _guard(diverse[:3])
    assert not too_few.check(1, _observations([["Z"]] * 3), None, None).collapsed  # below collapse_min_inputs
    off = _guard(diverse, collapse_guard=False)
    assert not off.check(1, _observations([["Z"]] * 5), None, None).collapsed


# ------------------------------------------------------------------------------------------------ collapse, end to end


def _lora_b_norm(model) -> float:
    return sum(float(p.detach().norm()) for n, p in model.named_parameters() if "lora_B" in n)


@dataclass(frozen=True)
class DriftQuestion(Question):
    """A stand-in for a model that collapses when adapted too far: while the LoRA weights stay near their start,
    each input has its own answer ("x<item>", or "other" for some rollouts); once they have drifted (norm of the
    LoRA B matrices above ``limit``, which lr=5e-2 reaches after about five updates and 5e-4 never) every input answers
    "A" (some rollouts "B", so updates keep their signal), the failure the paper reports."""

    item: int = 0
    model: object = field(default=None, compare=False)
    limit: float = 14.0

    def extract(self, text: str) -> str | None:
        if _lora_b_norm(self.model) > self.limit:
            return "A" if len(text) % 5 else "B"
        return "other" if len(text) % 3 == 0 else f"x{self.item}"


def _drift_run(tiny_dir, lr: float, epochs: int = 2, every: int = 2, **options):
    api = TTRVModel.from_pretrained(str(tiny_dir), lr=lr, epochs=epochs, collapse_check_every=every, **FAST, **options)
    images = [Image.new("RGB", (32, 32), (40 * k, 90, 200 - 30 * k)) for k in range(6)]
    items = [
        api.loop.prepare(f"i{k}", image, DriftQuestion("What?", item=k, model=api.vlm.model))
        for k, image in enumerate(images)
    ]
    weights = [lora_state(api.vlm.model)]
    step = api.loop.step

    def recording_step(*args, **kwargs):
        record = step(*args, **kwargs)
        weights.append(lora_state(api.vlm.model))
        return record

    api.loop.step = recording_step
    results = api.loop.adapt_transductive(items)
    return api, results, weights


def test_collapse_guard_fires_stops_and_rolls_back(tiny_idefics3_dir):
    api, results, weights = _drift_run(tiny_idefics3_dir, lr=5e-2)
    collapse = api.run_info["collapse"]
    assert collapse is not None and collapse["dominant_share"] >= 0.9
    total = 2 * 6
    assert collapse["step"] < total and len(weights) - 1 == collapse["step"]  # it stopped there
    best = collapse["rolled_back_to_step"]
    assert best < collapse["step"]
    assert all(torch.equal(v, weights[best][k]) for k, v in lora_state(api.vlm.model).items())
    after = [r.after.majority for r in results]
    assert len(set(after)) >= 4, after  # answered by the rolled-back adapter: diverse again
    checks = api.run_info["diversity"]
    assert checks[-1]["collapsed"] and not any(c["collapsed"] for c in checks[:-1])
    assert "answer" in collapse["signals"] and collapse["at_collapse"]["step"] == collapse["step"]
    assert checks[best // 2]["step"] == best and checks[best // 2]["score"] >= max(c["score"] for c in checks) - 0.1


def test_without_the_guard_the_same_run_ends_collapsed(tiny_idefics3_dir):
    api, results, weights = _drift_run(tiny_idefics3_dir, lr=5e-2, collapse_guard=False)
    assert api.run_info["collapse"] is None and len(weights) - 1 == 2 * 6
    assert {r.after.majority for r in results} == {"A"}
    assert api.run_info["diversity"] == []  # disabled: no checks, no extra sampling


def test_collapse_guard_stays_quiet_on_a_normal_run(tiny_idefics3_dir):
    api, results, weights = _drift_run(tiny_idefics3_dir, lr=5e-4, epochs=2, every=3)  # the default learning rate
    assert api.run_info["collapse"] is None and len(weights) - 1 == 2 * 6 and len(api.run_info["diversity"]) == 5
    assert all(c["dominant_share"] < 0.9 for c in api.run_info["diversity"])
    assert sum(s.updated for r in results for s in r.steps) > 0


def test_collapse_guard_stays_quiet_with_real_answers(tiny_idefics3_dir):
    """No stub: the tiny model's own sampled labels, two epochs at the default learning rate."""
    labels = ("red", "green", "blue", "yellow", "circle", "square", "cat", "dog")
    api = TTRVModel.from_pretrained(str(tiny_idefics3_dir), rollouts=4, max_new_tokens=5, seed=1, max_updates=10)
    images = [Image.new("RGB", (32, 32), (30 * k, 255 - 30 * k, 70 * k % 256)) for k in range(5)]
    items = [api.loop.prepare(f"i{k}", im, Question("What is it?", labels=labels)) for k, im in enumerate(images)]
    api.loop.adapt_transductive(items)
    assert api.run_info["collapse"] is None and api.run_info["update_budget"] == 10
    assert [c["step"] for c in api.run_info["diversity"]] == [0, 3, 6, 9, 10]  # start, every ceil(10 / 4), the end
