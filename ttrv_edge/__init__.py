"""ttrv-edge: test-time reinforcement learning (TTRV) for small vision-language models.

The public API is small: ``TTRVModel`` (load once, adapt many), ``TTRVConfig`` (every option, documented),
``Question``, ``Item`` and the result types. Names are imported on first use so that ``ttrv-edge --help`` does not
pay for importing torch and transformers.

The data flow, one subpackage per stage:

- ``io``: questions and answers, images and image sets in; adapters and run checkpoints out;
- ``models``: load the VLM with LoRA on its language model, run its parts (hidden states without logits);
- ``memory``: micro-batch sizes for a memory budget, measured peaks, out-of-memory back-off;
- ``rl``: sample rollouts, score them, reward them, one GRPO update, the episodic and transductive loops;
- ``export``: merge the adapter into the base model and export ONNX graphs;
- ``runtime``: answer with the exported graphs on onnxruntime, without torch;
- ``kernels``: the fused ops (log-prob + entropy, GRPO loss, group rewards), Triton or torch;
- ``api`` and ``cli``: ``TTRVModel`` and the ``ttrv-edge`` command; ``demo``: the bundled demo model and benchmark.
"""

from importlib import import_module

__version__ = "0.1.0"
_EXPORTS = {
    "TTRVModel": "api",
    "TTRVConfig": "config",
    "Question": "io.answers",
    "Item": "io.inputs",
    "ItemResult": "rl.records",
    "Prediction": "rl.records",
    "StepRecord": "rl.records",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'ttrv_edge' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
