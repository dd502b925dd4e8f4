"""Data-parallel transductive adaptation (``ttrv_edge/rl/distributed.py``): two CPU ranks over gloo, launched the way
a user launches them (``torchrun --standalone --nproc_per_node 2``), against a one-process run of the same command.

The ranks run a small worker script (written below) around ``ttrv_edge.cli.main``: answers read from the text length
(so a random model's groups carry signal), an image that only rank 1 cannot read, a rank-1 exit at a given step, and
rank 1 forbidden to write any file. Every launch has a timeout, so a hang fails instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from ttrv_edge import api as api_module
from ttrv_edge.cli import main
from ttrv_edge.io.answers import Question
from ttrv_edge.rl.distributed import SINGLE, Group, launch_from_env

LAUNCH_TIMEOUT = 240
BAD = "2.png"  # unreadable on rank 1 only

WORKER = """
import os, sys
rank = int(os.environ.get("RANK", "0"))
from ttrv_edge.io.answers import Question
Question.extract = lambda self, text: "xyz"[len(text) % 3]
if rank == 1:
    import ttrv_edge.api as api
    from ttrv_edge.io import checkpoints
    real_load = api.load_images
    def load_images(image, *args, **kwargs):
        if str(image).endswith(os.environ["BAD_ON_RANK1"]):
            raise ValueError(f"{image}: unreadable on this node")
        return real_load(image, *args, **kwargs)
    def refuse(*args, **kwargs):
        raise AssertionError("rank 1 wrote a file")
    api.load_images = load_images
    checkpoints.atomic_write_bytes = checkpoints.save_adapter = api.save_adapter = refuse
    if os.environ.get("EXIT_AT_STEP"):
        from ttrv_edge.rl.loop import AdaptationLoop
        real_step = AdaptationLoop.step
        def step(self, items, step, seed):
            if step == int(os.environ["EXIT_AT_STEP"]):
                os._exit(17)  # killed: no cleanup, no message
            return real_step(self, items, step, seed)
        AdaptationLoop.step = step
from ttrv_edge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _reads_length(self, text: str) -> str:
    return "xyz"[len(text) % 3]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Six images (five usable: one is unreadable on rank 1) and the worker script."""
    root = tmp_path_factory.mktemp("distributed")
    (root / "images").mkdir()
    for k in range(6):
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).ellipse((4 + 5 * k, 6, 28 + 5 * k, 30), fill=(220, 40 * k, 30))
        image.save(root / "images" / f"{k}.png")
    (root / "worker.py").write_text(WORKER, encoding="utf-8")
    return root


def _args(model_dir, images: Path, out: Path, *extra: str) -> list[str]:
    return [
        "adapt",
        str(images),
        "--model",
        str(model_dir),
        "--question",
        "What?",
        "--rollouts",
        "4",
        "--max-new-tokens",
        "4",
        "--out",
        str(out),
        "--json",
        *extra,
    ]


def _torchrun(workspace: Path, args: list[str], **env) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    environ = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "BAD_ON_RANK1": BAD, **env}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environ.pop(name, None)
    return subprocess.run(
        [*command, str(workspace / "worker.py"), *args],
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
        env=environ,
        cwd=workspace,
    )


def _one_process(monkeypatch, capsys, args: list[str]) -> dict:
    """The same command in this process (one rank, one thread like each torchrun rank), the same image refused."""
    real_load = api_module.load_images

    def load_images(image, *a, **k):
        if str(image).endswith(BAD):
            raise ValueError(f"{image}: unreadable on this node")
        return real_load(image, *a, **k)

    monkeypatch.setattr(api_module, "load_images", load_images)
    monkeypatch.setattr(Question, "extract", _reads_length)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(args)
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _items(report: dict) -> list[dict]:
    items = json.loads(json.dumps(report["items"]))
    for item in items:
        item["image"] = Path(item["image"]).name
        for step in item["steps"]:
            step.pop("seconds")
    return items


def _failure(run: subprocess.CompletedProcess) -> str:
    """The lines of a failed launch that say why (the ranks' errors come before torchrun's summary)."""
    keys = ("Error", "error", "terminate", "what()", "Traceback", "Signal", "rank")
    return "\n".join(line for line in run.stderr.splitlines() if any(k in line for k in keys))[-4000:]


def _document(run: subprocess.CompletedProcess) -> dict:
    """The one JSON document of a launch: stdout holds exactly one line, from rank 0."""
    done = "rank 0 had printed its JSON" if run.stdout.strip() else "rank 0 had printed nothing"
    assert run.returncode == 0, f"{done}\n{_failure(run)}"
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, run.stdout[-2000:]
    return json.loads(lines[0])


# ------------------------------------------------------------------------------------------------ unit


@pytest.mark.parametrize("count", [0, 1, 2, 3, 5, 8])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_contiguous_blocks_in_order(count, world):
    blocks = [list(Group(rank, world).shard(count)) for rank in range(world)]
    assert [i for block in blocks for i in block] == list(range(count))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_launch_is_read_from_torchrun_variables():
    assert launch_from_env({}) is None and launch_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    launch = launch_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (launch.rank, launch.world_size, launch.local_rank) == (3, 4, 1)
    with pytest.raises(ValueError, match="RANK"):
        launch_from_env({"WORLD_SIZE": "2"})
    assert not SINGLE.enabled and SINGLE.mean([1.0, 0.5]) == 0.75 and SINGLE.gather([3]) == [3]


def test_episodic_mode_under_torchrun_is_one_clear_error(monkeypatch, capsys, tmp_path, test_image):
    test_image.save(tmp_path / "one.png")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    said = {}
    for rank in ("0", "1"):  # every rank refuses; rank 0 alone says why
        monkeypatch.setenv("RANK", rank)
        assert main(["adapt", str(tmp_path / "one.png"), "--out", str(tmp_path / "out")]) == 2
        said[rank] = capsys.readouterr().err.strip().splitlines()
    assert len(said["0"]) == 1 and said["0"][0].startswith("error: episodic mode (one image) runs in one process")
    assert said["1"] == [] and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ two ranks


def test_two_ranks_end_where_one_rank_ends(workspace, tiny_idefics3_dir, monkeypatch, capsys):
    """Batch 4 (two inputs per rank, a last step of one input: rank 1 idle), views of each image: the adapter is
    the one-process adapter within 1e-5; results are in input order; the image rank 1 cannot read is skipped on both
    ranks and reported; rank 1 writes nothing (its worker fails if it tries)."""
    extra = ("--batch-size", "4", "--max-updates", "3", "--views", "2")
    two = _document(_torchrun(workspace, _args(tiny_idefics3_dir, workspace / "images", workspace / "p2", *extra)))
    one = _one_process(monkeypatch, capsys, _args(tiny_idefics3_dir, workspace / "images", workspace / "p1", *extra))
    diff = _max_diff(_adapter(workspace / "p2"), _adapter(workspace / "p1"))
    print(f"max |P=2 - P=1| over the adapter: {diff:.3g}")
    assert diff <= 1e-5
    assert one["run"]["updates_run"] >= 2 and two["run"]["updates_run"] == one["run"]["updates_run"]
    assert [i["image"] for i in _items(two)] == ["0.png", "1.png", "3.png", "4.png", "5.png"]
    assert [i["before"] for i in two["items"]] == [i["before"] for i in one["items"]]
    for ours, theirs in zip(_items(two), _items(one)):  # the same steps: the global token-mean loss, the same rewards
        assert [s["mean_reward"] for s in ours["steps"]] == [s["mean_reward"] for s in theirs["steps"]]
        assert [s["loss"] for s in ours["steps"]] == pytest.approx([s["loss"] for s in theirs["steps"]], rel=1e-5)
    assert two["run"]["diversity"][0] == one["run"]["diversity"][0]  # the guard's reference saw every input
    assert [Path(s["image"]).name for s in two["skipped"]] == [BAD]
    assert two["skipped"][0]["reason"].endswith("unreadable on this node (on rank 1 only)")
    info = two["run"]["distributed"]
    assert info["world_size"] == 2 and info["backend"] == "gloo" and len(info["peak_memory_bytes_per_rank"]) == 2


def test_one_input_per_rank_is_bit_identical_and_a_killed_rank_resumes(
    workspace, tiny_idefics3_dir, monkeypatch, capsys
):
    """Batch 2 = P, views 1, one micro-batch per input: each rank's gradient is the one-process run's term and the
    sum of two is the same fp32 sum, so the adapter is bit-identical. Rank 1 is killed before step 3; the rerun with
    --resume continues from rank 0's last checkpoint and ends with the same adapter and the same results."""
    extra = ("--batch-size", "2", "--max-updates", "6", "--views", "1", "--train-micro-batch", "4")
    images, checkpoint = workspace / "images", workspace / "ck"
    killed = _torchrun(
        workspace,
        _args(tiny_idefics3_dir, images, workspace / "k2", *extra, "--checkpoint-dir", str(checkpoint)),
        EXIT_AT_STEP="3",
    )
    assert killed.returncode != 0 and (checkpoint / "progress.json").is_file()
    assert not (workspace / "k2" / "adapter_model.safetensors").exists()
    resumed = _document(
        _torchrun(
            workspace,
            _args(tiny_idefics3_dir, images, workspace / "k2", *extra, "--checkpoint-dir", str(checkpoint), "--resume"),
        )
    )
    one = _one_process(monkeypatch, capsys, _args(tiny_idefics3_dir, images, workspace / "k1", *extra))
    assert resumed["run"]["resumed_from_step"] in (2, 3) and one["run"]["updates_run"] >= 2
    ours, theirs = _adapter(workspace / "k2"), _adapter(workspace / "k1")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert _items(resumed) == _items(one)
    assert resumed["run"]["diversity"] == one["run"]["diversity"]
