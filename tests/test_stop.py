"""The collapse stop watches what the model says: each signal fires on a run that collapses its way, stays quiet on a
healthy run, the rollback restores the best snapshot; and the update budget replaces epochs x set size.

The tiny random model's texts are noise, so the runs here script what it says: ``loop.sample`` returns the model's
real rollouts (so updates train on real tokens) with the texts, answers and EOS flags replaced by a script of the
input and of the number of updates done so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import pytest
import torch
from PIL import Image

from ttrv_edge.api import TTRVModel
from ttrv_edge.config import DEFAULT_MAX_UPDATES, TTRVConfig
from ttrv_edge.io.answers import Question
from ttrv_edge.models import lora_state
from ttrv_edge.rl.diversity import POOLED, Observation, diversity, ended_flags, observe, question_groups
from ttrv_edge.rl.guards import CollapseGuard, fired_signals
from ttrv_edge.rl.schedule import schedule, work_units

FAST = dict(
    rollouts=6, views=1, max_new_tokens=4, seed=1, lr=5e-2
)  # single-view: the scripted samplers patch one group
COLOURS = ("red", "green", "blue", "yellow")
GIBBERISH = "red green red green red green"


# ------------------------------------------------------------------------------------------------ scripted runs


@dataclass
class Script:
    """What input ``k`` says after ``updates`` updates: (texts, ended). ``healthy`` before ``after`` updates,
    ``collapsed`` from then on."""

    healthy: object
    collapsed: object
    after: int = 3
    updates: list = field(default_factory=list)

    def __call__(self, k: int, n: int) -> tuple[list[str], bool]:
        return (self.healthy if len(self.updates) < self.after else self.collapsed)(k, n)


def _scripted(loop, script: Script) -> None:
    """Make ``loop.sample`` return real rollouts with scripted texts, answers and EOS (``Script``)."""
    real_sample, real_update = loop.sample, loop.update
    eos = torch.tensor(loop.vlm.eos_token_ids)
    filler = next(t for t in range(3, 50) if t not in loop.vlm.eos_token_ids)

    def sample(item, seed):
        rollouts, _ = real_sample(item, seed)
        texts, ended = script(int(item.label[1:]), rollouts.num)
        ids = rollouts.completion_ids.clone()
        ids[torch.isin(ids, eos)] = filler
        if ended:
            ids[:, -1] = eos[0]
        mask = torch.ones_like(rollouts.completion_mask)
        rollouts = replace(rollouts, completion_ids=ids, completion_mask=mask, texts=texts)
        return rollouts, [item.question.extract(t) for t in texts]

    def update(groups):
        script.updates.append(1)
        return real_update(groups)

    loop.sample, loop.update = sample, update


def _run(tiny_dir, script: Script, question, n=8, budget=8, **options):
    """A scripted transductive run over ``n`` inputs (``question(k)`` asks input k); returns the API, the results
    and the LoRA weights after every step (index = steps done)."""
    options = {"max_updates": budget, "collapse_check_every": 2, "collapse_check_inputs": 0, **FAST, **options}
    api = TTRVModel.from_pretrained(str(tiny_dir), **options)
    images = [Image.new("RGB", (32, 32), (25 * k, 120, 220 - 20 * k)) for k in range(n)]
    items = [api.loop.prepare(f"i{k}", image, question(k)) for k, image in enumerate(images)]
    _scripted(api.loop, script)
    weights = [lora_state(api.vlm.model)]
    step = api.loop.step

    def recording_step(*args, **kwargs):
        record = step(*args, **kwargs)
        weights.append(lora_state(api.vlm.model))
        return record

    api.loop.step = recording_step
    return api, api.loop.adapt_transductive(items), weights


def _shuffled_choices(k: int) -> Question:
    """Colour options in an order of their own per input (the demo benchmark shuffles its choices)."""
    return Question("What colour is it?", choices=COLOURS[k % 4 :] + COLOURS[: k % 4])


def _own_colour(k: int, n: int) -> tuple[list[str], bool]:
    """Healthy: input k says its colour (some rollouts the next one), in its own words, and ends."""
    own, other = COLOURS[k % 4], COLOURS[(k + 1) % 4]
    return [f"the {own} one {k}" if j % 3 else f"the {other} one {k}" for j in range(n)], True


def _gibberish(k: int, n: int) -> tuple[list[str], bool]:
    """Collapsed: every input gets the same text, which never ends."""
    return [GIBBERISH] * n, False


def _restored_best(api, weights) -> int:
    collapse = api.run_info["collapse"]
    best = collapse["rolled_back_to_step"]
    assert best < collapse["step"] and len(weights) - 1 == collapse["step"]  # it stopped at the check that fired
    assert all(torch.equal(v, weights[best][k]) for k, v in lora_state(api.vlm.model).items())
    return best


def test_one_word_read_as_varied_letters_fires_every_signal(tiny_idefics3_dir):
    """Issue 15 (b): with shuffled choices a constant "red green ..." is read as varied letters; the option text,
    the output text, the missing EOS and the certainty about one answer all show the collapse, and the run rolls
    back to the best snapshot."""
    api, results, weights = _run(tiny_idefics3_dir, Script(_own_colour, _gibberish), _shuffled_choices)
    collapse = api.run_info["collapse"]
    assert collapse["step"] == 4 and collapse["signals"] == ["answer", "text", "eos", "sharpening"]
    assert collapse["dominant_answer"] == "red" and collapse["dominant_text"] == GIBBERISH
    assert collapse["at_collapse"]["ended"] == 0.0 and collapse["at_start"]["ended"] == 1.0
    letters = [r.after.majority for r in results]  # answered after the rollback, still scripted as collapsed
    assert len(set(letters)) == 4  # what the old letter-only guard saw: four letters, nothing dominant
    assert _restored_best(api, weights) in (0, 2)


def test_text_signal_alone_on_unreadable_answers(tiny_idefics3_dir):
    """Answers that never parse leave the answer statistics empty; one text for every image still fires."""
    healthy = lambda k, n: ([f"zz{k} qq{j % 2}" for j in range(n)], True)  # noqa: E731
    collapsed = lambda k, n: ([GIBBERISH] * n, True)  # noqa: E731
    api, _, weights = _run(tiny_idefics3_dir, Script(healthy, collapsed), lambda k: Question("How many?", numeric=True))
    collapse = api.run_info["collapse"]
    assert collapse["signals"] == ["text"] and collapse["questions"] == ["How many?"]
    assert collapse["at_collapse"]["readable"] == 0 and collapse["at_collapse"]["text_share"] == 1.0
    _restored_best(api, weights)


def test_eos_signal_alone_when_texts_stop_ending(tiny_idefics3_dir):
    healthy = lambda k, n: ([f"zz{k} qq{j % 2}" for j in range(n)], True)  # noqa: E731
    unending = lambda k, n: ([f"zz{k} qq{j % 2}" for j in range(n)], False)  # noqa: E731
    api, _, weights = _run(tiny_idefics3_dir, Script(healthy, unending), lambda k: Question("How many?", numeric=True))
    collapse = api.run_info["collapse"]
    assert collapse["signals"] == ["eos"] and collapse["step"] == 4
    assert collapse["at_start"]["ended"] == 1.0 and collapse["at_collapse"]["ended"] == 0.0
    _restored_best(api, weights)


def test_sharpening_signal_alone_on_certain_answers_that_narrowed(tiny_idefics3_dir):
    """Issue 15 (a): every input becomes certain, and the 8 inputs' four answers narrow to two, none dominant."""
    labels = ("alpha", "beta", "gamma", "delta")

    def unsure(k, n):  # its own label 3 of 6 times, the next 2, the one after 1: entropy 1.01 nats
        picks = [0, 0, 0, 1, 1, 2]
        return [f"{labels[(k + p) % 4]} {k}" for p in picks[:n]], True

    def certain(k, n):  # inputs 0-5 say alpha, 6-7 beta, always (in texts of their own)
        return [f"{labels[0] if k < 6 else labels[1]} {k}"] * n, True

    api, _, weights = _run(tiny_idefics3_dir, Script(unsure, certain), lambda k: Question("Which?", labels=labels))
    collapse = api.run_info["collapse"]
    assert collapse["signals"] == ["sharpening"]
    at = collapse["at_collapse"]
    assert at["answer_entropy"] == 0.0 and at["dominant_share"] == 0.75  # below collapse_share: not "answer"
    assert at["majority_entropy"] <= 0.5 * collapse["at_start"]["majority_entropy"]
    _restored_best(api, weights)


def test_healthy_run_spends_its_budget_and_stays_quiet(tiny_idefics3_dir):
    api, results, weights = _run(tiny_idefics3_dir, Script(_own_colour, _own_colour), _shuffled_choices, budget=6)
    info = api.run_info
    assert info["collapse"] is None and len(weights) - 1 == 6 and info["update_budget"] == 6
    assert [c["step"] for c in info["diversity"]] == [0, 2, 4, 6]
    assert all(c["signals"] == [] and c["ended"] == 1.0 for c in info["diversity"])
    assert info["updates_run"] > 0


def test_a_signal_set_to_zero_is_off(tiny_idefics3_dir):
    options = dict(collapse_text_share=0.0, collapse_eos_drop=0.0, collapse_share=1.0, collapse_entropy_floor=0.0)
    api, _, weights = _run(
        tiny_idefics3_dir, Script(_own_colour, _gibberish), _shuffled_choices, collapse_entropy_drop=0.0, **options
    )
    assert api.run_info["collapse"]["signals"] == ["answer"]  # share 1.0 still reaches collapse_share=1.0
    api, _, weights = _run(
        tiny_idefics3_dir, Script(_own_colour, _gibberish), _shuffled_choices, collapse_guard=False, budget=4
    )
    assert api.run_info["collapse"] is None and len(weights) - 1 == 4


# ------------------------------------------------------------------------------------------------ the statistics


def _obs(question, answers, texts=None, ended=True):
    return Observation(question, list(answers), list(texts or [str(a) for a in answers]), [ended] * len(answers))


def test_said_reads_the_option_text_and_ended_flags_read_the_mask():
    question = Question("Colour?", choices=("green", "Red"))
    seen = observe(question, ["B", "(A) Green!", "nothing"], ["B", "A", None], [True, False, True])
    assert seen.answers == ["red", "green", None] and seen.texts == ["b", "a green", "nothing"]
    ids = torch.tensor([[5, 2, 0], [5, 6, 7], [2, 0, 0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert ended_flags(ids, mask, [2]) == [True, False, True]


def test_answers_are_compared_within_their_question():
    """A mixed set where every count question got "four" has collapsed there; the whole set alone hides it."""
    count, colour = "How many?", "What colour?"
    start = [_obs(count, [w]) for w in ("one", "two", "three", "four")] + [
        _obs(colour, [c]) for c in ("red", "green", "blue", "yellow")
    ]
    now = [_obs(count, ["four"])] * 4 + start[4:]
    first, later = diversity(start, 0, min_group=4), diversity(now, 1, min_group=4)
    assert later.groups[count]["dominant_share"] == 1.0 and later.groups[colour]["dominant_share"] == 0.25
    assert later.dominant_share == pytest.approx(0.625) and later.majority_entropy == pytest.approx(math.log(4) / 2)
    assert fired_signals(TTRVConfig(), first, later) == (["answer", "text"], [count])


def test_questions_asked_of_few_inputs_are_pooled():
    assert question_groups(["a", "b", "c", "d", "d", "d"], 3) == [POOLED, POOLED, POOLED, "d", "d", "d"]
    assert question_groups(["a", "d", "d", "d"], 3) == ["a", "d", "d", "d"]  # one small question stays itself
    assert question_groups(["a", "b"], 1) == ["a", "b"]


def test_sharpening_needs_the_answers_to_narrow():
    """Certain answers that still differ across inputs are a confident model, not a collapse."""
    model = torch.nn.Linear(1, 1)  # stands in for the VLM: the guard snapshots the best check's weights
    weights = (model, torch.optim.SGD(model.parameters(), lr=0.1))
    guard = CollapseGuard(TTRVConfig(), start=None)
    guard.check(0, [_obs("q", [w, w, "x"]) for w in "abcdefgh"], *weights)
    assert guard.check(1, [_obs("q", [w] * 3) for w in "abcdefgh"], *weights).signals == []
    narrowed = [_obs("q", ["a"] * 3)] * 6 + [_obs("q", ["b"] * 3)] * 2
    assert guard.check(2, narrowed, *weights).signals == ["sharpening"]


class _Adapter(torch.nn.Module):
    """One LoRA-named parameter: enough for the guard's snapshots."""

    def __init__(self):
        super().__init__()
        self.lora_A = torch.nn.Parameter(torch.zeros(2))


def test_rollback_target_is_the_most_diverse_check_beyond_the_margin():
    model = _Adapter()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = CollapseGuard(TTRVConfig(), start=None)
    guard.check(0, [_obs("q", [w]) for w in "aabbccdd"], model, optimizer)  # 4 answers: score log 4
    with torch.no_grad():
        model.lora_A.fill_(1.0)
    guard.check(1, [_obs("q", [w]) for w in "abcdefgh"], model, optimizer)  # 8 answers: log 8, beats log 4 + margin
    with torch.no_grad():
        model.lora_A.fill_(2.0)
    guard.check(2, [_obs("q", [w]) for w in "abcdefgg"], model, optimizer)  # 7 answers: not by the margin
    assert (guard.best_step, guard.best_score) == (1, pytest.approx(math.log(8)))
    with torch.no_grad():
        model.lora_A.fill_(3.0)
    assert guard.check(3, [_obs("q", ["a"])] * 8, model, optimizer).signals == ["answer", "text"]
    guard.roll_back(3, model, optimizer)
    assert torch.equal(model.lora_A.detach(), torch.ones(2)) and guard.collapse["rolled_back_to_step"] == 1


def test_eos_is_judged_only_when_the_model_ended_its_answers_at_the_start():
    guard = CollapseGuard(TTRVConfig(), start=None)
    guard.check(0, [_obs("q", [w], ended=False) for w in "abcd"] + [_obs("q", ["e"])], None, None)
    assert guard.check(1, [_obs("q", [w], ended=False) for w in "abcde"], None, None).signals == []


def test_config_errors_name_the_flag():
    for options, flag in (
        (dict(collapse_text_share=1.5), "--collapse-text-share"),
        (dict(collapse_eos_drop=1.0), "--collapse-eos-drop"),
        (dict(collapse_entropy_floor=-0.1), "--collapse-entropy-floor"),
        (dict(collapse_entropy_drop=-1.0), "--collapse-entropy-drop"),
        (dict(collapse_check_inputs=-1), "--collapse-check-inputs"),
        (dict(max_updates=0), "--max-updates"),
        (dict(epochs=0), "--epochs"),
        (dict(epochs=2, max_updates=8), "--epochs .* --max-updates"),
    ):
        with pytest.raises(ValueError, match=flag):
            TTRVConfig(**options)


# ------------------------------------------------------------------------------------------------ update budget


def test_the_budget_cycles_through_shuffled_passes():
    config = TTRVConfig(max_updates=7, batch_size=2, seed=3)
    steps = list(schedule(config, 5))  # passes of 3 steps (2 + 2 + 1 inputs): 3 + 3 + 1
    assert [s.step for s in steps] == list(range(7)) and [s.epoch for s in steps] == [0, 0, 0, 1, 1, 1, 2]
    for epoch in (0, 1):
        assert sorted(i for s in steps if s.epoch == epoch for i in s.indices) == list(range(5))
    assert [s.indices for s in steps if s.epoch == 0] != [s.indices for s in steps if s.epoch == 1]
    assert work_units(config, 5) == 2 * 5 + 2 + 2 + 1 + 2 + 2 + 1 + 2
    assert TTRVConfig().transductive_updates(5) == TTRVConfig().transductive_updates(500) == DEFAULT_MAX_UPDATES


def test_epochs_keep_their_old_order():
    """``epochs`` passes are the steps the loop took before budgets: one generator, a permutation per pass."""
    config = TTRVConfig(epochs=3, batch_size=2, seed=5)
    rng, old = torch.Generator().manual_seed(5), []
    for epoch in range(3):
        order = torch.randperm(5, generator=rng).tolist()
        old += [(epoch, b, order[b : b + 2]) for b in range(0, 5, 2)]
    assert [(s.epoch, s.start, s.indices) for s in schedule(config, 5)] == old
    assert config.transductive_updates(5) == 9


class Interrupted(Exception):
    pass


def test_a_budget_run_resumes_to_the_same_adapter(tmp_path, tiny_idefics3_dir, test_image):
    """A budget that ends inside a pass (5 updates over 3 inputs), cut after 4 steps and resumed."""
    images = [test_image.rotate(90 * k) for k in range(3)]

    def run(folder, stop_after=None, resume=False):
        api = TTRVModel.from_pretrained(str(tiny_idefics3_dir), max_updates=5, collapse_check_every=2, **FAST)
        question = Question("What?", labels=("a", "b", "c"))
        items = [api.loop.prepare(f"i{k}", image, question) for k, image in enumerate(images)]
        step, done = api.loop.step, []

        def counting_step(*args, **kwargs):
            if stop_after is not None and len(done) == stop_after:
                raise Interrupted
            done.append(1)
            return step(*args, **kwargs)

        api.loop.step = counting_step
        return api, api.loop.adapt_transductive(items, checkpoint_dir=folder, resume=resume), len(done)

    reference, _, steps = run(tmp_path / "reference")
    assert steps == 5 and [c["step"] for c in reference.run_info["diversity"]] == [0, 2, 4, 5]
    with pytest.raises(Interrupted):
        run(tmp_path / "cut", stop_after=4)
    resumed, _, steps = run(tmp_path / "cut", resume=True)
    assert steps == 1 and resumed.run_info["resumed_from_step"] == 4
    ours, theirs = lora_state(resumed.vlm.model), lora_state(reference.vlm.model)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert resumed.run_info["diversity"] == reference.run_info["diversity"]
