"""Answer with an exported model on onnxruntime, without torch or transformers: ``preprocess`` (images, chat
prompts, tokens, rope positions in numpy) and ``runner`` (``OnnxVLM``: greedy decoding with the KV cache).

These modules import only ``ttrv_edge.io.answers``, ``ttrv_edge.io.images``, numpy, PIL, tokenizers, jinja2 and
onnxruntime. Nothing is imported here.
"""
