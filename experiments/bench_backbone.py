"""Benchmark of the MUSE backbones and the nucleus feature sampler on the local devices.

Run from the repository root:

  .venv/bin/python -m experiments.bench_backbone                       # tiny + vit_s16, batch 8, 224 px, fp32
  .venv/bin/python -m experiments.bench_backbone --models tiny,vit_s16,vit_b16,r50 --repeats 3

Backbones: forward (eval mode) and forward+backward (train mode: batch statistics, gradient of a scalar loss w.r.t.
all parameters) of one jitted function, median of `--repeats` timed calls after one warm-up call (compile excluded).
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

from configs.models import get_config
from muse_jax import ops
from muse_jax.models import build_backbone

# Official PyTorch encoder-decoder, 2 threads, fp32, batch 8, 224 px (issue 2): (forward s, forward+backward s).
TORCH_REFERENCE = {"vit_s16": (0.60, 1.85), "vit_b16": (2.2, 6.6), "r50": (1.35, 4.2)}


CPU_SECONDS = {}  # label -> median process CPU seconds per call (all threads), filled by _timeit


def _timeit(fn, repeats: int, label: str | None = None) -> float:
  """Median wall seconds of `fn()` after one warm-up call; also records the median process CPU seconds."""
  jax.block_until_ready(fn())  # warm-up (compile)
  times, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  if label:
    CPU_SECONDS[label] = statistics.median(cpu)
  return statistics.median(times)


def bench_backbone(variant: str, batch: int, size: int, repeats: int) -> tuple[float, float]:
  """Returns (forward s, forward+backward s) medians."""
  module = build_backbone(get_config(variant))
  images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  variables = jax.jit(functools.partial(module.init, train=False))(jax.random.key(1), images[:1])
  fwd = jax.jit(functools.partial(module.apply, train=False))

  @jax.jit
  def fwd_bwd(variables, images):
    def loss_fn(params):
      out, upd = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, images, train=True,
                              mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
      return jnp.mean(out["f_map"] ** 2) + jnp.mean(out["f_cls"] ** 2), upd
    return jax.grad(loss_fn, has_aux=True)(variables["params"])

  t_f = _timeit(lambda: fwd(variables, images), repeats, f"{variant} fwd")
  t_fb = _timeit(lambda: fwd_bwd(variables, images), repeats, f"{variant} fwd+bwd")
  return t_f, t_fb


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
  parser.add_argument("--sampler_repeats", type=int, default=5)
  parser.add_argument("--skip_sampler", action="store_true")
  parser.add_argument("--json", default=None, help="also write the measured rows and parameters to this JSON file")
  args = parser.parse_args()
  backbone_rows, sampler_rows = [], []

  print(f"jax {jax.__version__}, devices {jax.devices()}, cpu count {os.cpu_count()}, "
        f"load average at start {os.getloadavg()[0]:.1f} (shared machine: figures are indicative)")
  print(f"\nBackbones: batch {args.batch}, {args.size} px, fp32, median of {args.repeats} after 1 warm-up\n")
  print("Wall s is distorted by other processes on a shared machine; CPU s (process CPU time over all threads) is\n"
        "not, and bounds the wall time on an idle machine: CPU s / threads <= wall <= CPU s.\n")
  print("| model | forward wall s (CPU s) | fwd+bwd wall s (CPU s) | torch ref fwd / fwd+bwd s "
        "| speed-up fwd / fwd+bwd |")
  print("|---|---|---|---|---|")
  for variant in [v for v in args.models.split(",") if v]:  # --models "" runs the sampler only
    t_f, t_fb = bench_backbone(variant, args.batch, args.size, args.repeats)
    ref = TORCH_REFERENCE.get(variant)
    ref_s = f"{ref[0]:.2f} / {ref[1]:.2f}" if ref else "-"
    spd = f"{ref[0] / t_f:.2f}x / {ref[1] / t_fb:.2f}x" if ref else "-"
    c_f, c_fb = CPU_SECONDS[f"{variant} fwd"], CPU_SECONDS[f"{variant} fwd+bwd"]
    print(f"| {variant} | {t_f:.3f} ({c_f:.3f}) | {t_fb:.3f} ({c_fb:.3f}) | {ref_s} | {spd} |", flush=True)
    backbone_rows.append(dict(model=variant, forward_wall_s=t_f, forward_cpu_s=c_f, fwd_bwd_wall_s=t_fb,
                              fwd_bwd_cpu_s=c_fb, torch_ref_forward_s=ref[0] if ref else None,
                              torch_ref_fwd_bwd_s=ref[1] if ref else None,
                              speedup_vs_torch_forward=ref[0] / t_f if ref else None,
                              speedup_vs_torch_fwd_bwd=ref[1] / t_fb if ref else None))

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
        benchmark="bench_backbone", params=params, devices=[str(d) for d in jax.devices()],
        tables=dict(backbones=backbone_rows, sampler=sampler_rows)), indent=1))


if __name__ == "__main__":
  main()
