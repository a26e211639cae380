"""glibc malloc settings that stop XLA:CPU from page-faulting its working memory in at every step (issue #23).

XLA:CPU allocates one block for all of a program's temporaries at every execution (`posix_memalign` from one
of its worker threads) and frees it at the end: 838 MB for the ViT-S/16 backbone's forward + backward at batch 8.
glibc serves a request that size from a worker thread's arena with a fresh `mmap` and returns it with `munmap`
(a thread arena cannot hold blocks over 64 MB, and then falls back to `mmap` whatever `M_MMAP_MAX` says), so
every step faults the whole block in again and the kernel zeroes it: ~220,000 page faults and ~0.4 s of system
CPU time per ViT-S/16 step on a 2-core machine, ~15% of the step's wall time.

With one arena (`M_ARENA_MAX` 1), no `mmap` for large blocks (`M_MMAP_MAX` 0) and no trimming of the heap
(`M_TRIM_THRESHOLD` -1), the block comes from the process heap and is reused by the next step: no page faults
after the first. The cost: the process keeps its peak heap (freed memory stays with the process for reuse,
as in any caching allocator) and every thread allocates from one arena. That lock is what makes it opt-in: with
many small ops the threads wait on it, and the `tiny` pretraining step ran ~2x slower (0.056 -> 0.107 s; one
arena alone did it, `MALLOC_ARENA_MAX=1`), while the large backbones gained 1.1-1.3x (WORKSPACE.md, issue #23
attempt 18). A thread arena cannot be kept from `mmap`ing the large block, so there is no setting without the
lock.

`apply()` runs when `muse_jax` is imported (`muse_jax/__init__.py`), before JAX starts its CPU client threads:
the arena limit only binds threads that allocate for the first time after it. Controlled by the environment
variable `MUSE_HOST_MALLOC`:

- `off` / `0` (default): never (glibc's defaults).
- `auto`: on Linux with glibc, only when the computation runs on the CPU: `JAX_PLATFORMS` names only `cpu`, or it
  is unset and no accelerator plugin is installed (`libtpu`, a `jax_plugins` package or entry point). On an
  accelerator host the device memory is not malloc'd and host threads keep their arenas. For ViT-B / R50-size
  CPU work.
- `on` / `1`: on Linux with glibc, whatever the platform.

`python -m experiments.bench_host_malloc` measures the effect (each setting in its own process).
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys
import warnings
from typing import Mapping

ENV = "MUSE_HOST_MALLOC"
# glibc <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))

_status: str | None = None


def _accelerator_installed() -> bool:
  """Whether a JAX accelerator backend (TPU via libtpu, or any PJRT plugin: CUDA, ROCm, ...) is importable."""
  if importlib.util.find_spec("libtpu") is not None or importlib.util.find_spec("jax_plugins") is not None:
    return True
  try:
    return bool(list(importlib.metadata.entry_points(group="jax_plugins")))
  except Exception:  # pylint: disable=broad-except
    return False


def wanted(environ: Mapping[str, str] | None = None) -> tuple[bool, str]:
  """(apply?, why) under the `MUSE_HOST_MALLOC` rule above, for `environ` (default `os.environ`)."""
  environ = os.environ if environ is None else environ
  mode = environ.get(ENV, "off").strip().lower() or "off"
  if mode in ("off", "0", "false", "no"):
    return False, f"{ENV}={mode}"
  if mode not in ("auto", "on", "1", "true", "yes"):
    raise ValueError(f"{ENV} must be auto, on or off; got {environ.get(ENV)!r}.")
  if not sys.platform.startswith("linux"):
    return False, f"not Linux ({sys.platform})"
  if mode != "auto":
    return True, f"{ENV}={mode}"
  platforms = [p.strip().lower() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    if all(p == "cpu" for p in platforms):
      return True, "JAX_PLATFORMS=cpu"
    return False, f"JAX_PLATFORMS={environ['JAX_PLATFORMS']}"
  if _accelerator_installed():
    return False, "an accelerator backend is installed"
  return True, "CPU-only JAX"


def apply(environ: Mapping[str, str] | None = None) -> str:
  """Sets the glibc malloc parameters when `wanted`; returns what was done ('applied: ...' or 'skipped: ...').

  Idempotent: later calls return the first call's status. A bad `MUSE_HOST_MALLOC` value is a warning (glibc's
  defaults kept), not an error: this runs at `import muse_jax`.
  """
  global _status
  if _status is not None:
    return _status
  try:
    ok, why = wanted(environ)
  except ValueError as e:  # a typo in the variable must not stop every command at `import muse_jax`
    warnings.warn(f"{e} glibc's malloc defaults are kept.", stacklevel=2)
    ok, why = False, str(e)
  if not ok:
    _status = f"skipped: {why}"
    return _status
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (AttributeError unless glibc)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    _status = "skipped: not glibc"
    return _status
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  failed = [param for param, value in SETTINGS if mallopt(param, value) != 1]
  _status = f"skipped: mallopt refused {failed}" if failed else f"applied: {why}"
  return _status


def status() -> str | None:
  """What `apply` did in this process (None if it was not called)."""
  return _status
