"""ttrv-edge: test-time reinforcement learning (TTRV) for small vision-language models.

The public API is small: ``TTRVAdapter`` (load once, adapt many), ``TTRVConfig`` (every option, documented),
``Question``, ``Item`` and the result types. The kernels live in ``ttrv_edge.kernels``. Names are imported on
first use so that ``ttrv-edge --help`` does not pay for importing torch and transformers.
"""

from importlib import import_module

__version__ = "0.1.0"
_EXPORTS = {
    "TTRVAdapter": "api",
    "TTRVConfig": "config",
    "Question": "io.answers",
    "Item": "io.images",
    "ItemResult": "rl.loop",
    "Prediction": "rl.loop",
    "StepRecord": "rl.loop",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'ttrv_edge' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
