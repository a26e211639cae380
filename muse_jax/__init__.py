"""muse_jax: JAX/Flax reimplementation of MUSE (multi-scale dense self-distillation for nucleus
detection and classification; arXiv 2511.05170)."""

__version__ = "0.1.0"
