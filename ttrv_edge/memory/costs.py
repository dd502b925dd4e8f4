"""The memory estimate of a TTRV step, from the model's config and tensors.

- **sample**: the prompt is prefilled once (batch 1, no grad) and the N continuations decode from that KV cache in
  micro-batches of ``k`` rows: KV cache ``k x (P + T)`` tokens, plus one step of logits ``k x V``;
- **train**: the loss forward with grad in micro-batches of ``m`` rows, gradients accumulated over them (the update
  equals the one-batch update); the prompt runs once per micro-batch and its cache is shared by the rows, so the
  activations are ``P + m x T`` tokens over all layers, plus the fused log-prob kernel's workspace (chunk rows x V)
  and the LoRA gradients and AdamW state. With LoRA weights wider than the activations (fp32 LoRA on a bf16 model,
  the GPU default), peft casts each adapted projection's input to the LoRA dtype and autograd keeps that copy too.
  The workspace is the torch path's fp32 intermediates of a chunk of rows (8 [chunk, V] tensors, fitted on CPU), or
  with the Triton kernels (``fused_head``, CUDA) one [chunk, V] buffer in the model dtype (Liger's chunk rule) plus
  the autotuner's copy of it. When the vision side trains (``--lora-targets vision/all``,
  ``--train-norms``), autograd also keeps the vision tower's activations over all its layers, once per micro-batch
  (the image is encoded once for the rows: ``shared_prefix_hidden``/``shared_vision``); otherwise the tower runs
  without grad and only one layer's transient counts.

``ModelCosts`` holds the model's byte costs (weights bytes counted from the tensors, KV bytes per token, activation
bytes per token, kernel workspace) and turns a ``WorkShape`` and a row count into the dynamic bytes of a phase.
What the estimate leaves out, and why: the CPU baseline (interpreter, libraries, allocator caches) is measured at
planner creation rather than estimated, since it depends on the allocator and the installed libraries, not on the
model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.reference import DEFAULT_ROW_CHUNK, default_chunk_rows
from ..models.lora import VISION_MARKERS
from .meter import tensor_bytes

__all__ = ["HEAD_CHUNK_ROWS", "ModelCosts", "WorkShape", "model_costs"]

HEAD_CHUNK_ROWS = DEFAULT_ROW_CHUNK  # rows the torch reference's lm_head op turns into logits at once


@dataclass(frozen=True)
class WorkShape:
    """What one phase works on: prompt tokens P, new tokens T, vision tokens (patches) of the prompt's images."""

    prompt_tokens: int
    new_tokens: int
    vision_tokens: int = 0

    @classmethod
    def of(cls, inputs, new_tokens: int, patch: int, temporal: int = 1) -> WorkShape:
        pixels = inputs.get("pixel_values") if hasattr(inputs, "get") else None
        vision = 0
        if pixels is not None and patch > 0:
            vision = int(pixels.numel()) // (3 * patch * patch * max(temporal, 1))
        return cls(int(inputs["input_ids"].shape[1]), int(new_tokens), vision)


@dataclass(frozen=True)
class ModelCosts:
    """Byte costs of a model, from its config and its tensors. Dynamic costs exclude ``weights_bytes``."""

    weights_bytes: int
    trainable_bytes: int
    dtype_bytes: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_hidden: int = 0
    vision_intermediate: int = 0
    vision_heads: int = 0
    patch: int = 0
    temporal_patch: int = 1
    attention_scores: bool = False  # eager attention keeps heads x L x L scores per layer
    vision_layers: int = 0
    vision_trained: bool = False  # a trainable parameter sits in the vision tower or connector
    lora_inputs: int = 0  # in_features summed over the language model's LoRA-adapted linears (elements per token)
    lora_dtype_bytes: int = 4
    fused_head: bool = False  # the loss runs the Triton lm_head kernels (CUDA), not the torch reference

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def train_act_bytes_per_token(self, length: int) -> int:
        """Activations autograd keeps per token over all layers, with frozen base weights and LoRA on q/k/v/o.

        Per layer: two RMSNorm inputs and outputs (4H), the LoRA inputs and q/attention-out/o-in (4H), k and v
        (2 x kv), the SwiGLU's gate, act(gate) and up (3I); eager attention adds scores and probabilities.
        """
        per_layer = 8 * self.hidden + 2 * self.kv_heads * self.head_dim + 3 * self.intermediate
        if self.attention_scores:
            per_layer += 2 * self.heads * length
        return self.layers * per_layer * self.dtype_bytes + self.lora_cast_bytes_per_token

    @property
    def lora_cast_bytes_per_token(self) -> int:
        """The adapted projections' inputs cast to the LoRA dtype (kept for the backward) when it is wider."""
        return self.lora_inputs * self.lora_dtype_bytes if self.lora_dtype_bytes > self.dtype_bytes else 0

    def head_workspace_bytes(self, rows: int) -> int:
        """The lm_head + log-prob op's workspace on ``rows`` token rows (see the module docstring)."""
        if self.fused_head:
            chunk = default_chunk_rows(rows, self.hidden, self.vocab)
            return 2 * chunk * self.vocab * self.dtype_bytes
        # fp32 log-softmax, probabilities, p*log p, recomputed in the backward (activation checkpointing) beside
        # their gradients: ~8 [chunk, V] tensors (fitted on the SmolVLM-256M architecture, CPU)
        return min(rows, HEAD_CHUNK_ROWS) * self.vocab * 4 * 8

    def vision_bytes(self, vision_tokens: int) -> int:
        """Transient memory of one no-grad pass of the vision tower over one copy of the images."""
        if vision_tokens <= 0 or self.vision_hidden <= 0:
            return 0
        linear = vision_tokens * (6 * self.vision_hidden + 2 * self.vision_intermediate)
        scores = 2 * self.vision_heads * vision_tokens * vision_tokens
        return (linear + scores) * self.dtype_bytes

    def vision_train_bytes(self, vision_tokens: int) -> int:
        """Memory of the vision tower's forward + backward with grad (LoRA or norms inside it), per micro-batch.

        Per layer and token autograd keeps the two LayerNorm inputs and outputs (4 Hv), q, k, v, the attention
        output and the residual (5 Hv), the MLP's hidden and activated hidden (2 Iv); eager attention adds scores and
        probabilities. Plus one layer's transient (``vision_bytes``) and its gradient buffers in fp32.
        """
        if vision_tokens <= 0 or self.vision_hidden <= 0:
            return 0
        per_layer = 9 * self.vision_hidden + 2 * self.vision_intermediate
        if self.attention_scores:
            per_layer += 2 * self.vision_heads * vision_tokens
        kept = max(self.vision_layers, 1) * vision_tokens * per_layer * self.dtype_bytes
        backward = 2 * vision_tokens * (2 * self.vision_hidden + 2 * self.vision_intermediate) * 4
        return kept + backward + self.vision_bytes(vision_tokens)

    def prefill_bytes(self, prompt: int) -> int:
        """Transient memory of the batch-1 no-grad prefill (one layer's activations alive at a time)."""
        per_token = (6 * self.hidden + 3 * self.intermediate) * self.dtype_bytes
        return prompt * per_token + 2 * self.heads * prompt * prompt * self.dtype_bytes

    def sample_bytes(self, rows: int, shape: WorkShape) -> int:
        """Dynamic bytes of sampling ``rows`` continuations from the shared prefix."""
        prompt, new = shape.prompt_tokens, shape.new_tokens
        prefix = 2 * prompt * self.kv_bytes_per_token  # the prefilled cache and the copy expanded per micro-batch
        cache = rows * (prompt + new) * self.kv_bytes_per_token
        logits = rows * self.vocab * 4 * 4  # fp32 logits, processed scores, probabilities, and one in flight
        decode = rows * (6 * self.hidden + 3 * self.intermediate) * self.dtype_bytes
        transient = max(self.prefill_bytes(prompt) + self.vision_bytes(shape.vision_tokens), logits + decode)
        return prefix + cache + transient

    def train_bytes(self, rows: int, shape: WorkShape) -> int:
        """Dynamic bytes of the loss forward + backward on ``rows`` rollouts (grad through the adapted weights).

        The prompt runs once per micro-batch and its KV cache is expanded to the rows (``shared_prefix_hidden``):
        P + rows x T tokens of activations, plus the expanded prompt cache, which autograd keeps.
        """
        prompt, new = shape.prompt_tokens, shape.new_tokens
        tokens = prompt + rows * new
        activations = tokens * self.train_act_bytes_per_token(prompt + new)
        prompt_cache = (rows + 1) * prompt * self.kv_bytes_per_token
        hidden_out = 2 * tokens * self.hidden * self.dtype_bytes
        workspace = self.head_workspace_bytes(rows * new)
        backward = 2 * tokens * (2 * self.hidden + 2 * self.intermediate) * 4  # one layer's gradient buffers
        optimizer = 4 * self.trainable_bytes  # grads + AdamW's two moments (+ one update temporary)
        tokens_in = shape.vision_tokens
        vision = self.vision_train_bytes(tokens_in) if self.vision_trained else self.vision_bytes(tokens_in)
        return activations + prompt_cache + hidden_out + workspace + backward + optimizer + vision

    def dynamic_bytes(self, phase: str, rows: int, shape: WorkShape) -> int:
        return self.sample_bytes(rows, shape) if phase == "sample" else self.train_bytes(rows, shape)


def _first(config, *names, default=0):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _side(patch) -> int:
    """A patch size as one side: InternViT's config holds (height, width)."""
    return int(patch[0] if isinstance(patch, (list, tuple)) else patch)


def _lora_inputs(model) -> tuple[int, int]:
    """(in_features summed over the language model's LoRA-adapted linears, the LoRA weights' bytes per element)."""
    total, width = 0, 4
    for name, module in model.named_modules():
        adapters = getattr(module, "lora_A", None)
        if not isinstance(adapters, torch.nn.ModuleDict) or not adapters or any(m in name for m in VISION_MARKERS):
            continue
        first = next(iter(adapters.values()))
        total += int(first.in_features)
        width = first.weight.element_size()
    return total, width


def model_costs(model, fused_head: bool = False) -> ModelCosts:
    """The ``ModelCosts`` of a (peft-wrapped, possibly quantized) VLM: config sizes plus bytes of its tensors.
    ``fused_head``: the loss will run the Triton lm_head kernels (``backend`` resolving to triton)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vision = getattr(config, "vision_config", None)
    hidden = int(_first(text, "hidden_size"))
    heads = int(_first(text, "num_attention_heads", default=1))
    head_dim = int(_first(text, "head_dim", default=hidden // max(heads, 1)))
    seen: set[int] = set()
    weights = trainable = 0
    vision_trained = any(
        p.requires_grad and any(marker in name for marker in VISION_MARKERS) for name, p in model.named_parameters()
    )
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = tensor_bytes(tensor)
        weights += size
        if tensor.requires_grad:
            trainable += size
    head = base.get_output_embeddings()
    head = getattr(head, "base_layer", head)
    dtype = head.weight.dtype if head is not None else torch.float32
    attention = getattr(config, "_attn_implementation", None) or getattr(text, "_attn_implementation", None)
    vision_hidden = int(_first(vision, "embed_dim", "hidden_size")) if vision is not None else 0
    vision_inter = int(_first(vision, "intermediate_size", default=0)) if vision is not None else 0
    if vision is not None and not vision_inter:
        vision_inter = int(vision_hidden * float(_first(vision, "mlp_ratio", default=4)))
    lora_inputs, lora_width = _lora_inputs(model)
    return ModelCosts(
        weights_bytes=weights,
        trainable_bytes=trainable,
        dtype_bytes=torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4,
        layers=int(_first(text, "num_hidden_layers")),
        hidden=hidden,
        intermediate=int(_first(text, "intermediate_size", default=4 * hidden)),
        heads=heads,
        kv_heads=int(_first(text, "num_key_value_heads", default=heads)),
        head_dim=head_dim,
        vocab=int(_first(text, "vocab_size")),
        vision_hidden=vision_hidden,
        vision_intermediate=vision_inter,
        vision_heads=int(_first(vision, "num_attention_heads", "num_heads", default=0)) if vision is not None else 0,
        patch=_side(_first(vision, "patch_size", default=0)) if vision is not None else 0,
        temporal_patch=int(_first(vision, "temporal_patch_size", default=1)) if vision is not None else 1,
        attention_scores=attention == "eager",
        vision_layers=int(_first(vision, "depth", "num_hidden_layers", default=0)) if vision is not None else 0,
        vision_trained=vision_trained,
        lora_inputs=lora_inputs,
        lora_dtype_bytes=lora_width,
        fused_head=fused_head,
    )
