"""Train the demo VLM from scratch on clean synthetic scenes (``ttrv-edge demo-train``) on a CPU.

The model is a tiny Idefics3 (SmolVLM family) built by ``ttrv_edge.models.builders.build_tiny_vlm`` with the scene words
in its vocabulary, so the same loading and adaptation code path serves SmolVLM-256M. Recipe:

- constant AdamW learning rate 1e-3, batch 32, no warm-up/cosine schedule (a warm-up+cosine recipe stayed near
  chance in our runs);
- the answer is a short text "<colour> <shape> (<letter>)" / "<number> (<letter>)" (see ``scenes``): the model
  names the content first and never has to bind a letter to an image directly (what kept the single-letter recipe
  at chance with shuffled choices); ``fixed_steps`` still offers the fixed-order curriculum for the first steps;
- calibration: the decisive word's target is smoothed over the other words of its pool (shapes, colours or numbers;
  ``--smoothing``), not over the whole vocabulary, so sampled rollouts keep their format while the answer keeps
  some probability on its alternatives; training stops early once the held-out accuracy reaches ``--target-acc``
  (an over-trained model is over-confident under shift and gives TTRV no signal);
- an auxiliary vision probe (``AuxHead``, training only, discarded) on the image tokens, trained alone with the
  vision tower and connector for ``vision_steps`` first (cheap steps, no language model), then beside the answer loss;
- the vision tower's learned position embeddings start as 2D sin-cos positions at unit scale (MAE-style) instead of
  N(0, 0.02): from the default start a from-scratch SigLIP tower stayed at chance on shape for 1500 steps even with
  a direct shape loss, because the positions are too faint beside the patch embeddings and it sees a bag of
  patches; with sin-cos positions the same tower reached 0.77 shape accuracy in 1500 steps (measured, 5 min);
- no augmentation with any benchmark corruption: the shift benchmark's corruptions are never seen in training.

How the shipped model was made (``model/train_log.json``): ``ttrv-edge demo-train`` with its defaults on 2 idle CPU
cores, 25.4 min in all. The 3000 vision warm-up steps (10.4 min) brought the probe to shape 0.715, colour 1.0,
count 0.816 on held-out scenes; the 3000 joint steps then reached a teacher-forced answer-word accuracy of 0.92
(shape 0.905, colour 0.976, count 0.886; the 256-scene check moves by +-0.05 between checks, mostly on count). The
target 0.97 was not reached, so it ran all steps. Greedy accuracy on the 256 clean benchmark scenes: 0.918.
The letter after the answer word is right only about 20% of the time (``full_acc``): extraction reads the word.

Scenes come from seeds >= 1_000_000 (training) and 500_000.. (validation); the benchmark uses seeds below 500_000.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .scenes import COLOURS, COUNT_WORDS, SHAPES, Scene, make_scene, scene_words

TRAIN_SEED0 = 1_000_000
VAL_SEED0 = 500_000
MODEL_DIR = Path(__file__).parent / "model"


def pixels(images) -> torch.Tensor:
    """The Idefics3 pixel values [B, 1, 3, H, W] of RGB images, as its image processor computes them for 64 px
    inputs without splitting (rescale to [0, 1], normalise with mean 0.5 and std 0.5)."""
    arrays = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    return torch.from_numpy((arrays - 0.5) / 0.5).permute(0, 3, 1, 2).unsqueeze(1).contiguous()


class Encoder:
    """Turns scenes into padded training batches; prompt token ids are cached per prompt text."""

    def __init__(self, processor):
        from PIL import Image

        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.dummy = Image.new("RGB", (64, 64))
        self.cache: dict[str, list[int]] = {}
        self.eos = self.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
        self.pad = self.tokenizer.pad_token_id
        pool_words = {"shape": SHAPES, "colour": tuple(COLOURS), "count": COUNT_WORDS}
        self.pools = {k: [self.tokenizer.convert_tokens_to_ids(w) for w in v] for k, v in pool_words.items()}

    def prompt_ids(self, prompt: str) -> list[int]:
        if prompt not in self.cache:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            self.cache[prompt] = self.processor(images=[self.dummy], text=[text])["input_ids"][0]
        return list(self.cache[prompt])

    def example(self, scene: Scene) -> tuple[list[int], list[int], int, str]:
        """(prompt ids, target ids incl. EOS, index of the decisive target token, its pool)."""
        target = self.tokenizer(scene.target, add_special_tokens=False)["input_ids"] + [self.eos]
        decisive = 0 if scene.kind in ("count", "colour") else 1
        return self.prompt_ids(scene.question.prompt()), target, decisive, scene.kind

    def batch(self, scenes: list[Scene], images) -> dict:
        rows = [self.example(s) for s in scenes]
        length = max(len(p) + len(t) for p, t, _, _ in rows)
        ids = torch.full((len(rows), length), self.pad, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        attention = torch.zeros_like(ids)
        decisive = torch.zeros(len(rows), dtype=torch.long)
        pool_ids = torch.zeros(len(rows), len(SHAPES), dtype=torch.long)
        for i, (prompt, target, k, pool) in enumerate(rows):
            seq = prompt + target
            ids[i, : len(seq)] = torch.tensor(seq)
            attention[i, : len(seq)] = 1
            labels[i, len(prompt) - 1 : len(seq) - 1] = torch.tensor(target)  # position t predicts token t+1
            decisive[i] = len(prompt) - 1 + k
            words = self.pools[pool]
            pool_ids[i, : len(words)] = torch.tensor(words)
            pool_ids[i, len(words) :] = words[0]
        pv = pixels(images)
        return {
            "input_ids": ids,
            "attention_mask": attention,
            "pixel_values": pv,
            "pixel_attention_mask": torch.ones(pv.shape[0], 1, pv.shape[-2], pv.shape[-1], dtype=torch.bool),
            "labels": labels,
            "decisive": decisive,
            "pool_ids": pool_ids,
        }


class AuxHead(torch.nn.Module):
    """Training-only probe on the image tokens (the connector's output): shape and colour of the largest object and
    the object count. It gives the from-scratch vision tower a direct gradient for spatial features; without it
    the language loss alone taught colour in minutes but left shape and count at chance for 1100 steps (measured).
    It is discarded after training: the shipped model is a plain Idefics3."""

    def __init__(self, model):
        super().__init__()
        config = model.config
        tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2 // config.scale_factor**2
        self.linear = torch.nn.Linear(tokens * config.text_config.hidden_size, len(SHAPES) + len(COLOURS) + 4)
        self.features = None
        model.model.connector.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.features = output

    def encode(self, model, images) -> None:
        """Run the vision tower and connector alone on ``images`` (the hook keeps the features for ``heads``)."""
        inner = model.model
        inner.connector(inner.vision_model(pixel_values=pixels(images)[:, 0]).last_hidden_state)

    def heads(self, scenes: list[Scene]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(logits, targets) of the shape, colour and count heads for the features of the last forward."""
        logits = self.linear(self.features.reshape(len(scenes), -1).float())
        n_shape, n_colour = len(SHAPES), len(COLOURS)
        return {
            "shape": (logits[:, :n_shape], torch.tensor([SHAPES.index(s.largest.shape) for s in scenes])),
            "colour": (
                logits[:, n_shape : n_shape + n_colour],
                torch.tensor([list(COLOURS).index(s.largest.colour) for s in scenes]),
            ),
            "count": (logits[:, n_shape + n_colour :], torch.tensor([len(s.objects) - 1 for s in scenes])),
        }

    def loss(self, scenes: list[Scene]) -> torch.Tensor:
        return sum(torch.nn.functional.cross_entropy(logits, y) for logits, y in self.heads(scenes).values())


def loss_and_accuracy(model, batch: dict, smoothing: float) -> tuple[torch.Tensor, float, float]:
    """Token cross-entropy on the answer, the decisive token smoothed over its pool; returns (loss, decisive token
    accuracy, whole-answer token accuracy) with teacher forcing."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")}
    logits = model(**inputs).logits.float()
    labels = batch["labels"]
    logp = torch.log_softmax(logits, dim=-1)
    mask = labels != -100
    token_nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(labels.shape[0])
    pos = batch["decisive"]
    pool_logp = logp[rows, pos].gather(-1, batch["pool_ids"])  # duplicates of the first word pad short pools
    correct = labels[rows, pos]
    pool_nll = -(pool_logp.mean(-1))
    smooth_extra = torch.zeros_like(token_nll)
    smooth_extra[rows, pos] = smoothing * (pool_nll - token_nll[rows, pos])
    loss = ((token_nll + smooth_extra) * mask).sum() / mask.sum()
    pred = logits.argmax(-1)
    decisive_acc = float((pred[rows, pos] == correct).float().mean())
    token_ok = ((pred == labels) | ~mask).all(-1).float().mean()
    return loss, decisive_acc, float(token_ok)


def sincos_positions(side: int, dim: int) -> torch.Tensor:
    """2D sin-cos position embeddings [side * side, dim] (row-major patches, as Idefics3's vision embeddings)."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
    x, y = xs.flatten()[:, None] * omega, ys.flatten()[:, None] * omega
    table = torch.cat([torch.sin(x), torch.cos(x), torch.sin(y), torch.cos(y)], dim=1)
    return torch.nn.functional.pad(table, (0, dim - table.shape[1]))


def init_positions(model) -> None:
    """Start the vision tower's position embeddings at 2D sin-cos values (see the module docstring)."""
    embeddings = model.model.vision_model.embeddings
    weight = embeddings.position_embedding.weight
    with torch.no_grad():
        weight.copy_(sincos_positions(embeddings.num_patches_per_side, weight.shape[1]))


def _vision_warmup(model, aux, scenes, images, steps, batch_size, lr, rng, log, started) -> None:
    """Train the vision tower + connector + probe on the probe loss alone (no language model in the step)."""
    inner = model.model
    params = list(inner.vision_model.parameters()) + list(inner.connector.parameters()) + list(aux.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for step in range(1, steps + 1):
        idx = rng.sample(range(len(scenes)), batch_size)
        aux.encode(model, [images[i] for i in idx])
        loss = aux.loss([scenes[i] for i in idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 100 == 0:
            log(f"vision step {step} probe loss {loss.item():.3f} {time.perf_counter() - started:.0f}s")


def _scene_pool(start: int, count: int, fixed: bool = False) -> tuple[list[Scene], list]:
    scenes = [make_scene(start + i, shuffle=not fixed) for i in range(count)]
    return scenes, [s.image() for s in scenes]


def train(
    out_dir: str | Path = MODEL_DIR,
    *,
    steps: int = 3000,
    batch_size: int = 32,
    lr: float = 1e-3,
    hidden: int = 128,
    layers: int = 3,
    smoothing: float = 0.1,
    target_acc: float = 0.97,
    fixed_steps: int = 0,
    pool_size: int = 12000,
    eval_every: int = 100,
    seed: int = 0,
    threads: int | None = None,
    init: str | Path | None = None,
    aux_weight: float = 1.0,
    vision_steps: int = 3000,
    vision_batch_size: int = 64,
    log=print,
) -> dict:
    """Build and train the demo model, save it (fp16 safetensors + tokenizer + processor) to ``out_dir``.

    Stops after ``steps`` or once the held-out decisive-token accuracy reaches ``target_acc`` (checked every
    ``eval_every`` steps on 256 validation scenes, or when a file ``<out_dir>.stop`` appears); a checkpoint is saved
    to ``<out_dir>.ckpt`` at every check. ``init``: start from that model folder's weights (no position init, no
    vision warm-up). ``vision_steps``: probe-only steps of the vision tower before the answer loss joins.
    Returns a summary dict (also written to train_log.json).
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("hidden", hidden), ("layers", layers)):
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= smoothing < 1:
        raise ValueError(f"--smoothing must be in [0, 1), got {smoothing}")
    from transformers import AutoModelForImageTextToText

    from ..models.builders import build_tiny_vlm
    from ..models.processors import load_processor

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out_dir)
    work = out.with_name(out.name + ".building")
    shutil.rmtree(work, ignore_errors=True)
    build_tiny_vlm(
        work, "idefics3", seed=seed, words=scene_words(), image_size=64, hidden=hidden, layers=layers, patch=8
    )
    processor = load_processor(work)
    model = AutoModelForImageTextToText.from_pretrained(init or work, dtype=torch.float32)
    model.train()
    if init is None:
        init_positions(model)
    encoder = Encoder(processor)
    started = time.perf_counter()
    scenes, images = _scene_pool(TRAIN_SEED0, pool_size)
    fixed_scenes = _scene_pool(TRAIN_SEED0, min(pool_size, 4096), fixed=True)[0] if fixed_steps else None
    val_scenes, val_images = _scene_pool(VAL_SEED0, 256)
    log(f"data: {pool_size} training scenes in {time.perf_counter() - started:.0f} s")
    warmup_steps = vision_steps if init is None else 0  # a model given by ``init`` has a trained vision tower
    aux = AuxHead(model) if aux_weight > 0 or warmup_steps > 0 else None
    rng = random.Random(seed)
    if warmup_steps > 0:
        _vision_warmup(model, aux, scenes, images, warmup_steps, vision_batch_size, lr, rng, log, started)
        log(f"VAL after vision warm-up: probe {probe_accuracy(model, aux, val_scenes, val_images)}")
    params = list(model.parameters()) + (list(aux.parameters()) if aux else [])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    history = []
    best = None
    for step in range(1, steps + 1):
        source = fixed_scenes if fixed_scenes and step <= fixed_steps else scenes
        idx = rng.sample(range(len(source)), batch_size)
        batch = encoder.batch([source[i] for i in idx], [images[i] for i in idx])
        loss, acc, full = loss_and_accuracy(model, batch, smoothing)
        if aux is not None and aux_weight > 0:
            loss = loss + aux_weight * aux.loss([source[i] for i in idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 20 == 0:
            log(
                f"step {step} loss {loss.item():.3f} acc {acc:.3f} full {full:.3f} {time.perf_counter() - started:.0f}s"
            )
        if step % eval_every == 0 or step == steps:
            val = evaluate_teacher_forced(model, encoder, val_scenes, val_images, smoothing)
            history.append({"step": step, "seconds": round(time.perf_counter() - started, 1), **val})
            log(f"VAL step {step}: {val}")
            _checkpoint(model, processor, work, out, step)
            if val["decisive_acc"] >= target_acc or (out.with_name(out.name + ".stop")).exists():
                best = step
                break
    model.eval()
    summary = {
        "steps": step,
        "stopped_early": best is not None,
        "seconds": round(time.perf_counter() - started, 1),
        "history": history,
        "recipe": dict(
            aux_weight=aux_weight,
            vision_steps=warmup_steps,
            vision_batch_size=vision_batch_size,
            init=str(init) if init else None,
            batch_size=batch_size,
            lr=lr,
            hidden=hidden,
            layers=layers,
            smoothing=smoothing,
            target_acc=target_acc,
            fixed_steps=fixed_steps,
            pool_size=pool_size,
            seed=seed,
        ),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    _save(model, processor, work, out, summary)
    return summary


@torch.no_grad()
def probe_accuracy(model, aux: AuxHead, scenes, images) -> dict:
    """The vision probe's accuracy on shape, colour and count of the largest object (a vision-tower diagnostic)."""
    aux.encode(model, images)
    heads = aux.heads(scenes)
    return {k: round(float((logits.argmax(-1) == y).float().mean()), 3) for k, (logits, y) in heads.items()}


@torch.no_grad()
def evaluate_teacher_forced(model, encoder: Encoder, scenes, images, smoothing: float, chunk: int = 128) -> dict:
    """Teacher-forced accuracy of the decisive answer word (overall and per question kind) and of the whole answer."""
    was_training = model.training
    model.eval()
    out = {}
    for kind in (None, "shape", "colour", "count"):
        chosen = [i for i, s in enumerate(scenes) if kind is None or s.kind == kind]
        accs, fulls, losses = [], [], []
        for i in range(0, len(chosen), chunk):
            part = chosen[i : i + chunk]
            batch = encoder.batch([scenes[j] for j in part], [images[j] for j in part])
            loss, acc, full = loss_and_accuracy(model, batch, smoothing)
            accs.append(acc * len(part))
            fulls.append(full * len(part))
            losses.append(float(loss) * len(part))
        n = max(len(chosen), 1)
        if kind is None:
            out.update(decisive_acc=round(sum(accs) / n, 4), full_acc=round(sum(fulls) / n, 4))
            out["loss"] = round(sum(losses) / n, 4)
        else:
            out[f"acc_{kind}"] = round(sum(accs) / n, 3)
    model.train(was_training)
    return out


def _checkpoint(model, processor, work: Path, out: Path, step: int) -> None:
    """Save the current weights (fp32) beside the output, so a run can be inspected or stopped without loss."""
    ckpt = out.with_name(out.name + ".ckpt")
    model.save_pretrained(ckpt, safe_serialization=True)
    processor.save_pretrained(ckpt)
    (ckpt / "step.txt").write_text(str(step))


def _save(model, processor, work: Path, out: Path, summary: dict) -> None:
    model.to(torch.float16)
    model.save_pretrained(work, safe_serialization=True)
    processor.save_pretrained(work)
    (work / "train_log.json").write_text(json.dumps(summary, indent=1))
    (work / "ttrv_tiny.json").unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)


def main() -> None:  # python -m ttrv_edge.demo.train [out_dir] [steps]
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else str(MODEL_DIR)
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    summary = train(out, steps=steps, log=lambda m: print(m, flush=True))
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))


if __name__ == "__main__":
    main()
