"""Data-parallel transductive adaptation over ``torch.distributed``: who does which share, and the collectives.

A run launched by ``torchrun`` or ``accelerate launch`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` in the
environment, ``launch_from_env``) initialises one process group (``init``: gloo on CPU, NCCL on CUDA with the
device ``cuda:LOCAL_RANK``); the loop then asks ``current()`` for its ``Group``. A single process never touches
``torch.distributed``: ``current()`` returns ``SINGLE``, whose methods are pass-throughs, so a run without a launcher
computes exactly what it computed before this module existed.

What each rank does with P ranks (``rl/loop.py``, ``rl/update.py``):

- every rank holds the whole set of prepared inputs and the same schedule (``rl/schedule.py``, seeded by the run);
  a step's B inputs are split into P contiguous blocks in schedule order (``shard``: rank r takes positions
  [r * B // P ...), the first B mod P ranks one more), and each input is sampled with the seed of its position in
  the step (``item_seed``), never of the rank, so it draws the same rollouts as in a P=1 run;
- each rank computes its groups' rewards, log-probs and backward, with the loss divided by the step's GLOBAL token
  count (the all-reduced ``batch_normalizer``), then the LoRA gradients are all-reduced (SUM) in one flat buffer per
  dtype; a parameter that no rank gave a gradient keeps ``grad=None`` (AdamW skips it, as in a P=1 run). The
  NaN/Inf guard, gradient clipping and the optimizer step then see the same gradients on every rank, so every rank
  takes the same decision and holds the same weights without any broadcast. "No informative group" is decided on
  the all-reduced count, so no rank skips a collective the others enter;
- answering before and after, and the collapse guard's sampling, are split the same way; the answers and
  observations are all-gathered in input order, so every rank's guard sees all of them and decides alike;
- rank 0 alone writes the adapter, the checkpoints and the JSON document; a resumed run is read by rank 0 and
  broadcast, so only rank 0 needs the checkpoint folder.

Exactness. Per micro-batch the terms are the P=1 run's own, bit for bit (same rollouts, same global normalizer);
only the association of the fp32 sum changes: P=1 accumulates ``((g1 + g2) + g3) + g4`` into ``.grad``, P=2 with
two inputs per rank adds ``(g1 + g2) + (g3 + g4)``. With P=2 and one input per rank and step (``--batch-size`` 2,
``--views 1``, the input's rollouts in one micro-batch) the sum is ``g1 + g2`` either way and the run ends
bit-identical to P=1 (tested); otherwise the adapters differ by fp32 rounding, which AdamW amplifies in near-zero
gradient components: 2e-8 on the tiny test model and 1.9e-7 on the demo model at the default lr (tested within 1e-5),
4e-5 on the tiny model at lr 0.05. Equal thread counts matter too: CPU kernels may split reductions across threads.

Deviations, and why: inputs are prepared (decoded and processed) on every rank, as a P=1 run prepares them, so a
rank holds the whole set (what is divided is the sampling and the backward, which dominate); an input that fails on
any rank is skipped on all of them and reported with the ranks it failed on, so the ranks keep one schedule. The
communication time (``comm_seconds``) includes the wait for the slowest rank at each collective.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import torch

__all__ = [
    "SINGLE",
    "Group",
    "Launch",
    "SharedError",
    "current",
    "device_for",
    "init",
    "joined",
    "launch_from_env",
    "shutdown",
]

T = TypeVar("T")


class SharedError(ValueError):
    """A user error every rank raises alike (same options, inputs or checkpoint): only rank 0 prints it."""


@dataclass(frozen=True)
class Launch:
    """This process's place in a multi-process launch."""

    rank: int
    world_size: int
    local_rank: int


def launch_from_env(environ=None) -> Launch | None:
    """The launch torchrun or accelerate launch describe in ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; None for a
    single process (``WORLD_SIZE`` unset or 1)."""
    env = os.environ if environ is None else environ
    if int(env.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise ValueError("WORLD_SIZE > 1 needs integer RANK and WORLD_SIZE (start the run with torchrun)") from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return Launch(rank, world, local)


class Group:
    """The ranks of one run: this rank's share of a step, and the collectives the loop needs (module docstring).

    With ``world_size`` 1 every method is a pass-through that leaves the values exactly as a P=1 run computes them.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None, backend: str = ""):
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.device = device or torch.device("cpu")
        self.comm_seconds = 0.0
        self.collectives = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, count: int) -> range:
        """This rank's contiguous block of ``count`` positions (the first ``count mod P`` ranks take one more)."""
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    @contextmanager
    def _timed(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.comm_seconds += time.perf_counter() - start
            self.collectives += 1

    # ---------------------------------------------------------------- numbers

    def sum(self, values: Sequence[float]) -> list[float]:
        """The element-wise sum of ``values`` over the ranks (float64)."""
        if not self.enabled:
            return list(values)
        from torch import distributed as dist

        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        with self._timed():
            dist.all_reduce(tensor)
        return tensor.tolist()

    def mean(self, values: Sequence[float]) -> float:
        """The mean of every rank's ``values`` together (P=1: ``sum(values) / len(values)``)."""
        if not self.enabled:
            return sum(values) / len(values)
        total, count = self.sum([sum(values), len(values)])
        return total / count

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank."""
        return flag if not self.enabled else self.sum([float(flag)])[0] > 0

    def max_or_none(self, value: float | None) -> float | None:
        """The largest ``value`` over the ranks, None when every rank has None."""
        if not self.enabled:
            return value
        from torch import distributed as dist

        tensor = torch.tensor([float("-inf") if value is None else value], dtype=torch.float64, device=self.device)
        with self._timed():
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        best = float(tensor)
        return None if best == float("-inf") else best

    # ---------------------------------------------------------------- gradients

    def all_reduce_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum every parameter's ``.grad`` over the ranks, in place (one flat buffer per dtype). A parameter that no
        rank gave a gradient keeps ``grad=None``; one that some ranks did gets zeros from the others."""
        if not self.enabled:
            return
        from torch import distributed as dist

        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        with self._timed():
            dist.all_reduce(has)
        had = has.tolist()
        for dtype in sorted({p.dtype for p in params}, key=str):
            members = [(i, p) for i, p in enumerate(params) if p.dtype == dtype]
            flat = torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for _, p in members]
            ).to(self.device)
            with self._timed():
                dist.all_reduce(flat)
            offset = 0
            for i, p in members:
                part = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                p.grad = part.to(p.device) if had[i] > 0 else None

    # ---------------------------------------------------------------- objects

    def gather(self, local: list) -> list:
        """Every rank's ``local`` list, concatenated in rank order (with ``shard``: input order), on every rank."""
        if not self.enabled:
            return list(local)
        from torch import distributed as dist

        parts: list = [None] * self.world_size
        with self._timed():
            dist.all_gather_object(parts, list(local))
        return [x for part in parts for x in part]

    def from_main(self, work: Callable[[], T]) -> T:
        """``work()`` run by rank 0 and its result sent to every rank; a ValueError there is raised on every rank
        (as ``SharedError``), so no rank waits for a rank that stopped."""
        if not self.enabled:
            return work()
        from torch import distributed as dist

        box: list = [None]
        if self.is_main:
            try:
                box[0] = ("ok", work())
            except ValueError as error:
                box[0] = ("error", str(error))
        with self._timed():
            dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise SharedError(value)
        return value

    def barrier(self) -> None:
        if self.enabled:
            from torch import distributed as dist

            with self._timed():
                dist.barrier()

    def report(self) -> dict:
        """What the run's JSON says about the ranks: their number, the backend and the time spent in collectives."""
        return {
            "world_size": self.world_size,
            "backend": self.backend,
            "comm_seconds": round(self.comm_seconds, 4),
            "collectives": self.collectives,
        }


SINGLE = Group()
_GROUPS: dict[int, Group] = {}


def current() -> Group:
    """The ``Group`` of the default process group when one with more than one rank is initialised, else ``SINGLE``."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return SINGLE
    from torch import distributed as dist

    world = dist.get_world_size()
    if world <= 1:
        return SINGLE
    key = id(dist.group.WORLD)
    if key not in _GROUPS:
        backend = str(dist.get_backend())
        device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        _GROUPS[key] = Group(dist.get_rank(), world, device, backend)
    return _GROUPS[key]


def init(launch: Launch) -> Group:
    """Join the launch's process group: NCCL with ``cuda:LOCAL_RANK`` when CUDA is available, gloo on CPU
    (``TTRV_EDGE_DIST_BACKEND`` overrides). Returns ``current()``."""
    from torch import distributed as dist

    backend = os.environ.get("TTRV_EDGE_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size)
    return current()


@contextmanager
def joined(launch: Launch | None, teardown: bool = True):
    """``init(launch)`` for the body, then ``shutdown``; ``SINGLE`` (and nothing else) without a launch.

    After a body that ended well every rank meets at a barrier first. ``teardown=False`` (the command line) leaves the
    group open for ``leave``: destroying a gloo group, or letting the interpreter finalize with one, aborted a rank
    now and then after its work was done ("terminate called without an active exception", seen in about 1 of 15
    two-rank test runs). After a failure there is no barrier (the other ranks may never come; torchrun stops them)."""
    if launch is None:
        yield SINGLE
        return
    group = init(launch)
    try:
        yield group
    except BaseException:
        if teardown:
            shutdown()
        raise
    group.barrier()
    if teardown:
        shutdown()


def leave(code: int) -> NoReturn:
    """End this rank's process with ``code`` once its output is flushed, without tearing the process group down or
    finalizing the interpreter (see ``joined``); torchrun collects the exit codes."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed stream: nothing left to flush
            pass
    os._exit(code)


def device_for(launch: Launch | None) -> str | None:
    """The device a rank's model loads on: ``cuda:LOCAL_RANK`` on a CUDA launch, else the default (None)."""
    if launch is None or not torch.cuda.is_available():
        return None
    return f"cuda:{launch.local_rank}"


def shutdown() -> None:
    """Leave the process group, if one is initialised (no barrier: after a failure the other ranks may never come)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch import distributed as dist

        _GROUPS.clear()
        dist.destroy_process_group()
