"""Answer questions about images with an exported ttrv-edge model on onnxruntime, without torch.

This module and everything it imports (``families``, ``preprocess``, ``io.answers``, ``io.images``) stay free of
torch and transformers: an exported model answers with onnxruntime, numpy, pillow, tokenizers and jinja2 only
(tests/test_export.py runs it in a subprocess and checks ``sys.modules``).

    runner = OnnxVLM("exported/")
    result = runner.answer("photo.jpg", Question("Which shape is red?", choices=("circle", "square")))

Decoding is greedy with the KV cache: the vision graph once, then one decoder run over the whole prompt (the graph
writes the image features into the image-token rows) with an empty past, then one run per new token. It reproduces
``transformers``' greedy ``generate`` as ttrv-edge calls it: the manifest's suppressed tokens (image placeholders,
padding) get -inf logits, generation stops at the first EOS id (kept in ``token_ids``, dropped from the text).
Other logits processors a model's generation config might ask for (repetition penalty, ...) are not applied.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io.answers import Question
from ..io.images import image_label, load_images
from .families import runtime_family
from .preprocess import ChatPrompt, Prepared

__all__ = ["Generation", "OnnxVLM", "answer_report", "load_manifest"]

FORMAT = "ttrv-edge-onnx/1"
GRAPHS = ("vision", "decoder")


def load_manifest(directory: str | Path) -> dict:
    """The export manifest of ``directory``, checked for format and files (ValueError naming --onnx otherwise)."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"--onnx: {directory} has no manifest.json (create one with `ttrv-edge export`)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"--onnx: {path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


@dataclass
class Generation:
    """One greedy completion: its text, token ids (EOS included when reached), and per-step logits if asked."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    seconds: float
    logits: list[np.ndarray] = field(default_factory=list)


class OnnxVLM:
    """An exported VLM on onnxruntime: preprocessing, greedy decoding with the KV cache, answer extraction."""

    def __init__(self, directory: str | Path, *, int8: bool = False, threads: int | None = None):
        import onnxruntime as ort

        self.directory = Path(directory)
        self.manifest = load_manifest(directory)
        self.arch = self.manifest["architecture"]
        self.family = runtime_family(self.arch)
        files = self._graph_files(int8)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        threads = threads or int(os.environ.get("TTRV_EDGE_ONNX_THREADS", "0"))
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = {
            name: ort.InferenceSession(str(self.directory / file), options, providers=["CPUExecutionProvider"])
            for name, file in files.items()
        }
        tokens = self.manifest["tokens"]
        self.eos_ids = set(tokens["eos_token_ids"])
        self.suppress = np.asarray(tokens["suppress_token_ids"], dtype=np.int64)
        self.image_token_id = int(tokens["image_token_id"])
        self.clean_up = bool(tokens.get("clean_up_tokenization_spaces"))
        self.pre = self.manifest["preprocess"]
        self.text = self.manifest["text"]
        names = self.manifest["files"]
        self.chat = ChatPrompt(self.directory, names["chat_template"], names["tokenizer"], tokens["special_tokens"])

    def _graph_files(self, int8: bool) -> dict[str, str]:
        if not int8:
            files = {name: self.manifest["graphs"][name]["file"] for name in GRAPHS}
        elif "int8" not in self.manifest:
            raise ValueError(f"--int8: {self.directory} has no int8 graphs (export with `ttrv-edge export --int8`)")
        else:
            files = {name: self.manifest["int8"][name]["file"] for name in GRAPHS}
        for file in files.values():
            if not (self.directory / file).is_file():
                raise ValueError(f"--onnx: {self.directory / file} is missing")
        return files

    # -------------------------------------------------------------------------------------------- inputs

    def prepare(self, image, text: str) -> Prepared:
        """Token ids, vision-graph inputs and position ids of one user turn (the image, or a list of images for the
        families whose runtime module has ``prepare_many``, then ``text``)."""
        images = load_images(image)
        images = images if isinstance(images, list) else [images]
        if len(images) > 1 and not hasattr(self.family, "prepare_many"):
            raise ValueError(f"image: a {self.arch} export answers about one image per prompt, got {len(images)}")
        prompt = self.chat.render(text, images=len(images))
        marker = self.pre["image_token"]
        if prompt.count(marker) != len(images):
            found = prompt.count(marker)
            raise ValueError(f"the chat template must place one image token per image ({len(images)}), found {found}")
        if len(images) > 1:
            return self.family.prepare_many(images, prompt, self.pre, self.chat, self.image_token_id)
        return self.family.prepare(images[0], prompt, self.pre, self.chat, self.image_token_id)

    def image_features(self, prepared: Prepared) -> np.ndarray:
        """Image features [n, H] for the prompt's image tokens (the vision graph's output)."""
        features = self.sessions["vision"].run(None, prepared.vision_feeds)[0]
        count = int((prepared.input_ids == self.image_token_id).sum())
        if count != features.shape[0]:
            raise ValueError(f"image: {count} image tokens but {features.shape[0]} image features")
        return features

    # -------------------------------------------------------------------------------------------- decoding

    def _decoder(self, ids, features, mask, positions, past):
        feeds = {"input_ids": ids, "image_features": features, "attention_mask": mask, "position_ids": positions}
        for i, (key, value) in enumerate(past):
            feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = key, value
        logits, *present = self.sessions["decoder"].run(None, feeds)
        return logits[0], [(present[2 * i], present[2 * i + 1]) for i in range(len(present) // 2)]

    def _step_positions(self, position: int) -> np.ndarray:
        shape = (3, 1, 1) if self.family.MROPE else (1, 1)
        return np.full(shape, position, dtype=np.int64)

    def generate(self, image, text: str, *, max_new_tokens: int = 16, return_logits: bool = False) -> Generation:
        """Greedy completion of the user turn (``image``, ``text``) with the KV cache, up to ``max_new_tokens``."""
        if max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
        started = time.perf_counter()
        prepared = self.prepare(image, text)
        features = self.image_features(prepared)
        length = prepared.input_ids.shape[1]
        kv_shape = (1, self.text["num_kv_heads"], 0, self.text["head_dim"])
        past = [(np.zeros(kv_shape, np.float32), np.zeros(kv_shape, np.float32))] * self.text["num_layers"]
        mask = np.triu(np.full((length, length), np.finfo(np.float32).min, dtype=np.float32), 1)[None, None]
        logits, past = self._decoder(prepared.input_ids, features, mask, prepared.position_ids, past)
        no_features = np.zeros((0, features.shape[1]), dtype=np.float32)
        tokens, step_logits = [], []
        for step in range(max_new_tokens):
            if return_logits:
                step_logits.append(logits.copy())
            if self.suppress.size:
                logits[self.suppress] = -np.inf
            token = int(np.argmax(logits))
            tokens.append(token)
            if token in self.eos_ids or step == max_new_tokens - 1:
                break
            ids = np.asarray([[token]], dtype=np.int64)
            mask = np.zeros((1, 1, 1, length + step + 1), dtype=np.float32)
            positions = self._step_positions(prepared.next_position + step)
            logits, past = self._decoder(ids, no_features, mask, positions, past)
        text_out = self.chat.decode([t for t in tokens if t not in self.eos_ids], clean_up_spaces=self.clean_up)
        return Generation(text_out, tokens, length, time.perf_counter() - started, step_logits)

    def answer(self, image, question: Question, *, max_new_tokens: int = 16) -> dict:
        """The greedy answer to ``question`` about ``image``: canonical answer, display form, raw text, timing."""
        result = self.generate(image, question.prompt(), max_new_tokens=max_new_tokens)
        answer = question.extract(result.text)
        return {
            "answer": answer,
            "display": question.display(answer),
            "text": result.text,
            "new_tokens": len(result.token_ids),
            "prompt_tokens": result.prompt_tokens,
            "seconds": round(result.seconds, 4),
        }


def answer_report(
    directory: str | Path,
    image,
    question: Question,
    *,
    int8: bool = False,
    max_new_tokens: int = 16,
    threads: int | None = None,
) -> dict:
    """Load the exported model in ``directory``, answer ``question`` about ``image`` (a path, or a list of paths
    for a multi-image prompt); the `answer` command's JSON."""
    started = time.perf_counter()
    if isinstance(image, (list, tuple)) and len(image) == 1:
        image = image[0]
    picture = load_images(image)  # a bad image fails before the sessions load
    runner = OnnxVLM(directory, int8=int8, threads=threads)
    loaded = time.perf_counter() - started
    result = runner.answer(picture, question, max_new_tokens=max_new_tokens)
    return {
        "onnx": str(directory),
        "image": image_label(image),
        "question": question.text,
        "kind": question.kind,
        "choices": list(question.choices) if question.choices else None,
        "int8": int8,
        **result,
        "load_seconds": round(loaded, 4),
    }
