"""A model's processor (image processor + tokenizer + chat template), loadable without torchvision.

Qwen2-VL, Qwen2.5-VL, InternVL and SmolVLM2 processors own a video processor that needs torchvision, which is not
installed on CPU machines. ``load_processor`` rebuilds such a processor from its image processor and tokenizer with
the video part dropped (``image_only_processor``); videos are not supported by ttrv-edge anyway.

Two transformers versions' quirks are handled the same way, by rebuilding from the parts when ``AutoProcessor``
fails: with torchvision installed, 5.17 asks for a video processor config that a folder saved image-only does not
have (OSError); without torchvision, 5.17's ``AutoImageProcessor`` refuses to load at all, so the model type's PIL
image processor is imported from its module (``image_processing_pil_<model>``) and loaded directly.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

__all__ = ["VIDEO_PROCESSOR_TYPES", "image_only_processor", "load_processor"]

# Processors whose video half needs torchvision; they are rebuilt image-only when AutoProcessor cannot load them.
VIDEO_PROCESSOR_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v", "internvl", "smolvlm")


def _model_type(path: str) -> str | None:
    config = Path(path) / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("model_type")
    return None


def image_only_processor(processor_cls):
    """A subclass of ``processor_cls`` without its video processor (which needs torchvision)."""

    class ImageOnlyProcessor(processor_cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            if "video_processor" in inspect.signature(processor_cls.__init__).parameters:
                kwargs.setdefault("video_processor", None)  # SmolVLM2's is a required argument
            super().__init__(
                image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs
            )
            self.video_processor = None

        def apply_chat_template(self, conversation, chat_template=None, **kwargs):
            """The common chat templating: SmolVLM2's override reads frame settings from the dropped video half."""
            from transformers.processing_utils import ProcessorMixin

            return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

    ImageOnlyProcessor.__name__ = processor_cls.__name__
    ImageOnlyProcessor.__qualname__ = processor_cls.__qualname__
    # the parent's signature, so that save_pretrained keeps its settings (InternVL's image_seq_length, ...)
    params = inspect.signature(processor_cls.__init__).parameters.values()
    signature = inspect.Signature([p for p in params if p.name != "video_processor"])
    ImageOnlyProcessor.__init__.__signature__ = signature
    return ImageOnlyProcessor


def _pil_image_processor_class(model_type: str):
    """The PIL image processor class of ``model_type``, imported from its own module (None when there is none)."""
    import importlib

    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
    class_name = names.get("pil") if isinstance(names, dict) else None
    if class_name is None:
        return None
    # the class may live in another model's module (InternVL uses GOT-OCR2's): try each type that names it
    for other, entry in IMAGE_PROCESSOR_MAPPING_NAMES.items():
        if class_name not in (entry.values() if isinstance(entry, dict) else [entry]):
            continue
        module = model_type_to_module_name(other)
        try:
            found = importlib.import_module(f"transformers.models.{module}.image_processing_pil_{module}")
        except ImportError:
            continue
        if hasattr(found, class_name):
            return getattr(found, class_name)
    return None


def _image_processor(path: str, model_type: str, trust_remote_code: bool):
    """``AutoImageProcessor``'s choice, else the model type's PIL image processor (transformers 5.17 without
    torchvision refuses every ``AutoImageProcessor`` call)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, ValueError):
        pil_class = _pil_image_processor_class(model_type)
        if pil_class is None:
            raise
        return pil_class.from_pretrained(path)


def _processor_from_parts(path: str, model_type: str, trust_remote_code: bool):
    import transformers
    from transformers import AutoTokenizer

    cfg_file = Path(path) / "processor_config.json"
    saved = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    cls_name = saved.get("processor_class")
    if cls_name is None:
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        cls_name = PROCESSOR_MAPPING_NAMES.get(model_type)
    processor_cls = getattr(transformers, cls_name or "", None)
    if processor_cls is None:
        raise ValueError(f"--model: no processor class for model type {model_type!r}")
    image_processor = _image_processor(path, model_type, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    template_file = Path(path) / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else getattr(tokenizer, "chat_template", None)
    rebuilt = image_only_processor(processor_cls)
    parts = ("image_processor", "tokenizer", "video_processor", "chat_template")
    settings = {k: v for k, v in saved.items() if k in inspect.signature(rebuilt).parameters and k not in parts}
    return rebuilt(image_processor=image_processor, tokenizer=tokenizer, chat_template=template, **settings)


def load_processor(path, trust_remote_code: bool = False):
    """The model's processor (image processor + tokenizer + chat template), video part dropped where it needs
    torchvision (Qwen2-VL family), rebuilt from its parts where ``AutoProcessor`` cannot load it (module docstring);
    when the rebuild fails too, ``AutoProcessor``'s error is raised."""
    from transformers import AutoProcessor

    path = str(path)
    model_type = _model_type(path)
    if model_type in VIDEO_PROCESSOR_TYPES and not _has_torchvision():
        return _processor_from_parts(path, model_type, trust_remote_code)
    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, AttributeError, ValueError, TypeError, OSError) as error:
        if model_type is None or (model_type not in VIDEO_PROCESSOR_TYPES and _has_torchvision()):
            raise
        try:
            return _processor_from_parts(path, model_type, trust_remote_code)
        except Exception:  # noqa: BLE001 - the first error says what is wrong with the folder
            raise error from None


def _has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None
