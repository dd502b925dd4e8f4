"""Offline builders of random-weight vision-language models: tiny ones for the tests and the demo, real-size ones
for the benchmarks.

The package never downloads a model in tests, and the README's demo must run before the trained demo model exists.
So this module builds, from configs alone, a random VLM that is saved to a directory and then loads like any hub
model (``AutoModelForImageTextToText.from_pretrained(dir)`` and ``ttrv_edge.models.load_processor(dir)``).
``build_random_vlm`` builds one from transformers config fields (bench/real_size.py passes the published
hyperparameters of SmolVLM and Qwen2-VL); ``build_tiny_vlm`` from the tiny configs of ``tiny_config`` ("tiny",
"tiny-qwen2-vl"), cached by ``ensure_tiny_vlm``.

Deviations from real checkpoints, and why:

- The tokenizer is a ``tokenizers`` WordLevel model (a few hundred words), not the BPE of SmolVLM/Qwen: a BPE needs
  trained merges, a word list needs nothing. Pre-tokenization splits on whitespace, isolates punctuation and digits,
  so "The answer is (B)." becomes known words. Decoding joins words with spaces and removes the space before
  punctuation (WordPiece decoder with cleanup), which is lossy for text such as "( B )" but fine for answers. A
  config's ``vocab_size`` pads the word list with filler words, so embedding, lm_head and logits keep their size.
- Idefics3 uses ``Idefics3ImageProcessorPil`` built directly (torchvision is not installed) with image splitting
  off unless asked, so one image is ``image_seq_len`` tokens.
- The Qwen2-VL processor is saved without a video processor (the video processor needs torchvision); it is rebuilt
  from its parts by ``models.load_processor``.
- Weights are random (``torch.manual_seed(seed)``), so outputs are gibberish over the vocabulary; EOS is a real
  vocabulary token the model can sample.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch

from .processors import image_only_processor

__all__ = [
    "ARCHS",
    "BASE_WORDS",
    "build_random_vlm",
    "build_tiny_vlm",
    "ensure_tiny_vlm",
    "random_vlm_parts",
    "tiny_cache_dir",
    "tiny_config",
]

ARCHS = ("idefics3", "qwen2_vl")
CACHE_VERSION = "v1"

BASE_WORDS = (
    "the answer is a an of and or in on at to with this that what which how many where color colour shape "
    "image picture photo shows there are it its one two three four five six seven eight nine ten zero "
    "yes no true false circle square triangle star rectangle hexagon diamond ellipse oval cross heart "
    "red green blue yellow orange purple pink black white gray grey brown cyan magenta "
    "cat dog bird fish horse car tree house boat plane person flower "
    "left right top bottom center middle small large big "
    "question choices choice options option label labels number count please select pick only "
    "letter word answer correct i think see not none unknown"
).split()

PUNCTUATION = tuple(string.punctuation)

# Chat templates: SmolVLM's (Idefics3) and Qwen2-VL's, reduced to image + text content.
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

IDEFICS3_SPECIAL = {
    "bos": "<|im_start|>",
    "eos": "<end_of_utterance>",
    "pad": "<pad>",
    "unk": "<unk>",
    "extra": ["<fake_token_around_image>", "<image>", "<global-img>"]
    + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
}
QWEN2_VL_SPECIAL = {
    "bos": None,
    "eos": "<|im_end|>",
    "pad": "<|endoftext|>",
    "unk": "<unk>",
    "extra": ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
}
TEMPLATES = {"idefics3": IDEFICS3_TEMPLATE, "qwen2_vl": QWEN2_VL_TEMPLATE}
TEMPLATE_WORDS = ("User", "Assistant", "System", "user", "assistant", "system")


def _special(arch: str) -> dict:
    return IDEFICS3_SPECIAL if arch == "idefics3" else QWEN2_VL_SPECIAL


def _specials_list(spec: dict) -> list[str]:
    out = [spec["unk"], spec["pad"], spec["eos"]] + ([spec["bos"]] if spec["bos"] else []) + spec["extra"]
    return list(dict.fromkeys(out))


def _vocab_words(words) -> list[str]:
    base = list(TEMPLATE_WORDS) + list(string.ascii_uppercase) + list(string.ascii_lowercase)
    base += list(string.digits) + list(PUNCTUATION) + list(BASE_WORDS) + [w.capitalize() for w in BASE_WORDS]
    for w in words or ():
        base += _pre_tokenize(str(w))
    return list(dict.fromkeys(base))


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )


def _pre_tokenize(text: str) -> list[str]:
    return [piece for piece, _ in _pre_tokenizer().pre_tokenize_str(text)]


def _build_tokenizer(arch: str, words, template: str):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    spec = _special(arch)
    specials = _specials_list(spec)
    vocab = {tok: i for i, tok in enumerate(specials + [w for w in _vocab_words(words) if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=spec["unk"]))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(specials)
    kwargs = {"unk_token": spec["unk"], "pad_token": spec["pad"], "eos_token": spec["eos"]}
    if spec["bos"]:
        kwargs["bos_token"] = spec["bos"]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **kwargs)
    fast.add_special_tokens({"additional_special_tokens": spec["extra"]})
    if arch == "qwen2_vl":
        fast.padding_side = "left"
    return fast


def _filler_words(count: int) -> list[str]:
    """``count`` distinct lowercase letter strings (digits would be split by the pre-tokenizer)."""
    letters = string.ascii_lowercase
    words = []
    i = 0
    while len(words) < count:
        n, word = i, ""
        while True:
            word = letters[n % 26] + word
            n //= 26
            if n == 0:
                break
        words.append("zq" + word)
        i += 1
    return words


def _tokenizer(arch: str, words, vocab_size: int | None):
    """The WordLevel tokenizer of ``arch`` with ``words`` added, padded with filler words up to ``vocab_size``."""
    template = TEMPLATES[arch]
    tokenizer = _build_tokenizer(arch, words, template)
    if vocab_size and len(tokenizer) < vocab_size:
        tokenizer = _build_tokenizer(arch, [*(words or ()), *_filler_words(vocab_size - len(tokenizer))], template)
    return tokenizer


def _text_config(config: dict, tokenizer, **token_ids) -> dict:
    """The text config with a vocabulary that holds the tokenizer and the tokenizer's special ids."""
    text = dict(config["text_config"])
    text["vocab_size"] = max(text.get("vocab_size", 0), len(tokenizer))
    text.update(token_ids)
    return text


def _idefics3_parts(config: dict, settings: dict, tokenizer):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    ids = tokenizer.convert_tokens_to_ids
    text = _text_config(
        config,
        tokenizer,
        pad_token_id=ids("<pad>"),
        bos_token_id=ids("<|im_start|>"),
        eos_token_id=ids("<end_of_utterance>"),
    )
    model_config = Idefics3Config(
        vision_config=config["vision_config"],
        text_config=text,
        scale_factor=config["scale_factor"],
        image_token_id=ids("<image>"),
        pad_token_id=ids("<pad>"),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
    )
    vision = config["vision_config"]
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=settings.get("image_splitting", False),
        size={"longest_edge": settings.get("longest_edge", vision["image_size"])},
        max_image_size={"longest_edge": vision["image_size"]},
        resample=3,  # bicubic: cheaper than the default Lanczos, identical for 64 px inputs
    )
    seq_len = (vision["image_size"] // vision["patch_size"]) ** 2 // config["scale_factor"] ** 2
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len, chat_template=IDEFICS3_TEMPLATE
    )
    return Idefics3ForConditionalGeneration, model_config, processor


def _qwen2_vl_parts(config: dict, settings: dict, tokenizer):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ids = tokenizer.convert_tokens_to_ids
    text = _text_config(
        config,
        tokenizer,
        bos_token_id=ids("<|im_start|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    model_config = Qwen2VLConfig(
        vision_config=config["vision_config"],
        text_config=text,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=config.get("tie_word_embeddings", True),
    )
    vision = config["vision_config"]
    unit = vision["patch_size"] * vision["spatial_merge_size"]
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": unit * unit, "longest_edge": settings["max_pixels"]},
        patch_size=vision["patch_size"],
        temporal_patch_size=vision["temporal_patch_size"],
        merge_size=vision["spatial_merge_size"],
    )
    processor = image_only_processor(Qwen2VLProcessor)(  # its video processor needs torchvision
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_VL_TEMPLATE
    )
    return Qwen2VLForConditionalGeneration, model_config, processor


PARTS = {"idefics3": _idefics3_parts, "qwen2_vl": _qwen2_vl_parts}


def random_vlm_parts(config: dict, settings: dict | None = None, words=None):
    """(model class, model config, processor, tokenizer) of the architecture that ``config`` describes.

    ``config`` holds transformers config fields: ``model_type`` ("idefics3" or "qwen2_vl"), ``text_config``,
    ``vision_config`` and the top-level fields (``scale_factor``, ``tie_word_embeddings``); token ids come from the
    tokenizer, and ``text_config["vocab_size"]`` (if given) pads the vocabulary with filler words to that size.
    ``settings`` are image-processor settings: Idefics3 ``image_splitting`` and ``longest_edge``, Qwen2-VL
    ``max_pixels``. ``words`` are added to the vocabulary.
    """
    arch = config["model_type"]
    if arch not in PARTS:
        raise ValueError(f"no offline builder for model type {arch!r} ({', '.join(PARTS)})")
    tokenizer = _tokenizer(arch, words, config["text_config"].get("vocab_size"))
    model_cls, model_config, processor = PARTS[arch](config, settings or {}, tokenizer)
    return model_cls, model_config, processor, tokenizer


def build_random_vlm(
    out_dir: str | os.PathLike,
    config: dict,
    settings: dict | None = None,
    *,
    words=None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Build a random-weight VLM (``random_vlm_parts``; weights drawn after ``torch.manual_seed(seed)``, in
    ``dtype``) and save model (safetensors), tokenizer, processor and chat template to ``out_dir``."""
    model_cls, model_config, processor, tokenizer = random_vlm_parts(config, settings, words)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = model_cls(model_config)
    finally:
        torch.set_default_dtype(previous)
    gen = model.generation_config
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.do_sample = False
    gen.max_new_tokens = 16
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_config(arch: str, image_size: int, hidden: int, layers: int, patch: int) -> tuple[dict, dict]:
    """The (config, image-processor settings) of a tiny ``arch`` model, for ``build_random_vlm``."""
    if arch == "idefics3":
        tower = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers}
        vision = {**tower, "num_attention_heads": 4, "image_size": image_size, "patch_size": patch}
        text = {"model_type": "llama", **tower, "num_attention_heads": 4, "num_key_value_heads": 2}
        text.update(max_position_embeddings=512, tie_word_embeddings=False)
        config = {"model_type": arch, "scale_factor": 2, "tie_word_embeddings": False}
        return {**config, "text_config": text, "vision_config": vision}, {}
    heads = 4
    half = hidden // heads // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    vision = {"depth": layers, "embed_dim": hidden, "hidden_size": hidden, "num_heads": heads, "mlp_ratio": 2}
    vision.update(patch_size=patch, spatial_merge_size=2, temporal_patch_size=2)
    text = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers}
    text.update(num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=512)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}
    config = {"model_type": arch, "tie_word_embeddings": False, "text_config": text, "vision_config": vision}
    return config, {"max_pixels": image_size * image_size}


def build_tiny_vlm(
    out_dir: str | os.PathLike,
    arch: str = "idefics3",
    *,
    seed: int = 0,
    words=None,
    image_size: int = 64,
    hidden: int = 64,
    layers: int = 2,
    patch: int = 8,
) -> Path:
    """Build a tiny random VLM of ``arch`` ("idefics3" or "qwen2_vl") and save it under ``out_dir``.

    ``words`` (iterable of strings) are pre-tokenized and added to the vocabulary. The directory holds the model
    (safetensors), tokenizer, processor and chat template; returns its path.
    """
    if arch not in ARCHS:
        raise ValueError(f"--model: unknown tiny architecture {arch!r} (choose from {', '.join(ARCHS)})")
    if image_size % (2 * patch):
        raise ValueError(f"image_size: must be a multiple of 2*patch ({2 * patch}), got {image_size}")
    config, settings = tiny_config(arch, image_size, hidden, layers, patch)
    out = build_random_vlm(out_dir, config, settings, words=words, seed=seed)
    (out / "ttrv_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed, "version": CACHE_VERSION}))
    return out


def tiny_cache_dir(arch: str = "idefics3") -> Path:
    """Where ``ensure_tiny_vlm`` keeps a model: $TTRV_EDGE_CACHE or ~/.cache/ttrv-edge, then tiny-<arch>-v1."""
    root = os.environ.get("TTRV_EDGE_CACHE") or Path.home() / ".cache" / "ttrv-edge"
    return Path(root) / f"tiny-{arch.replace('_', '-')}-{CACHE_VERSION}"


def ensure_tiny_vlm(arch: str = "idefics3") -> Path:
    """Build the default tiny model of ``arch`` once into the cache directory and return its path.

    The model is built in a temporary sibling directory and renamed into place, so a crashed build never leaves a
    half-written model behind, and two processes building at once both end with a complete one.
    """
    import shutil

    path = tiny_cache_dir(arch)
    if _complete(path):
        return path
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_vlm(tmp, arch)
    if path.exists() and not _complete(path):
        shutil.rmtree(path, ignore_errors=True)
    try:
        tmp.rename(path)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _complete(path: Path) -> bool:
    return (path / "ttrv_tiny.json").is_file() and (path / "model.safetensors").is_file()
