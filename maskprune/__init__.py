"""maskprune: prune Llama-family LLMs into a smaller uniform architecture (MaskPrune, arXiv 2502.14008)."""

__version__ = "0.1.0"
