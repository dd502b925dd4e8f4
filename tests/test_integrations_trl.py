"""ttrv_edge.integrations.trl: TTRV's rewards as TRL reward functions.

Rewards are checked against values computed by hand from docs/method.md §3 (not by the package's code), for string
and conversational completions, grouped by ``prompt_id``, by prompt text and by image; then a prompt whose
completions are split 3/5 over two gloo processes gets the single-process rewards; then TRL's GRPOTrainer trains
examples/trl_grpo_ttrv.py's tiny Llama for two steps on CPU with the plug-in as its reward (skipped without trl).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import math
import socket
from datetime import timedelta
from pathlib import Path

import pytest
from PIL import Image

from ttrv_edge.integrations import trl as plugin
from ttrv_edge.integrations.trl import completion_text, frequency_reward, gated_reward, ttrv_reward, variant

ROOT = Path(__file__).resolve().parent.parent
# docs/method.md §3's example: N = 8, answers A A A A A B B None
ANSWERS = ["A", "A", "A", "A", "A", "B", "B", "???"]
P_A, P_B = 5 / 8, 2 / 8
R_ENT = (P_A * math.log(P_A) + P_B * math.log(P_B)) / math.log(2)  # -H(p) / log K, K = 2
TTRV = {"A": P_A + 0.75 * R_ENT, "B": P_B + 0.75 * R_ENT, None: 0.75 * R_ENT}


def _expected(answers, table):
    return [table.get(a, table[None]) for a in answers]


def _close(got, expected, tol=1e-5):
    assert len(got) == len(expected) and all(isinstance(g, float) for g in got)
    assert all(abs(g - e) < tol for g, e in zip(got, expected)), (got, expected)


def test_string_completions_hand_computed():
    prompts = ["Which letter? A. x B. y"] * 8
    _close(ttrv_reward(ANSWERS, prompts=prompts), _expected(ANSWERS, TTRV))
    assert abs(TTRV["A"] - -0.068) < 1e-3 and abs(TTRV[None] - -0.693) < 1e-3  # the doc's rounded numbers
    _close(frequency_reward(ANSWERS, prompts=prompts), _expected(ANSWERS, {"A": P_A, "B": P_B, None: 0.0}))
    # TRL's extra keyword arguments are ignored
    extra = {"completion_ids": [[1]] * 8, "trainer_state": object(), "log_metric": print, "log_extra": print}
    _close(ttrv_reward(completions=ANSWERS, prompts=prompts, **extra), _expected(ANSWERS, TTRV))


def test_free_text_is_normalised_and_empty_text_is_unreadable():
    completions = ["Paris.", " paris", "PARIS!", "Lyon", "lyon.", "", "  ", "Paris"]
    # p(paris) = 4/8, p(lyon) = 2/8, two unreadable
    r_ent = (0.5 * math.log(0.5) + 0.25 * math.log(0.25)) / math.log(2)
    expected = [0.5 + 0.75 * r_ent] * 3 + [0.25 + 0.75 * r_ent] * 2 + [0.75 * r_ent] * 2 + [0.5 + 0.75 * r_ent]
    _close(ttrv_reward(completions, prompts=["Capital of France?"] * 8), expected)


def test_conversational_completions_and_prompts():
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which letter?"}]
    reordered = [{"content": m["content"], "role": m["role"]} for m in prompt]  # same prompt, other key order

    def as_message(text, parts):
        content = [{"type": "text", "text": text}] if parts else text
        return [{"role": "assistant", "content": content}]

    completions = [as_message(a, parts=i % 2 == 0) for i, a in enumerate(ANSWERS)]
    prompts = [prompt if i < 4 else reordered for i in range(8)]
    _close(ttrv_reward(completions, prompts=prompts), _expected(ANSWERS, TTRV))


def test_completion_text_reads_the_last_assistant_message():
    parts = [{"type": "image"}, {"type": "text", "text": "The answer"}, {"type": "text", "text": "is B"}]
    assert completion_text([{"role": "assistant", "content": parts}]) == "The answer is B"
    tool_turn = [
        {"role": "assistant", "content": "", "tool_calls": [{"name": "look"}]},
        {"role": "tool", "content": "a dog"},
        {"role": "assistant", "content": "B"},
    ]
    assert completion_text(tool_turn) == "B"
    assert completion_text([{"role": "assistant", "content": None}]) == ""
    assert completion_text("C") == "C"


def test_groups_by_prompt_id_then_by_prompt_text():
    # two prompts' completions interleaved: prompt 1 answers A A A B, prompt 2 answers A B C C
    answers = ["A", "A", "A", "B", "A", "C", "B", "C"]
    ids = [1, 2, 1, 2, 1, 2, 1, 2]
    r_ent1 = (0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    r_ent2 = (0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5)) / math.log(3)
    group1 = {"A": 0.75 + 0.75 * r_ent1, "B": 0.25 + 0.75 * r_ent1}
    group2 = {"A": 0.25 + 0.75 * r_ent2, "B": 0.25 + 0.75 * r_ent2, "C": 0.5 + 0.75 * r_ent2}
    expected = [(group1 if g == 1 else group2)[a] for a, g in zip(answers, ids)]
    # prompt_id wins over the prompt text (here the same text for both)
    _close(ttrv_reward(answers, prompts=["same text"] * 8, prompt_id=ids), expected)
    # without prompt_id, the prompt text groups
    _close(ttrv_reward(answers, prompts=[f"prompt {g}" for g in ids]), expected)
    # the same text for all makes one group of 8
    pooled = ttrv_reward(answers, prompts=["same text"] * 8)
    assert pooled != pytest.approx(expected)


def test_same_question_about_different_images_makes_different_groups():
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    answers = ["A", "A", "A", "B", "A", "B", "B", "B"]
    images = [red] * 4 + [Image.new("RGB", (8, 8), "blue")] + [blue] * 3  # a copy of blue still groups with blue
    got = frequency_reward(answers, prompts=["What colour?"] * 8, image=images)
    _close(got, [0.75, 0.75, 0.75, 0.25, 0.25, 0.75, 0.75, 0.75])
    _close(frequency_reward(answers, prompts=["What colour?"] * 8), [0.5] * 8)


def test_choices_column_reads_letters():
    completions = ["The answer is (B)", "b", "dog", "B. dog", "A", "cat, I think", "(c)", "no idea"]
    choices = [["cat", "dog", "bird"]] * 4 + ["cat, dog, bird"] * 4  # a list, or one comma-separated string
    # answers: B B B B A A C None -> p(B) 0.5, p(A) 0.25, p(C) 0.125
    got = frequency_reward(completions, prompts=["Which animal?"] * 8, choices=choices)
    _close(got, [0.5] * 4 + [0.25] * 2 + [0.125, 0.0])
    # without choices, "B" and "b" agree as free text but "dog" does not
    _close(frequency_reward(["B", "b", "dog"], prompts=["Which animal?"] * 3), [2 / 3, 2 / 3, 1 / 3])


def test_gated_reward():
    prompts = ["q"] * 8
    # 5/8 hold A, runner-up B 2/8: share 0.625 >= 0.5, lead 0.375 >= 0.25 -> the majority gets 1
    assert gated_reward(ANSWERS, prompts=prompts) == [1.0] * 5 + [0.0] * 3
    # share 3/8 < 0.5 -> the whole group gets 0
    assert gated_reward(list("AAABBCCD"), prompts=prompts) == [0.0] * 8
    # share 4/8 passes, lead 4/8 - 3/8 = 0.125 < 0.25 fails -> 0
    assert gated_reward(list("AAAABBBC"), prompts=prompts) == [0.0] * 8
    # a looser gate through functools.partial: the majority A gets 1
    loose = functools.partial(gated_reward, gate_share=0.3, gate_margin=0.0)
    assert loose(list("AAABBCCD"), prompts=prompts) == [1.0] * 3 + [0.0] * 5
    with pytest.raises(ValueError, match="gate_share"):
        gated_reward(ANSWERS, prompts=prompts, gate_share=0.0)


def test_variants_and_names():
    prompts = ["q"] * 8
    for func in (frequency_reward, ttrv_reward, gated_reward):
        assert func.__name__ in plugin.__all__
    half = variant(ttrv_reward, alpha=0.5)
    assert half.__name__ == "ttrv_reward_alpha0.5"
    expected = [p + 0.5 * R_ENT for p in (P_A,) * 5 + (P_B,) * 2 + (0.0,)]
    _close(half(ANSWERS, prompts=prompts), expected)
    _close(functools.partial(ttrv_reward, alpha=0.5)(ANSWERS, prompts=prompts), expected)
    strict = variant(gated_reward, gate_share=0.6, gate_margin=0.1)
    assert strict.__name__ == "gated_reward_gate_margin0.1_gate_share0.6"
    # ttrv - frequency is the same within a group: the entropy term cancels under per-group normalisation
    diff = [t - f for t, f in zip(ttrv_reward(ANSWERS, prompts=prompts), frequency_reward(ANSWERS, prompts=prompts))]
    assert max(diff) - min(diff) < 1e-6


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="prompts or a prompt_id"):
        ttrv_reward(["A", "B"])
    with pytest.raises(ValueError, match="prompt_id has 1 entries for 2 completions"):
        ttrv_reward(["A", "B"], prompts=["q", "q"], prompt_id=[1])


def test_the_plugin_does_not_import_trl():
    tree = ast.parse(Path(plugin.__file__).read_text(encoding="utf-8"))
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in modules if m.split(".")[0] == "trl"]


# --- a prompt's completions split over two processes ---------------------------------------------------------------

# prompt "p" has 8 completions, 3 on rank 0 and 5 on rank 1; prompt "q" has 4, 2 on each
SPLIT = [
    (["A", "A", "B", "x", "y"], ["p", "p", "p", "q", "q"]),
    (["B", "B", "C", "B", "D", "x", "x"], ["p", "p", "p", "p", "p", "q", "q"]),
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        completions, prompts = SPLIT[rank]
        result = {
            name: func(completions, prompts=prompts)
            for name, func in (("ttrv", ttrv_reward), ("frequency", frequency_reward), ("gated", gated_reward))
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    finally:
        dist.destroy_process_group()


def test_completions_split_across_processes_get_the_single_process_rewards(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    completions = SPLIT[0][0] + SPLIT[1][0]
    prompts = SPLIT[0][1] + SPLIT[1][1]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(2)]
    for name, func in (("ttrv", ttrv_reward), ("frequency", frequency_reward), ("gated", gated_reward)):
        single = func(completions, prompts=prompts)
        assert ranks[0][name] + ranks[1][name] == pytest.approx(single, abs=1e-6), name
        assert len(ranks[0][name]) == 5 and len(ranks[1][name]) == 7
    # p: A A B | B B C B D -> p(A) = 2/8 (rank 0 alone: 2/3); the majority is B (4/8, leading by 2/8: the gate
    # passes), not rank 0's A; q: x y | x x -> x holds 3/4 and leads by 1/2
    assert ranks[0]["frequency"][:3] == pytest.approx([2 / 8, 2 / 8, 4 / 8])
    assert ranks[0]["gated"] == [0.0, 0.0, 1.0, 1.0, 0.0]
    assert ranks[1]["gated"] == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0]


# --- end to end: TRL's GRPOTrainer ---------------------------------------------------------------------------------


def _example():
    spec = importlib.util.spec_from_file_location("trl_grpo_ttrv", ROOT / "examples" / "trl_grpo_ttrv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # TRL 1.16 calls it
def test_grpo_trainer_trains_on_the_ttrv_reward(tmp_path):
    pytest.importorskip("trl")
    import torch

    example = _example()
    model, tokenizer = example.tiny_model(seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = example.trainer(model, tokenizer, str(tmp_path), reward=ttrv_reward, steps=2)
    trainer.train()
    logs = [record for record in trainer.state.log_history if "reward" in record]
    assert len(logs) == 2 and all("rewards/ttrv_reward/mean" in record for record in logs)
    assert all(-0.81 < record["reward"] <= 1.0 for record in logs)  # TTRV rewards lie in [-0.80, 1]
    assert any(record["frac_reward_zero_std"] < 1 for record in logs)  # some group carried a signal
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert changed
