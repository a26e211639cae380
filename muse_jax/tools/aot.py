r"""Ahead-of-time compilation of the MUSE steps for TPU pod topologies, on a CPU-only machine.

With the optional `libtpu` package installed (`pip install -r requirements-tpu.txt`), JAX can describe the devices
of a TPU slice that is not attached (`jax.experimental.topologies.get_topology_desc`) and compile a program for
them. This tool builds the *exact* jitted step the trainer runs (same function, same shardings, same mesh rules,
from the same config) on abstract inputs (`jax.ShapeDtypeStruct`, built with `jax.eval_shape`: nothing is
allocated), compiles it for a topology and reports, per chip:

  * argument / output / temporary memory (XLA's `memory_analysis()`) against the chip's HBM;
  * FLOPs and HBM bytes per step (`cost_analysis()`; for an SPMD program these are per device);
  * a roofline step time `max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth)` and the images/s it implies
    (published chip numbers, see `tpu_chips`), next to libtpu's own cost-model estimate (`optimal_seconds`);
  * with `--find_max_batch`, the largest per-chip batch that compiles and fits (doubling, then bisection; every
    candidate is compiled, nothing is extrapolated).

Usage (from the repository root):

  python -m muse_jax.tools.aot --config configs/pretrain.py:vit_b16 --topology v5p:2x2x4
  python -m muse_jax.tools.aot --config configs/pretrain.py:vit_s16 --topology v5e:2x4 --config.mesh.fsdp=8 \
      --find_max_batch
  python -m muse_jax.tools.aot --config configs/pretrain.py:tiny --topology v5p:2x2x1 --config.batch_size=8

Sharding mistakes surface here, at compile time, with the argument named (e.g. a global batch the mesh does not
divide). The CPU backend stays the default backend of the process: compile-only TPU devices never hold data.

Only this module imports libtpu (through JAX's TPU plugin), and only when a topology is requested; the core
package never does.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import re
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from muse_jax.tools import tpu_chips

STEPS = ("pretrain", "finetune", "predict")


class AotError(ValueError):
  """A step could not be compiled for the requested topology (bad sharding, bad config...)."""


class DoesNotFitError(AotError):
  """The compiled program needs more HBM per chip than the chip has (compiler RESOURCE_EXHAUSTED or our check)."""


# --------------------------------------------------------------------------------------------------------------------
# TPU topologies (libtpu is loaded lazily, on the first call of `topology_devices`).


def libtpu_available() -> bool:
  """True when the optional `libtpu` package is importable (without importing it)."""
  return importlib.util.find_spec("libtpu") is not None


def _accelerator_type(topology: str) -> str:
  """Cloud accelerator-type name of a topology (`v5p:2x2x4` -> `v5p-32`), used only to quiet libtpu's start-up."""
  chip = tpu_chips.chip_for_topology(topology)
  n = tpu_chips.topology_chip_count(topology)
  prefix = {"v5e": "v5litepod"}.get(chip.name, chip.name)
  return f"{prefix}-{n * chip.cores_per_chip if chip.name in ('v4', 'v5p') else n}"


def prepare_tpu_environment(topology: str) -> None:
  """Sets (if unset) the env vars libtpu reads at start-up; must run before the first topology is created.

  `TPU_ACCELERATOR_TYPE` / `TPU_WORKER_HOSTNAMES` stop libtpu from probing the (absent) TPU VM metadata server and
  warning; `ALLOW_MULTIPLE_LIBTPU_LOAD=1` lets several processes on one machine use libtpu at once (otherwise the
  second fails with "Internal error when accessing libtpu multi-process lockfile").
  """
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", _accelerator_type(topology))
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(topology: str) -> list[jax.Device]:
  """Compile-only devices of a TPU slice, one per chip (v4/v5p in megacore mode).

  Args:
    topology: `generation:chip grid`, e.g. `v5p:2x2x4` (16 chips), `v5e:2x4` (8 chips), `v4:2x2x1`, `v6e:4x4`.

  Raises:
    AotError: libtpu is not installed, or libtpu rejects the topology.
  """
  chip = tpu_chips.chip_for_topology(topology)
  if not libtpu_available():
    raise AotError("compiling for a TPU topology needs the optional libtpu package: "
                   "pip install -r requirements-tpu.txt")
  prepare_tpu_environment(topology)
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  kwargs = {"chip_config_name": "megacore"} if chip.cores_per_chip > 1 else {}
  gen, _, shape = topology.partition(":")
  name = f"{ {'v5litepod': 'v5e'}.get(gen, gen)}:{shape}"
  try:
    desc = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs)
  except Exception as e:  # JaxRuntimeError: INVALID_ARGUMENT for unknown shapes.
    raise AotError(f"libtpu rejected topology {topology!r}: {e}") from e
  devices = list(desc.devices)
  n = tpu_chips.topology_chip_count(topology)
  if len(devices) != n:
    raise AotError(f"topology {topology!r}: expected {n} devices (one per chip), libtpu gave {len(devices)}")
  return devices


# --------------------------------------------------------------------------------------------------------------------
# Step specifications: the jitted step + abstract (sharded) arguments.


@dataclasses.dataclass
class StepSpec:
  """A jitted step ready to lower, with its abstract arguments.

  Attributes:
    name: 'pretrain' | 'finetune' | 'predict'.
    jitted: the `jax.jit`-wrapped step, with its in/out shardings (as the trainer builds it).
    args: abstract arguments (`jax.ShapeDtypeStruct` pytrees carrying their `sharding`).
    mesh: the device mesh.
    global_batch: samples per step over all devices.
    images_per_sample: images the backbone sees per sample (views per region for pretraining), for reports.
    description: one line: what this step is and how it is sharded.
  """
  name: str
  jitted: Any
  args: tuple
  mesh: jax.sharding.Mesh
  global_batch: int
  images_per_sample: int
  description: str

  @property
  def num_devices(self) -> int:
    return int(self.mesh.devices.size)

  @property
  def per_device_batch(self) -> int:
    return self.global_batch // self.num_devices


def _with_sharding(tree: Any, shardings: Any) -> Any:
  """Abstract arrays of `tree` with `shardings` attached (shardings may be a pytree prefix, e.g. one sharding)."""
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def pretrain_batch_shapes(config: ml_collections.ConfigDict, global_batch: int) -> dict[str, Any]:
  """Abstract pretraining batch of the data contract (`muse_jax.data.pipeline.batch_layout`; 'host' or 'device'
  augmentation layout from `config.data.augment_on`)."""
  from muse_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  layout = pipeline.batch_layout(config.data, global_batch)
  return {g: {k: jax.ShapeDtypeStruct(shape, jnp.dtype(dt)) for k, (shape, dt) in f.items()}
          for g, f in layout.items()}


def compile_config(config: ml_collections.ConfigDict, n_devices: int,
                   per_device_batch: int | None = None) -> ml_collections.ConfigDict:
  """A validated copy of a pretraining `config` to compile (not run): synthetic data (the step's program depends on
  shapes only, so any recipe compiles without a data source), a known epoch length, and with `per_device_batch` the
  global batch `per_device_batch * n_devices`."""
  # pylint: disable=import-outside-toplevel
  from muse_jax.pretrain import train as train_lib
  config = copy.deepcopy(config)
  with config.unlocked():
    if per_device_batch is not None:
      config.batch_size = int(per_device_batch) * n_devices
    config.data_source = "synthetic"
    if config.steps_per_epoch == -1:
      config.steps_per_epoch = 1000
  train_lib.validate_config(config)
  return config


def pretrain_spec(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], per_device_batch: int | None = None,
                  *, check_batch: bool = True) -> StepSpec:
  """The pretraining step of `muse_jax.pretrain` for `devices`, exactly as `muse_jax.pretrain.train.setup` builds it.

  Args:
    config: a `configs/pretrain.py` config (`batch_size` is the global batch).
    devices: the devices of the mesh (compile-only TPU devices or CPU devices).
    per_device_batch: if given, overrides `config.batch_size` with `per_device_batch * len(devices)`.
    check_batch: run the trainer's batch/mesh check (off to see what the compiler says about a bad batch).
  """
  # pylint: disable=import-outside-toplevel
  from muse_jax.pretrain import mesh as mesh_lib
  from muse_jax.pretrain import train as train_lib
  config = compile_config(config, len(devices), per_device_batch)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  if check_batch:
    mesh_lib.check_batch(config.batch_size, mesh, process_count=1)
  built = train_lib.build_step(config, mesh, config.steps_per_epoch)
  abstract_state, shardings, init_rng = built["abstract_state"], built["shardings"], built["init_rng"]
  bsh, repl, jitted = built["batch_sharding"], built["replicated"], built["jit_step"]
  args = (_with_sharding(abstract_state, shardings),
          _with_sharding(pretrain_batch_shapes(config, config.batch_size), bsh),
          jax.ShapeDtypeStruct(init_rng.shape, init_rng.dtype, sharding=repl))
  views = config.data.n_global + config.data.n_local
  desc = (f"pretrain {config.get('variant', '?')}: model {config.model.name} ({config.model.get('dtype', 'float32')}), "
          f"{config.data.n_global}x{config.data.global_size}px + {config.data.n_local}x{config.data.local_size}px "
          f"views, mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}")
  return StepSpec("pretrain", jitted, args, mesh, int(config.batch_size), views, desc)


def finetune_spec(config: ml_collections.ConfigDict, devices: Sequence[jax.Device],
                  per_device_batch: int | None = None, *, check_batch: bool = True) -> StepSpec:
  """The NDC fine-tuning step (`muse_jax.ndc`), when that package exposes an abstract step builder.

  Needs `muse_jax.ndc.train.abstract_step(config, devices) -> dict(jitted=, args=, mesh=, global_batch=)`.
  """
  del check_batch
  return _ndc_spec("finetune", "abstract_step", "muse_jax.ndc.train", config, devices, per_device_batch)


def predict_spec(config: ml_collections.ConfigDict, devices: Sequence[jax.Device],
                 per_device_batch: int | None = None, *, check_batch: bool = True) -> StepSpec:
  """The NDC inference forward (`muse_jax.ndc.infer`), when that package exposes an abstract step builder.

  Needs `muse_jax.ndc.infer.abstract_forward(config, devices) -> dict(jitted=, args=, mesh=, global_batch=)`.
  """
  del check_batch
  return _ndc_spec("predict", "abstract_forward", "muse_jax.ndc.infer", config, devices, per_device_batch)


def _ndc_spec(name, fn_name, module_name, config, devices, per_device_batch) -> StepSpec:
  import importlib  # pylint: disable=import-outside-toplevel
  mod = importlib.import_module(module_name)
  fn = getattr(mod, fn_name, None)
  if fn is None:
    raise AotError(f"--step {name}: {module_name}.{fn_name}(config, devices) does not exist yet; it must return "
                   "dict(jitted=<jax.jit step with shardings>, args=<abstract sharded args>, mesh=<Mesh>, "
                   "global_batch=<int>) built with jax.eval_shape (see muse_jax/tools/aot.py)")
  config = copy.deepcopy(config)
  if per_device_batch is not None:
    with config.unlocked():
      _set_ndc_batch(config, int(per_device_batch) * len(devices), name)
  out = fn(config, list(devices))
  return StepSpec(name, out["jitted"], tuple(out["args"]), out["mesh"], int(out["global_batch"]),
                  int(out.get("images_per_sample", 1)), out.get("description", f"{name} {config.get('variant', '')}"))


def _set_ndc_batch(config: ml_collections.ConfigDict, global_batch: int, step: str = "finetune") -> None:
  """Sets the batch the step compiles with: `train.batch_size` (finetune) or `infer.batch_size` (predict)."""
  paths = ("infer.batch_size",) if step == "predict" else ("train.batch_size", "batch_size")
  for path in paths:
    node, parts = config, path.split(".")
    if all(p in node and (node := node[p]) is not None for p in parts[:-1]) and parts[-1] in node:
      node[parts[-1]] = global_batch
      return
  raise AotError(f"--step {step}: cannot find the batch-size field ({' / '.join(paths)}) in the config")


BUILDERS: dict[str, Callable[..., StepSpec]] = {
    "pretrain": pretrain_spec, "finetune": finetune_spec, "predict": predict_spec}


# --------------------------------------------------------------------------------------------------------------------
# Compilation and analysis.


@dataclasses.dataclass
class CompileResult:
  """Per-device numbers of one compiled step (bytes, FLOPs, seconds)."""
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  flops: float
  bytes_accessed: float
  transcendentals: float
  optimal_seconds: float | None
  compile_seconds: float

  @property
  def total_bytes(self) -> int:
    """Peak HBM estimate: arguments + outputs (minus donated-and-aliased buffers) + temporaries + program."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


_SHARD_MSG = re.compile(r"divisible|evenly divide|is partitioned", re.I)


def _undivided_args(args: Any) -> list[str]:
  """`args[i][key]... shape` of every abstract argument whose sharding does not divide its shape."""
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(args)[0]:
    sh = getattr(x, "sharding", None)
    if sh is None or not hasattr(sh, "shard_shape"):
      continue
    try:
      sh.shard_shape(x.shape)
    except ValueError:
      out.append(f"args{jax.tree_util.keystr(path)} {tuple(x.shape)}")
  return out


def compile_spec(spec: StepSpec) -> tuple[Any, CompileResult]:
  """Lowers and compiles `spec`; returns `(compiled, CompileResult)`.

  Raises:
    DoesNotFitError: the compiler ran out of HBM (RESOURCE_EXHAUSTED).
    AotError: a sharding that does not fit the arguments (e.g. a batch the mesh does not divide), with the
      argument named.
  """
  # pylint: disable-next=import-outside-toplevel
  from muse_jax.models import conv as conv_lib
  t0 = time.perf_counter()
  try:
    # The program is traced for the mesh's platform (conv_impl 'auto' is XLA's convolution on TPU, not the CPU
    # host's Winograd route).
    with conv_lib.target_platform(spec.mesh.devices.flat[0].platform):
      compiled = spec.jitted.lower(*spec.args).compile()
  except ValueError as e:
    if _SHARD_MSG.search(str(e)):
      bad = _undivided_args(spec.args)
      raise AotError(f"{spec.name} step, mesh {dict(spec.mesh.shape)} ({spec.num_devices} devices), global batch "
                     f"{spec.global_batch}: an argument's sharding does not divide its shape"
                     f"{' (' + ', '.join(bad[:4]) + (', ...' if len(bad) > 4 else '') + ')' if bad else ''}: {e}"
                     ) from e
    raise
  except Exception as e:  # jax.errors.JaxRuntimeError
    if "RESOURCE_EXHAUSTED" in str(e):
      raise DoesNotFitError(f"{spec.name} step, per-device batch {spec.per_device_batch}: {str(e).splitlines()[0]}") \
          from e
    raise
  dt = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older JAX returned one dict per program
    ca = ca[0] if ca else {}
  ca = ca or {}
  res = CompileResult(
      argument_bytes=int(ma.argument_size_in_bytes), output_bytes=int(ma.output_size_in_bytes),
      alias_bytes=int(ma.alias_size_in_bytes), temp_bytes=int(ma.temp_size_in_bytes),
      code_bytes=int(ma.generated_code_size_in_bytes), flops=float(ca.get("flops", 0.0)),
      bytes_accessed=float(ca.get("bytes accessed", 0.0)), transcendentals=float(ca.get("transcendentals", 0.0)),
      optimal_seconds=(float(ca["optimal_seconds"]) if "optimal_seconds" in ca else None), compile_seconds=dt)
  return compiled, res


def roofline(res: CompileResult, chip: tpu_chips.TpuChip, global_batch: int) -> dict[str, float]:
  """Roofline step time from per-device FLOPs and HBM bytes and the chip's published peaks.

  Returns:
    dict with `t_compute` (s, FLOPs / peak bf16), `t_memory` (s, bytes / HBM bandwidth), `step_time` (their max),
    `bound` ('compute' | 'memory'), `images_per_s` (global batch / step_time, over the whole slice),
    `t_libtpu` (libtpu's cost-model seconds, or nan) and `images_per_s_libtpu`.
  """
  t_c = res.flops / chip.peak_bf16_flops
  t_m = res.bytes_accessed / chip.hbm_bandwidth
  t = max(t_c, t_m)
  t_l = res.optimal_seconds if res.optimal_seconds and res.optimal_seconds > 0 else float("nan")  # CPU: -1
  return {"t_compute": t_c, "t_memory": t_m, "step_time": t, "bound": "compute" if t_c >= t_m else "memory",
          "images_per_s": global_batch / t if t > 0 else float("nan"), "t_libtpu": t_l,
          "images_per_s_libtpu": global_batch / t_l if t_l == t_l and t_l > 0 else float("nan")}


def fits(res: CompileResult, chip: tpu_chips.TpuChip) -> bool:
  """True when the per-chip peak estimate is within what the compiler lets one program use."""
  return res.total_bytes <= chip.compiler_hbm_bytes


@dataclasses.dataclass
class SearchStep:
  per_device_batch: int
  fits: bool
  total_bytes: int | None
  compile_seconds: float
  note: str = ""


# A fit using at least this fraction of the chip's usable memory is "near the limit" for `find_max_batch`.
NEAR_CAPACITY = 0.9


def find_max_batch(try_batch: Callable[[int], CompileResult | None], *, start: int = 8, granularity: int = 1,
                   max_batch: int = 1 << 16, max_compiles: int = 12, capacity: int | None = None,
                   log: Callable[[str], None] | None = None,
                   known: dict[int, CompileResult | None] | None = None,
                   one_point: bool = False) -> tuple[int, CompileResult | None, list[SearchStep]]:
  """Largest per-device batch `b` (a multiple of `granularity`) for which `try_batch(b)` returns a result.

  `try_batch(b)` compiles the step at per-device batch `b` and returns its `CompileResult` when it fits, `None`
  when it does not. The search keeps a verified bracket `lo` (compiled, fits) < `hi` (compiled, does not fit) and
  closes it to `granularity`. Candidates: `start`, then doubling; when `capacity` (bytes) is given and two fitting
  probes are known, the next candidate is where their line (memory is close to affine in the batch) meets the
  capacity (then the batch just above it, to close the bracket); once the largest fit uses >= `NEAR_CAPACITY` of
  it, where the compiler recomputes and the line goes flat (pointing far away), falls or gives nothing, the smallest
  of the line, the midpoint and a step up that doubles while such fits go on; otherwise bisection. Every answer is
  a compiled probe, never the extrapolation itself. The search stops early (returning the best verified batch)
  after `max_compiles` compiles.

  `known` seeds the search with earlier compiles (`{batch: result or None}`, e.g. from a results file), which are
  not compiled again. `one_point=True` (with `capacity`) predicts from a single fitting probe: the line through
  (0, batch-independent bytes) and (b, total), i.e. temporaries / b per sample, which overestimates the slope when
  temporaries have a positive fixed part (so the prediction errs low and the next probe closes the bracket).

  Returns:
    `(best_batch, its CompileResult, probes)`; best_batch is 0 when even `granularity` does not fit.
  """
  g = max(1, int(granularity))
  start = max(g, (int(start) // g) * g)
  max_batch = max(g, (int(max_batch) // g) * g)
  probes: list[SearchStep] = []
  cache: dict[int, CompileResult | None] = dict(known or {})
  fitting = [b for b, r in cache.items() if r is not None]
  failing = [b for b, r in cache.items() if r is None]
  lo = max(fitting, default=0)  # largest verified fit (0 = none)
  hi = min((b for b in failing if b > lo), default=None)  # smallest verified non-fit above it (None = none yet)

  def predicted() -> int | None:
    pts = sorted((b, r.total_bytes) for b, r in cache.items() if r is not None)
    if capacity is None or not pts:
      return None
    if len(pts) == 1:
      if not one_point:
        return None
      b, r = pts[0][0], cache[pts[0][0]]
      fixed = r.total_bytes - r.temp_bytes
      return int((b * (capacity - fixed) / r.temp_bytes) // g) * g if r.temp_bytes > 0 else None
    (b1, m1), (b2, m2) = pts[-2], pts[-1]
    slope = (m2 - m1) / (b2 - b1)
    if slope <= 0:
      return None
    return int((b2 + (capacity - m2) / slope) // g) * g

  def candidate() -> int | None:
    if lo == 0 and hi is None and not cache:
      return start
    if hi is not None and hi - lo <= g:
      return None
    p = predicted()
    if p is not None:
      p = max(p, lo + g)
      if p in cache or (hi is not None and p >= hi) or p > max_batch:
        p = None  # the line is no help any more: bisect
    mid = ((lo + hi) // 2 // g) * g if hi is not None else None
    if capacity is not None and lo and cache[lo].total_bytes >= NEAR_CAPACITY * capacity:
      # The largest fit is already near the limit, where the compiler recomputes (memory flat, or even falling, as
      # the batch grows) and the line is no guide (flat: it points far away or nowhere). Take the smallest of the
      # line, the midpoint and a galloping step up from the largest fit: one step, doubling while such fits go on
      # (the compiler can keep trading FLOPs for memory for a while).
      near = sorted(b for b, r in cache.items() if r is not None and r.total_bytes >= NEAR_CAPACITY * capacity)
      step = g if len(near) < 2 else max(g, (2 * (near[-1] - near[-2])) // g * g)
      options = [b for b in (p, mid, lo + step)
                 if b is not None and lo < b <= max_batch and (hi is None or b < hi) and b not in cache]
      return min(options) if options else None
    if p is not None:
      return p
    if hi is None:
      return min(2 * lo, max_batch) if lo < max_batch else None
    return mid if lo < mid < hi else None

  while len(probes) < max_compiles:
    b = candidate()
    if b is None or b in cache:
      break
    t0 = time.perf_counter()
    r = try_batch(b)
    dt = time.perf_counter() - t0
    cache[b] = r
    probes.append(SearchStep(b, r is not None, r.total_bytes if r else None, dt))
    if log:
      log(f"  per-device batch {b:6d}: " + (f"fits, {r.total_bytes / 2**30:.2f} GiB" if r else "does not fit")
          + f" ({dt:.1f} s)")
    if r is not None:
      lo = max(lo, b)
    else:
      hi = b if hi is None else min(hi, b)
  return lo, cache.get(lo), probes


# --------------------------------------------------------------------------------------------------------------------
# The driver.


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py:ARG` and applies `x.y=value` overrides (values parsed as Python literals)."""
  import ast  # pylint: disable=import-outside-toplevel
  path, _, arg = spec.partition(":")
  mod_spec = importlib.util.spec_from_file_location("_aot_config", path)
  if mod_spec is None or not os.path.exists(path):
    raise AotError(f"--config: cannot load {path!r} (expected e.g. configs/pretrain.py:vit_s16)")
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  cfg = mod.get_config(arg) if arg else mod.get_config()
  for ov in overrides:
    key, eq, val = ov.partition("=")
    if not eq:
      raise AotError(f"override {ov!r} must look like x.y=value")
    key = key.removeprefix("--").removeprefix("config.")
    try:
      value = ast.literal_eval(val)
    except (ValueError, SyntaxError):
      value = val
    parts = key.split(".")
    node = cfg
    for p in parts[:-1]:
      if p not in node:
        raise AotError(f"override {ov!r}: config has no field {p!r}")
      node = node[p]
    if parts[-1] not in node:
      raise AotError(f"override {ov!r}: config has no field {key!r}")
    old = node[parts[-1]]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    node[parts[-1]] = value
  return cfg


def analyse(config: ml_collections.ConfigDict, topology: str, *, step: str = "pretrain",
            per_device_batch: int | None = None, find_max: bool = False, search_start: int | None = None,
            granularity: int = 1, max_compiles: int = 12, devices: Sequence[jax.Device] | None = None,
            log: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Compiles `step` for `topology` and returns a report dict (see `format_report`).

  Args:
    config: the step's config (pretraining: `configs/pretrain.py`).
    topology: a TPU topology string (`v5p:2x2x4`).
    step: one of `STEPS`.
    per_device_batch: batch per chip for the main compile (default: the config's global batch, used as is).
    find_max: also search the largest per-chip batch that fits.
    search_start, granularity, max_compiles: search controls (see `find_max_batch`).
    devices: use these devices instead of the topology's (tests pass CPU devices).
    log: progress callback.
  """
  if step not in BUILDERS:
    raise AotError(f"--step {step!r}; expected one of {STEPS}")
  chip = tpu_chips.chip_for_topology(topology)
  devs = list(devices) if devices is not None else topology_devices(topology)
  build = BUILDERS[step]
  n = len(devs)
  report: dict[str, Any] = {"topology": topology, "chip": chip, "num_chips": n, "step": step,
                            "variant": str(config.get("variant", "?"))}
  spec = build(config, devs, per_device_batch)
  report["description"] = spec.description
  report["mesh"] = dict(spec.mesh.shape)
  report["per_device_batch"] = spec.per_device_batch
  report["global_batch"] = spec.global_batch
  report["images_per_sample"] = spec.images_per_sample
  try:
    _, res = compile_spec(spec)
    report["result"] = res
    report["fits"] = fits(res, chip)
    report["roofline"] = roofline(res, chip, spec.global_batch)
  except DoesNotFitError as e:
    report["result"], report["fits"], report["error"] = None, False, str(e)
  if find_max:
    def try_batch(b: int) -> CompileResult | None:
      try:
        _, r = compile_spec(build(config, devs, b))
      except DoesNotFitError:
        return None
      return r if fits(r, chip) else None
    start = search_start or max(1, spec.per_device_batch)
    best, best_res, probes = find_max_batch(try_batch, start=start, granularity=granularity,
                                            max_compiles=max_compiles, capacity=chip.compiler_hbm_bytes, log=log)
    report["max_batch"] = best
    report["max_batch_result"] = best_res
    report["max_batch_roofline"] = roofline(best_res, chip, best * n) if best_res else None
    report["search"] = probes
    report["search_complete"] = _bracketed(probes, best, granularity)
  return report


def _bracketed(probes: list[SearchStep], best: int, g: int) -> bool:
  """True when a probe at `best + g` (or the next multiple above) was compiled and did not fit."""
  return any((not p.fits) and best < p.per_device_batch <= best + g for p in probes)


def _gib(x: float) -> str:
  return f"{x / 2**30:.2f} GiB"


def format_report(r: dict[str, Any]) -> str:
  """Human-readable report of `analyse`."""
  chip: tpu_chips.TpuChip = r["chip"]
  lines = [f"{r['description']}",
           f"topology {r['topology']}: {r['num_chips']} x {chip.name} chips; mesh {r['mesh']}; "
           f"per-chip batch {r['per_device_batch']}, global batch {r['global_batch']} "
           f"({r['images_per_sample']} images per sample)"]
  res: CompileResult | None = r.get("result")
  cap = chip.compiler_hbm_bytes
  if res is None:
    lines.append(f"DOES NOT FIT: {r.get('error', '')}")
  else:
    lines += [
        f"compiled in {res.compile_seconds:.1f} s",
        "per-chip memory: arguments {a}, outputs {o} (aliased with donated args {al}), temporaries {t}, program {c}"
        .format(a=_gib(res.argument_bytes), o=_gib(res.output_bytes), al=_gib(res.alias_bytes),
                t=_gib(res.temp_bytes), c=_gib(res.code_bytes)),
        f"per-chip peak estimate {_gib(res.total_bytes)} of {_gib(cap)} usable "
        f"({100 * res.total_bytes / cap:.1f}%; published HBM {chip.hbm_bytes / 1e9:.1f} GB) -> "
        + ("fits" if r["fits"] else "DOES NOT FIT"),
        f"per-chip FLOPs/step {res.flops:.4g}, HBM bytes/step {res.bytes_accessed:.4g}, "
        f"transcendentals {res.transcendentals:.4g}",
    ]
    rf = r["roofline"]
    lines.append(f"roofline ({chip.name}: {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, "
                 f"{chip.hbm_bandwidth / 1e9:.0f} GB/s): compute {1e3 * rf['t_compute']:.2f} ms, "
                 f"memory {1e3 * rf['t_memory']:.2f} ms -> {rf['bound']}-bound, step >= {1e3 * rf['step_time']:.2f} ms, "
                 f"<= {rf['images_per_s']:.0f} samples/s on the slice")
    if rf["t_libtpu"] == rf["t_libtpu"]:
      lines.append(f"libtpu cost model: {1e3 * rf['t_libtpu']:.2f} ms/step -> {rf['images_per_s_libtpu']:.0f} samples/s")
  if "max_batch" in r:
    lines.append(f"largest per-chip batch that fits: {r['max_batch']}"
                 f"{'' if r['search_complete'] else ' (lower bound: search stopped at --max_compiles)'} "
                 f"(global {r['max_batch'] * r['num_chips']}); "
                 f"{len(r['search'])} compiles: " + ", ".join(
                     f"{p.per_device_batch}{'+' if p.fits else '-'}" for p in r["search"]))
    mr = r.get("max_batch_result")
    if mr is not None:
      rf = r["max_batch_roofline"]
      lines.append(f"  at that batch: {_gib(mr.total_bytes)} per chip, step >= {1e3 * rf['step_time']:.2f} ms, "
                   f"<= {rf['images_per_s']:.0f} samples/s (libtpu model {rf['images_per_s_libtpu']:.0f})")
  lines.append(f"chip numbers: {chip.note} ({chip.source}); roofline numbers are upper bounds (float32 matmuls "
               "run below the bf16 peak)")
  lines.append("json: " + json.dumps(report_json(r), sort_keys=True))
  return "\n".join(lines)


def report_json(r: dict[str, Any]) -> dict[str, Any]:
  """The machine-readable part of a report (the `json:` line of `format_report`; `experiments/aot_table.py
  --ingest` reads it): step, topology, mesh, batches, fits, and every `CompileResult` field of the main compile."""
  out = {k: r.get(k) for k in ("step", "variant", "topology", "mesh", "per_device_batch", "global_batch", "fits")}
  res = r.get("result")
  out["result"] = dataclasses.asdict(res) | {"total_bytes": res.total_bytes} if res is not None else None
  if "max_batch" in r:
    out["max_batch"] = r["max_batch"]
    out["search"] = [dataclasses.asdict(p) for p in r["search"]]
  return out


def main(argv: Sequence[str] | None = None) -> int:
  """CLI: parses flags and prints `format_report(analyse(...))`.

  Exit status: 0 fits, 1 compiled but does not fit (or the compiler ran out of HBM), 2 error (bad config,
  topology or sharding).
  """
  import argparse  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  rest = [a for a in argv if not a.startswith("--config.")]
  p = argparse.ArgumentParser(prog="python -m muse_jax.tools.aot", description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="path.py:ARG, e.g. configs/pretrain.py:vit_s16")
  p.add_argument("--topology", required=True, help="TPU topology, e.g. v5p:2x2x4, v5e:2x4, v4:2x2x1, v6e:4x4")
  p.add_argument("--step", default="pretrain", choices=STEPS)
  p.add_argument("--per_chip_batch", type=int, default=None,
                 help="sets the global batch to this x chips (default: the config's batch as is)")
  p.add_argument("--find_max_batch", action="store_true", help="search the largest per-chip batch that fits")
  p.add_argument("--search_start", type=int, default=None)
  p.add_argument("--granularity", type=int, default=1, help="search resolution (per-chip batch)")
  p.add_argument("--max_compiles", type=int, default=12)
  args = p.parse_args(rest)
  try:
    cfg = load_config(args.config, [o[2:] for o in overrides])
    rep = analyse(cfg, args.topology, step=args.step, per_device_batch=args.per_chip_batch,
                  find_max=args.find_max_batch, search_start=args.search_start, granularity=args.granularity,
                  max_compiles=args.max_compiles, log=lambda s: print(s, flush=True))
  except (AotError, ValueError) as e:
    print(f"aot: error: {type(e).__name__}: {e}", file=sys.stderr)
    return 2
  print(format_report(rep))
  return 0 if rep["fits"] else 1


if __name__ == "__main__":
  sys.exit(main())
