"""ttrv-edge: test-time reinforcement learning (TTRV) for small vision-language models."""

__version__ = "0.1.0"
