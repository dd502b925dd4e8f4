"""The TTRV adaptation loops: one step (sample, then update), the episodic loop and the transductive loop.

Deviations from the paper, and why:
- the same N rollouts are sampled and trained on (the paper samples 32 votes and trains on 16); on the edge
  every rollout costs, and the frequency estimate of N=8..16 was enough in our tests;
- episodic mode stops early when the rollouts reach consensus (the group's advantages would all be zero);
- "before" and "after" report the greedy answer and the distribution of N samples, so the effect of adaptation
  on the sampled answers (what TTRL reports) is visible beside the greedy one;
- ``views`` > 1 spreads each input's N rollouts over V views of its image (``views.py``), votes across them and
  trains every view toward the shared vote;
- not in the paper, for unattended runs (``guards.py``, ``io/checkpoints.py``): the amount of transductive
  adaptation is a budget of updates (``max_updates``), the same for any set size; the run checks, without labels,
  what the model says (answers per question, output texts, whether rollouts still end, sharpening) and stops and
  rolls back when it collapses (the failure the paper reports after long adaptation); a transductive run can be
  checkpointed and resumed to the same LoRA weights. The update itself (rewards, loss, the NaN/Inf guard) is
  ``update.py``;
- not in the paper, for sets that outgrow one device: under ``torch.distributed`` (torchrun) a transductive run is
  data-parallel (``distributed.py``): each rank samples and trains on its block of every step and answers its block
  of the inputs, the results are gathered in input order, every rank takes the same optimizer steps and guard
  decisions, and rank 0 alone writes checkpoints. Episodic runs stay single-process.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import TTRVConfig
from ..io.answers import Question, answer_distribution, majority_answer
from ..io.checkpoints import RunCheckpoint, save_adapter
from ..memory.planner import MemoryPlanner
from ..models.loading import LoadedVLM
from ..models.lora import load_lora_state, lora_state, restore_snapshot, take_snapshot
from ..models.quantize import check_loaded
from . import distributed
from .diversity import ended_flags, observe
from .guards import CollapseGuard
from .records import ItemResult, Prediction, PreparedItem, Progress, StepRecord, UpdateOutcome, consensus_of, item_seed
from .sampling import Rollouts, greedy_text, sample_rollouts
from .schedule import schedule
from .schedule import work_units as transductive_work_units
from .update import grpo_update
from .views import flip_allowed, load_rgb, make_views

__all__ = ["AdaptationLoop"]


class AdaptationLoop:
    """Runs TTRV on a loaded VLM: holds the optimizer and the snapshot of the LoRA weights to reset to."""

    last_run: dict | None = None  # what ``adapt_transductive`` reported about its last run (guards, resume)

    def __init__(self, vlm: LoadedVLM, config: TTRVConfig):
        self.vlm = vlm
        self.config = config
        self.initial_state = lora_state(vlm.model)
        self.optimizer = self._new_optimizer()
        check_loaded(vlm.model, config.quantize)
        self.memory = MemoryPlanner.for_config(vlm, config)  # micro-batch sizes, peaks, OOM back-off

    def _new_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.vlm.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable LoRA parameters")
        # the learning rate is set per mode when a run starts (``_set_lr``): the config's default depends on it
        return torch.optim.AdamW(
            params, lr=self.config.learning_rate("episodic"), weight_decay=self.config.weight_decay
        )

    def _set_lr(self, mode: str) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.learning_rate(mode)

    def reset(self) -> None:
        """Restore the LoRA weights the loop started from and forget the optimizer state."""
        load_lora_state(self.vlm.model, self.initial_state)
        self.optimizer = self._new_optimizer()

    def prepare(self, label: str, image, question: Question) -> PreparedItem:
        return PreparedItem(label, question, self.vlm.prompt_inputs(image, question.prompt()), image)

    # ------------------------------------------------------------------ answering

    def predict(self, item: PreparedItem, seed: int) -> Prediction:
        """Greedy answer and the answer distribution of N samples, with the current LoRA weights (with ``views`` > 1
        the samples are spread over the views, so ``majority`` is the view vote)."""
        text = greedy_text(self.vlm, item.inputs, max_new_tokens=self.config.max_new_tokens)
        _, answers = self.sample(item, seed)
        return self._prediction(item.question, text, answers)

    @staticmethod
    def _prediction(question: Question, greedy: str, sampled: list[str | None]) -> Prediction:
        return Prediction(
            answer=question.extract(greedy),
            distribution=answer_distribution(sampled),
            majority=majority_answer(sampled),
            text=greedy,
        )

    # ------------------------------------------------------------------ one GRPO step

    def sample(self, item: PreparedItem, seed: int) -> tuple[Rollouts | list[Rollouts], list[str | None]]:
        """N rollouts of the item and their answers. With ``views`` = V > 1 they are spread over min(V, N) views of
        its image (view 1 is the image itself; one prefill per view; N // V each, the first N mod V views one
        more): a list of ``Rollouts`` and the pooled answers, in order."""
        cfg = self.config
        if cfg.views == 1:
            rollouts = self._sample_inputs(item.inputs, cfg.rollouts, seed)
            return rollouts, [item.question.extract(t) for t in rollouts.texts]
        if item.image is None:
            raise ValueError("--views needs the item's image (prepare items with AdaptationLoop.prepare)")
        flip = flip_allowed(item.question.text)
        count = min(cfg.views, cfg.rollouts)
        images = make_views(load_rgb(item.image), count, seed, cfg.view_transforms, flip)
        groups = []
        for v, image in enumerate(images):
            inputs = item.inputs if v == 0 else self.vlm.prompt_inputs(image, item.question.prompt())
            rows = cfg.rollouts // count + (1 if v < cfg.rollouts % count else 0)
            groups.append(self._sample_inputs(inputs, rows, item_seed(seed, 100 + v)))
        return groups, [item.question.extract(t) for r in groups for t in r.texts]

    def _sample_inputs(self, inputs: dict, num: int, seed: int) -> Rollouts:
        cfg = self.config
        return sample_rollouts(
            self.vlm,
            inputs,
            num,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
            seed=seed,
            memory=self.memory,
        )

    def update(self, groups: list[tuple[Rollouts, list[str | None]]]) -> UpdateOutcome:
        """One GRPO update on the sampled groups (``rl/update.py``: rewards -> reference log-probs -> backward over
        micro-batches -> guarded optimizer step)."""
        return grpo_update(self.vlm, self.optimizer, self.memory, self.config, groups, distributed.current())

    def step(self, items: list[PreparedItem], step: int, seed: int) -> StepRecord:
        """Sample every item's rollouts, then one update on all of them (under ``torch.distributed``: this rank's
        contiguous block of ``items``, each seeded by its position in the step, and one update across the ranks)."""
        start = time.perf_counter()
        group = distributed.current()
        groups = [self.sample(items[i], item_seed(seed, i)) for i in group.shard(len(items))]
        consensus = group.mean([consensus_of(a) for _, a in groups])
        outcome = self.update(groups)
        return outcome.record(step, consensus, time.perf_counter() - start)

    # ------------------------------------------------------------------ the two modes

    def adapt_episode(
        self, item: PreparedItem, index: int = 0, progress: Progress | None = None, save_dir: Path | None = None
    ) -> ItemResult:
        """Episodic TTRV on one input: up to K steps, early stop on consensus; reset afterwards unless ``keep``.

        ``save_dir``: save the adapted LoRA weights there (safetensors) before the reset.
        """
        cfg = self.config
        self._set_lr("episodic")
        greedy_before = greedy_text(self.vlm, item.inputs, max_new_tokens=cfg.max_new_tokens)
        result = None
        steps: list[StepRecord] = []
        for k in range(cfg.steps):
            start = time.perf_counter()
            rollouts, answers = self.sample(item, item_seed(cfg.seed, 1, index, k))
            if result is None:
                result = ItemResult(
                    item.label,
                    item.question.text,
                    _choices(item.question),
                    before=self._prediction(item.question, greedy_before, answers),
                )
            consensus = consensus_of(answers)
            if consensus >= cfg.consensus:
                steps.append(StepRecord(k, None, consensus, None, time.perf_counter() - start, False, 0.0))
                if progress:
                    progress(cfg.steps - k)
                break
            outcome = self.update([(rollouts, answers)])
            steps.append(outcome.record(k, consensus, time.perf_counter() - start))
            if progress:
                progress(1)
        result.steps = steps
        updated = any(s.updated for s in steps)
        result.after = self.predict(item, item_seed(cfg.seed, 2, index)) if updated else result.before
        if progress:
            progress(1)
        if save_dir is not None:
            self.save(save_dir)
        if not cfg.keep:
            self.reset()
        return result

    def save(self, directory: Path) -> Path:
        """Save the current LoRA weights and adapter config to ``directory`` (safetensors, written atomically)."""
        return save_adapter(self.vlm.model, Path(directory))

    def adapt_transductive(
        self,
        items: list[PreparedItem],
        progress: Progress | None = None,
        checkpoint_dir: Path | None = None,
        resume: bool = False,
    ) -> list[ItemResult]:
        """Transductive TTRV: answer every input, spend the update budget on shuffled passes over the set
        (``rl/schedule.py``: ``max_updates``, or ``epochs`` passes), answer every input again.

        The collapse guard (``collapse_guard``, ``rl/guards.py``) watches what the model says across inputs (answers,
        texts, EOS) and may stop the run and roll back to its best snapshot. With ``checkpoint_dir`` the run is
        checkpointed every ``checkpoint_every`` steps, and ``resume=True`` continues from the checkpoint there (a
        fresh start when there is none); the resumed run ends with the same LoRA weights as an uninterrupted one.
        ``self.last_run`` reports the update budget, the guard's checks, any collapse (the signals that fired and the
        statistics), the skipped (non-finite) steps and where the run resumed. Under ``torch.distributed`` every rank
        calls this with the same items; rank 0 alone reads and writes the checkpoint (module docstring).
        """
        cfg = self.config
        group = distributed.current()
        self._set_lr("transductive")
        total = cfg.transductive_updates(len(items))
        store = RunCheckpoint(checkpoint_dir, cfg, [item.label for item in items]) if checkpoint_dir else None
        if store is not None and not resume:
            group.from_main(store.require_fresh)
        resumed = None
        if store is not None and resume:
            resumed = group.from_main(lambda: store.load(self.vlm.model, self.optimizer) if store.exists() else None)
            if resumed is not None and not group.is_main:  # rank 0 loaded it; the others take its weights
                restore_snapshot(self.vlm.model, self.optimizer, resumed.weights)
        if resumed is None:
            results = self._each(items, lambda i: self._answer_before(items[i], i), progress)
            start = take_snapshot(self.vlm.model, self.optimizer) if cfg.collapse_guard else None
            guard = CollapseGuard(cfg, start)
            self._check_collapse(guard, items, 0, total)  # the reference statistics, before any update
            first, stopped = 0, False
        else:
            results = [ItemResult.from_dict(r) for r in resumed.results]
            guard = CollapseGuard(cfg, None)
            guard.load_state(resumed.guard, resumed.best)
            first, stopped = resumed.next_step, resumed.stopped
            if progress:
                progress(len(items))
        for batch in schedule(cfg, len(items)):
            if batch.step >= first and not stopped:
                seed = item_seed(cfg.seed, 3, batch.epoch, batch.start)
                record = self.step([items[i] for i in batch.indices], batch.step, seed)
                for i in batch.indices:
                    results[i].steps.append(record)
                stopped = self._check_collapse(guard, items, batch.step + 1, total)
                due = stopped or (batch.step + 1) % cfg.checkpoint_every == 0
                if store is not None and group.is_main and due:
                    store.save(self.vlm.model, self.optimizer, batch.step + 1, results, guard, stopped)
            if progress:
                progress(len(batch.indices))
        after = self._each(items, lambda i: self.predict(items[i], item_seed(cfg.seed, 2, i)), progress)
        for result, prediction in zip(results, after):
            result.after = prediction
        self.last_run = {
            **guard.report(),
            "update_budget": total,
            "updates_run": sum(s.updated for s in {s.step: s for r in results for s in r.steps}.values()),
            "nonfinite_skips": sorted({s.step for r in results for s in r.steps if s.skipped}),
            "resumed_from_step": first if resumed is not None else None,
            "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None,
        }
        if group.enabled:
            self.last_run["distributed"] = group.report()
        return results

    @staticmethod
    def _each(items: list[PreparedItem], answer, progress: Progress | None) -> list:
        """``answer(i)`` for every input, in input order; under ``torch.distributed`` each rank answers its
        contiguous block and every rank gets all the answers."""
        group = distributed.current()
        mine = []
        for i in group.shard(len(items)):
            mine.append(answer(i))
            if progress:
                progress(1)
        everything = group.gather(mine)
        if progress and len(everything) > len(mine):
            progress(len(everything) - len(mine))
        return everything

    def _answer_before(self, item: PreparedItem, index: int) -> ItemResult:
        before = self.predict(item, item_seed(self.config.seed, 0, index))
        return ItemResult(item.label, item.question.text, _choices(item.question), before=before)

    def _check_collapse(self, guard: CollapseGuard, items: list[PreparedItem], steps_done: int, total: int) -> bool:
        """When due, sample the checked inputs with the current LoRA weights and let the guard judge what they say
        (answers, texts, EOS); on collapse roll back to its best snapshot and say to stop."""
        if not self.config.collapse_guard or not guard.due(steps_done, total):
            return False
        checked = guard.inputs(len(items))
        group = distributed.current()  # each rank samples its block of the checked inputs; every rank judges them all
        observations = group.gather(
            [self._observe(items[checked[j]], steps_done, checked[j]) for j in group.shard(len(checked))]
        )
        if not guard.check(steps_done, observations, self.vlm.model, self.optimizer).collapsed:
            return False
        guard.roll_back(steps_done, self.vlm.model, self.optimizer)
        return True

    def _observe(self, item: PreparedItem, steps_done: int, index: int):
        """What one checked input's N rollouts say with the current LoRA weights (answers, texts, EOS)."""
        sampled, answers = self.sample(item, item_seed(self.config.seed, 5, steps_done, index))
        groups = sampled if isinstance(sampled, list) else [sampled]  # one Rollouts per view
        ended = [e for r in groups for e in ended_flags(r.completion_ids, r.completion_mask, self.vlm.eos_token_ids)]
        return observe(item.question, [t for r in groups for t in r.texts], answers, ended)

    def memory_report(self) -> dict:
        """What the memory planner measured and chose so far (``MemoryPlanner.report``)."""
        return self.memory.report()

    def work_units(self, mode: str, num_items: int) -> int:
        """Units of ``progress`` a run will report, for sizing a progress bar."""
        if mode == "episodic":
            return num_items * (self.config.steps + 1)
        return transductive_work_units(self.config, num_items)


def _choices(question: Question) -> list[str] | None:
    return list(question.choices) if question.choices is not None else None
