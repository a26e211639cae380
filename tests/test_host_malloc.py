"""The glibc malloc settings of `muse_jax.host_malloc` (issue #23): when they apply, and what they change.

The effect is checked by counting page faults, not by timing: XLA:CPU's buffers of a jitted call come from fresh
`mmap`s with glibc's defaults (every page faulted in again at every call) and from the reused heap with the
settings.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from muse_jax import host_malloc

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")


@pytest.mark.parametrize("env, want", [
    ({}, False),  # off by default
    ({"JAX_PLATFORMS": "cpu"}, False),
    ({"MUSE_HOST_MALLOC": "off"}, False),
    ({"MUSE_HOST_MALLOC": "0"}, False),
    ({"MUSE_HOST_MALLOC": "off", "JAX_PLATFORMS": "cpu"}, False),
    ({"MUSE_HOST_MALLOC": "on", "JAX_PLATFORMS": "tpu"}, LINUX),
    ({"MUSE_HOST_MALLOC": "auto", "JAX_PLATFORMS": " CPU "}, LINUX),
    ({"MUSE_HOST_MALLOC": "auto", "JAX_PLATFORMS": "cuda,cpu"}, False),
    ({"MUSE_HOST_MALLOC": "auto", "JAX_PLATFORMS": "tpu"}, False),
    ({"MUSE_HOST_MALLOC": "auto", "JAX_PLATFORMS": "cpu"}, LINUX),
])
def test_wanted_follows_the_env_rule(env, want):
  ok, why = host_malloc.wanted(env)
  assert ok is want, why
  assert why


def test_auto_without_jax_platforms_asks_whether_an_accelerator_is_installed(monkeypatch):
  if not LINUX:
    pytest.skip("Linux only")
  monkeypatch.setattr(host_malloc, "_accelerator_installed", lambda: True)
  assert host_malloc.wanted({"MUSE_HOST_MALLOC": "auto"}) == (False, "an accelerator backend is installed")
  monkeypatch.setattr(host_malloc, "_accelerator_installed", lambda: False)
  assert host_malloc.wanted({"MUSE_HOST_MALLOC": "auto"}) == (True, "CPU-only JAX")


def test_a_bad_value_names_the_variable():
  with pytest.raises(ValueError, match="MUSE_HOST_MALLOC must be auto, on or off; got 'sometimes'"):
    host_malloc.wanted({"MUSE_HOST_MALLOC": "sometimes"})


# One jitted call whose temporaries (a 128 MB cumulative sum) are one XLA:CPU block allocated and freed inside the
# call, as in a training step; its output is a scalar. The child prints the median page faults per call over calls
# 13-24 (with the settings, glibc's heap can grow over the first several calls, while small allocations split the
# freed block, before one block stays free for the call), and what `apply` did at import.
_CHILD = r"""
import json, resource, statistics
import muse_jax
from muse_jax import host_malloc
import jax, jax.numpy as jnp
x = jnp.ones((32 * 1024 * 1024,), jnp.float32)
f = jax.jit(lambda x: jnp.cumsum(jnp.sin(x) * 2.0 + 1.0)[::4096].sum())
f(x).block_until_ready()
faults = []
for _ in range(24):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  y = f(x).block_until_ready()
  del y
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps(dict(status=host_malloc.status(), faults=statistics.median(faults[12:]))))
"""


def _child(mode: str) -> dict:
  env = dict(os.environ, MUSE_HOST_MALLOC=mode, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)
  p = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=ROOT, capture_output=True, text=True, check=False,
                     timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not LINUX, reason="glibc malloc settings: Linux only")
def test_the_settings_stop_xla_buffers_from_being_faulted_in_at_every_call():
  off, on = _child("off"), _child("on")
  assert off["status"] == "skipped: MUSE_HOST_MALLOC=off"
  assert on["status"] == "applied: MUSE_HOST_MALLOC=on"
  pages = 128 * 2**20 // 4096
  # glibc's defaults: the temporaries' block is a fresh mmap, faulted in page by page at every call.
  assert off["faults"] > pages // 2, off
  # With the settings: the freed block is reused from the heap.
  assert on["faults"] < pages // 20, on


def test_a_bad_value_at_import_warns_and_keeps_glibcs_defaults(monkeypatch):
  monkeypatch.setattr(host_malloc, "_status", None)
  with pytest.warns(UserWarning, match="MUSE_HOST_MALLOC must be auto, on or off; got 'sometimes'. glibc's malloc "
                                       "defaults are kept."):
    status = host_malloc.apply({"MUSE_HOST_MALLOC": "sometimes"})
  assert status.startswith("skipped: MUSE_HOST_MALLOC must be")
