"""Test-wide set-up: 4 fake CPU devices for sharding tests, absl flags parsed for grain workers, XLA's cheapest
CPU code generation and one XLA compilation cache for the whole test session.

Code generation: most of the suite's time is XLA compiling the tiny models' steps, not running them. The tests run
with `--xla_backend_optimization_level=0` (LLVM's optimisation of the generated CPU code; the HLO passes and fusion do
not change): the tiny pretraining step compiles in 11 s instead of 16 s and runs about as fast
(0.39 vs 0.37 s). Set XLA_FLAGS yourself (e.g. `XLA_FLAGS=--xla_force_host_platform_device_count=4 make test`) to
test with XLA's default code generation. The suite passes both ways; `make test` on the 2-core machine: 795 s
before these two settings, 703 s with the cache, 583 s with both (2026-12-07).

The cache: many tests compile the same tiny programs (the tiny pretraining step, the tiny backbone's init and
forward), in this process, in the pytest-xdist workers and in the subprocesses that the multi-process and CLI tests
start. JAX's persistent compilation cache in a temporary folder made by the first process (the environment variable is
inherited by the xdist workers and every subprocess) compiles each program once per session; the folder is removed
when that process exits. Set JAX_COMPILATION_CACHE_DIR yourself to keep it (or MUSE_TEST_NO_XLA_CACHE=1 to turn it
off). A cache hit returns the same executable, so no result depends on it.
"""
import atexit
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if not os.environ.get("MUSE_TEST_NO_XLA_CACHE") and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="muse_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()
