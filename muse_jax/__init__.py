"""muse_jax: JAX/Flax reimplementation of MUSE (multi-scale dense self-distillation for nucleus
detection and classification; arXiv 2511.05170)."""

__version__ = "0.1.0"

# Before anything imports JAX and starts XLA:CPU's threads: with MUSE_HOST_MALLOC=auto / on, keep XLA's per-step
# working memory in the heap instead of mmap / munmap at every step (muse_jax/host_malloc.py; off by default).
from muse_jax import host_malloc as _host_malloc  # noqa: E402  pylint: disable=wrong-import-position

_host_malloc.apply()
