"""Benchmark of the MUSE backbones (against PyTorch, same run) and the nucleus feature sampler on the local devices.

Run from the repository root:

  .venv/bin/python -m experiments.bench_backbone                       # tiny + vit_s16, batch 8, 224 px, fp32
  .venv/bin/python -m experiments.bench_backbone --models vit_s16,vit_b16,r50 --repeats 5 --skip_sampler
  .venv/bin/python -m experiments.bench_backbone --models r50 --conv_impl auto,xla     # Winograd vs XLA convs

Backbones: forward (eval mode) and forward+backward (train mode: batch statistics, gradient of a scalar loss w.r.t.
all parameters) of one jitted function, median of `--repeats` timed calls after one warm-up call (compile excluded).
The PyTorch baseline is measured in the same process, interleaved call by call with ours (JAX fwd, torch fwd, JAX
fwd+bwd, torch fwd+bwd, repeat), so load from other processes hits both alike: `experiments/torch_muse.py`, the
re-implementation of the official modules that the parity tests use, with the same weights (random PyTorch init moved
by `muse_jax.tools.convert`; the forward outputs are checked equal before timing). PyTorch runs with as many
intra-op threads as JAX's CPU client uses (`--threads`, default: all cores), fp32, eager (`torch.inference_mode`
forward; `loss.backward()` for fwd+bwd). Speed-up = PyTorch s / JAX s (> 1: we are faster). Without torch installed
(`pip install -r requirements-torch.txt`) the PyTorch columns are left out.

Sampler: `ops.sample_nuclei` on `f_map` [B, S/4, S/4, C] with B=32, N=300, C=384 against two per-image loop baselines
measured in the same run: (a) a Python loop over images with eager (op-by-op) execution, which is what the official
PyTorch code does; (b) a Python loop calling a jitted one-image function. Forward+backward = gradient of
sum(out^2) w.r.t. f_map and coords.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs.models import VARIANTS, get_config
from muse_jax import ops
from muse_jax.models import build_backbone
from muse_jax.models import conv as conv_lib

CPU_SECONDS = {}  # label -> median process CPU seconds per call (all threads), filled by _timeit


def _timeit(fn, repeats: int, label: str | None = None) -> float:
  """Median wall seconds of `fn()` after one warm-up call; also records the median process CPU seconds."""
  return _interleaved({label or "_": fn}, repeats)[label or "_"]


def _interleaved(fns: dict, repeats: int) -> dict[str, float]:
  """Median wall seconds per callable, timed in rounds (one call of each per round) after one warm-up call each.

  Also records the median process CPU seconds in `CPU_SECONDS`.
  """
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - t0)
      cpu[k].append(time.process_time() - c0)
  for k in fns:
    CPU_SECONDS[k] = statistics.median(cpu[k])
  return {k: statistics.median(v) for k, v in times.items()}


def torch_model(variant: str, seed: int = 0):
  """(PyTorch module with random weights, our variables with the same weights), or (None, None) without torch."""
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return None, None
  from experiments import torch_muse  # pylint: disable=import-outside-toplevel
  from muse_jax.tools import convert  # pylint: disable=import-outside-toplevel
  cfg = get_config(variant)
  if cfg.arch == "vit":
    if cfg.patch_size != 16:
      return None, None  # the official ViT (and its re-implementation) has 16 px patches only
    model = torch_muse.TMuseViT(cfg)
  else:
    model = torch_muse.TMuseResNet(cfg)
  torch_muse.randomise(model, seed)
  variables, _ = convert.torch_to_variables(torch_muse.state_dict_np(model), cfg, pos_embed_resize="exact")
  return model, jax.tree.map(jnp.asarray, variables)


def backbone_fwd_bwd(module):
  """`fn(variables, images) -> (param grads, batch_stats update)`: train-mode forward and the gradient of
  mean(f_map^2) + mean(f_cls^2) w.r.t. all parameters (the timed fwd+bwd; not jitted)."""

  def fwd_bwd(variables, images):
    def loss_fn(params):
      out, upd = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, images, train=True,
                              mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
      return jnp.mean(out["f_map"] ** 2) + jnp.mean(out["f_cls"] ** 2), upd
    return jax.grad(loss_fn, has_aux=True)(variables["params"])

  return fwd_bwd


def bench_backbone(variant: str, batch: int, size: int, repeats: int, use_torch: bool = True,
                   conv_impls: tuple[str, ...] = ("auto",)) -> dict[str, float]:
  """JAX medians per `conv_impl` ({'fwd', 'fwd_bwd'} of the first, {'fwd[impl]', 'fwd_bwd[impl]'} of each) and, with
  PyTorch, {'torch_fwd', 'torch_fwd_bwd'} (wall s), all timed in the same interleaved rounds."""
  images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  tmodel, variables = torch_model(variant) if use_torch else (None, None)
  fns = {}
  checks = []
  for impl in conv_impls:
    module = build_backbone(get_config(variant), conv_impl=impl)
    if variables is None:
      variables = jax.jit(functools.partial(module.init, train=False))(jax.random.key(1), images[:1])
    fwd = jax.jit(functools.partial(module.apply, train=False))

    fwd_bwd = jax.jit(backbone_fwd_bwd(module))
    fns[f"{variant} fwd[{impl}]"] = functools.partial(fwd, variables, images)
    fns[f"{variant} fwd+bwd[{impl}]"] = functools.partial(fwd_bwd, variables, images)
    checks.append(fwd)
  if tmodel is not None:
    import torch  # pylint: disable=import-outside-toplevel
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)))

    def t_fwd():
      tmodel.eval()
      with torch.inference_mode():
        return tmodel(x)

    def t_fwd_bwd():
      tmodel.train()
      tmodel.zero_grad(set_to_none=True)
      f_map, f_cls = tmodel(x)
      loss = f_map.pow(2).mean() + f_cls.pow(2).mean()
      loss.backward()
      return loss.detach()

    # Same architecture and weights: the forward outputs agree before anything is timed.
    ref_map, ref_cls = t_fwd()
    for fwd in checks:
      out = fwd(variables, images)
      np.testing.assert_allclose(np.asarray(out["f_map"]), ref_map.permute(0, 2, 3, 1).numpy(), rtol=1e-3, atol=1e-3)
      np.testing.assert_allclose(np.asarray(out["f_cls"]), ref_cls.numpy(), rtol=1e-3, atol=1e-3)
    fns[f"{variant} torch fwd"] = t_fwd
    fns[f"{variant} torch fwd+bwd"] = t_fwd_bwd
  t = _interleaved(fns, repeats)
  res = {}
  for impl in conv_impls:
    res[f"fwd[{impl}]"], res[f"fwd_bwd[{impl}]"] = t[f"{variant} fwd[{impl}]"], t[f"{variant} fwd+bwd[{impl}]"]
  res["fwd"], res["fwd_bwd"] = res[f"fwd[{conv_impls[0]}]"], res[f"fwd_bwd[{conv_impls[0]}]"]
  if tmodel is not None:
    res.update(torch_fwd=t[f"{variant} torch fwd"], torch_fwd_bwd=t[f"{variant} torch fwd+bwd"])
  return res


def bench_sampler(b: int, n: int, c: int, size: int, repeats: int) -> dict[str, tuple[float, float]]:
  """Returns {method: (forward s, forward+backward s)}."""
  h = size // 4
  rng = np.random.RandomState(0)
  f_map = jnp.asarray(rng.randn(b, h, h, c).astype(np.float32))
  coords = jnp.asarray(rng.uniform(0, size, (b, n, 2)).astype(np.float32))
  mask = jnp.asarray(rng.rand(b, n) > 0.1)

  def loss(f, xy, m):
    return jnp.sum(ops.sample_nuclei(f, xy, m, size) ** 2)

  grad = jax.grad(loss, argnums=(0, 1))
  vec_f = jax.jit(lambda f, xy, m: ops.sample_nuclei(f, xy, m, size))
  vec_fb = jax.jit(grad)
  one_f = jax.jit(lambda f, xy, m: ops.sample_nuclei(f, xy, m, size))
  one_fb = jax.jit(grad)

  def loop(fn, stack):
    outs = [fn(f_map[i:i + 1], coords[i:i + 1], mask[i:i + 1]) for i in range(b)]
    return stack(outs)

  cat = lambda outs: jnp.concatenate(outs)  # noqa: E731
  cat2 = lambda outs: (jnp.concatenate([o[0] for o in outs]), jnp.concatenate([o[1] for o in outs]))  # noqa: E731

  def eager(fn):
    def run():
      with jax.disable_jit():
        return fn()
    return run

  res = {}
  name = "vectorised (jit)"
  res[name] = (_timeit(lambda: vec_f(f_map, coords, mask), repeats, f"{name} fwd"),
               _timeit(lambda: vec_fb(f_map, coords, mask), repeats, f"{name} fwd+bwd"))
  name = "per-image loop, eager"
  res[name] = (_timeit(eager(lambda: loop(functools.partial(ops.sample_nuclei, image_size=size), cat)), repeats,
                       f"{name} fwd"),
               _timeit(eager(lambda: loop(grad, cat2)), repeats, f"{name} fwd+bwd"))
  name = "per-image loop, jit per image"
  res[name] = (_timeit(lambda: loop(one_f, cat), repeats, f"{name} fwd"),
               _timeit(lambda: loop(one_fb, cat2), repeats, f"{name} fwd+bwd"))
  # Same numbers from every method (sanity check).
  ref = vec_f(f_map, coords, mask)
  np.testing.assert_allclose(loop(one_f, cat), ref, rtol=1e-5, atol=1e-5)
  return res


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="tiny,vit_s16", help="comma-separated model variants")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=0,
                      help="PyTorch intra-op threads (0: all cores, as XLA's CPU client uses)")
  parser.add_argument("--no_torch", action="store_true", help="skip the same-run PyTorch baseline")
  parser.add_argument("--conv_impl", default="auto",
                      help="comma-separated model.conv_impl values to time, each a row (auto, xla, winograd; "
                           "'auto,xla' shows the Winograd convolutions against XLA's in the same run)")
  parser.add_argument("--sampler_repeats", type=int, default=5)
  parser.add_argument("--skip_sampler", action="store_true")
  parser.add_argument("--json", default=None, help="also write the measured rows and parameters to this JSON file")
  args = parser.parse_args()
  unknown = [v for v in args.models.split(",") if v and v not in VARIANTS]
  if unknown:
    parser.error(f"--models: unknown variant(s) {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
  for name in ("repeats", "sampler_repeats", "batch", "size"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1; got {getattr(args, name)}")
  conv_impls = tuple(v for v in args.conv_impl.split(",") if v)
  bad = [v for v in conv_impls if v not in conv_lib.CONV_IMPLS]
  if bad or not conv_impls:
    parser.error(f"--conv_impl: expected some of {', '.join(conv_lib.CONV_IMPLS)}; got {args.conv_impl!r}")
  if args.threads < 0:
    parser.error(f"--threads must be >= 0 (0: all cores); got {args.threads}")
  backbone_rows, sampler_rows = [], []
  threads = args.threads or os.cpu_count()
  torch_version = None
  if not args.no_torch:
    try:
      import torch  # pylint: disable=import-outside-toplevel
      torch.set_num_threads(threads)
      torch_version = torch.__version__
    except ImportError:
      print("PyTorch not installed (pip install -r requirements-torch.txt): no same-run baseline")

  print(f"jax {jax.__version__}, devices {jax.devices()}, cpu count {os.cpu_count()}, "
        f"load average at start {os.getloadavg()[0]:.1f} (shared machine: figures are indicative)")
  if torch_version:
    print(f"PyTorch {torch_version}, {threads} intra-op threads, measured in the same run, interleaved call by call")
  print(f"\nBackbones: batch {args.batch}, {args.size} px, fp32, median of {args.repeats} after 1 warm-up\n")
  print("Wall s is distorted by other processes on a shared machine; CPU s (process CPU time over all threads) is\n"
        "not, and bounds the wall time on an idle machine: CPU s / threads <= wall <= CPU s.\n")
  print("| model | forward wall s (CPU s) | fwd+bwd wall s (CPU s) | PyTorch fwd / fwd+bwd wall s (same run) "
        "| speed-up vs PyTorch fwd / fwd+bwd |")
  print("|---|---|---|---|---|")
  for variant in [v for v in args.models.split(",") if v]:  # --models "" runs the sampler only
    r = bench_backbone(variant, args.batch, args.size, args.repeats, use_torch=torch_version is not None,
                       conv_impls=conv_impls)
    tr_f, tr_fb = r.get("torch_fwd"), r.get("torch_fwd_bwd")
    ref_s = f"{tr_f:.3f} / {tr_fb:.3f}" if tr_f else "-"
    for impl in conv_impls:
      t_f, t_fb = r[f"fwd[{impl}]"], r[f"fwd_bwd[{impl}]"]
      spd = f"{tr_f / t_f:.2f}x / {tr_fb / t_fb:.2f}x" if tr_f else "-"
      c_f, c_fb = CPU_SECONDS[f"{variant} fwd[{impl}]"], CPU_SECONDS[f"{variant} fwd+bwd[{impl}]"]
      label = variant if len(conv_impls) == 1 and impl == "auto" else f"{variant} (conv_impl={impl})"
      print(f"| {label} | {t_f:.3f} ({c_f:.3f}) | {t_fb:.3f} ({c_fb:.3f}) | {ref_s} | {spd} |", flush=True)
      backbone_rows.append(dict(model=variant, conv_impl=impl, forward_wall_s=t_f, forward_cpu_s=c_f,
                                fwd_bwd_wall_s=t_fb, fwd_bwd_cpu_s=c_fb, torch_forward_s=tr_f, torch_fwd_bwd_s=tr_fb,
                                speedup_vs_torch_forward=tr_f / t_f if tr_f else None,
                                speedup_vs_torch_fwd_bwd=tr_fb / t_fb if tr_f else None))

  if not args.skip_sampler:
    b, n, c = 32, 300, 384
    print(f"\nSampler: B={b}, N={n}, C={c}, f_map {args.size // 4}x{args.size // 4}, median of "
          f"{args.sampler_repeats} after 1 warm-up\n")
    res = bench_sampler(b, n, c, args.size, args.sampler_repeats)
    base_f, base_fb = res["vectorised (jit)"]
    print("| method | forward wall ms (CPU ms) | fwd+bwd wall ms (CPU ms) "
          "| vectorised speed-up fwd / fwd+bwd, wall (CPU) |")
    print("|---|---|---|---|")
    cb_f, cb_fb = CPU_SECONDS["vectorised (jit) fwd"], CPU_SECONDS["vectorised (jit) fwd+bwd"]
    for name, (t_f, t_fb) in res.items():
      c_f, c_fb = CPU_SECONDS[f"{name} fwd"], CPU_SECONDS[f"{name} fwd+bwd"]
      print(f"| {name} | {1e3 * t_f:.1f} ({1e3 * c_f:.1f}) | {1e3 * t_fb:.1f} ({1e3 * c_fb:.1f}) | "
            f"{t_f / base_f:.1f}x ({c_f / cb_f:.1f}x) / {t_fb / base_fb:.1f}x ({c_fb / cb_fb:.1f}x) |")
      sampler_rows.append(dict(method=name, b=b, n=n, c=c, forward_wall_ms=1e3 * t_f, forward_cpu_ms=1e3 * c_f,
                               fwd_bwd_wall_ms=1e3 * t_fb, fwd_bwd_cpu_ms=1e3 * c_fb,
                               vectorised_speedup_forward_wall=t_f / base_f,
                               vectorised_speedup_fwd_bwd_wall=t_fb / base_fb,
                               vectorised_speedup_forward_cpu=c_f / cb_f,
                               vectorised_speedup_fwd_bwd_cpu=c_fb / cb_fb))

  if args.json:
    params = {k: v for k, v in vars(args).items() if k != "json"}
    pathlib.Path(args.json).write_text(json.dumps(dict(
        benchmark="bench_backbone", params=params, devices=[str(d) for d in jax.devices()], torch=torch_version,
        tables=dict(backbones=backbone_rows, sampler=sampler_rows)), indent=1))


if __name__ == "__main__":
  main()
