r"""Benchmark of the MUSE pretraining step on the local devices (one device), with XLA FLOPs and a matmul roofline.

Run from the repository root:

  .venv/bin/python -m experiments.bench_train                                   # tiny (config batch) + vit_s16 (batch 2)
  .venv/bin/python -m experiments.bench_train --configs tiny,vit_s16 --vit_batch 4 --repeats 3

For each config: views, heads and nuclei as the config says (synthetic data: random images, random nuclei); the
batch is the config's for `tiny` and `--vit_batch` for the ViT configs (their config batch of 512 regions x 10 views
is not a CPU workload). Timed: the full jitted train step, and its parts as separate jitted functions: teacher
forward (backbone + heads on the global views), student forward+backward (backbone + heads on every view, gradient of
a scalar of the logits w.r.t. the student params), and the losses alone (DINO + NuLo on logits of the step's
shapes); for the configs that render their views in the step (`data.augment_on='device'`: vit_s16, vit_b16, r50),
also that rendering alone (resize, flips, photometric augmentations of the synthetic crops). Each: median wall time of `--repeats` calls after one warm-up call. FLOPs come from XLA's
`cost_analysis()`: the model's FLOPs from the function traced with direct convolutions (`model.conv_impl` as on an
accelerator; lowered, not compiled), and the executed FLOPs of the compiled program (fewer where the CPU computes 3x3
convolutions by Winograd); achieved FLOP/s (model FLOPs / time) is compared with the peak of a 2048^3 float32 matmul
measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import pretrain
from muse_jax.models import conv as conv_lib
from muse_jax.pretrain import augment
from muse_jax.pretrain import losses
from muse_jax.pretrain import step as step_lib
from muse_jax.pretrain import train


def _median_time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def _flops(jitted, *args) -> float:
  """FLOPs XLA counts in the compiled program (what runs: Winograd convolutions count 16 / 36 of direct ones)."""
  try:
    ca = jitted.lower(*args).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", float("nan")))
  except Exception:  # pylint: disable=broad-except
    return float("nan")


def _model_flops(fn, *args) -> float:
  """The model's FLOPs: `fn` traced with direct convolutions (`model.conv_impl='auto'` as on an accelerator), counted
  by XLA on the lowered program (no compile). The basis of the % of peak, so a cheaper algorithm shows as speed."""
  try:
    with conv_lib.direct_convolutions():
      ca = jax.jit(lambda *a: fn(*a)).lower(*args).cost_analysis()  # a fresh function: traced under the context
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", float("nan")))
  except Exception:  # pylint: disable=broad-except
    return float("nan")


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of an n^3 float32 matmul on the default device."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  t = _median_time(lambda: f(a), repeats)
  return 2.0 * n ** 3 / t


def synthetic_config(name: str, batch: int | None):
  """`configs/pretrain.py:name` on synthetic data (no progress bar), with `batch` regions unless None."""
  cfg = pretrain.get_config(name)
  cfg.data_source = "synthetic"
  cfg.progress_bar = False
  cfg.steps_per_epoch = 100
  if batch is not None:
    cfg.batch_size = batch
  return cfg


def bench_config(name: str, batch: int | None, repeats: int) -> list[dict]:
  cfg = synthetic_config(name, batch)
  s = train.setup(cfg, jax.devices()[:1])
  state = s["create_state"](s["init_rng"])
  batch_np = next(s["data_iter"])
  gb = jax.tree.map(lambda x: jax.device_put(x, s["batch_sharding"]), batch_np)
  nets = s["nets"]
  teacher_params = jax.tree.map(jnp.copy, state["params"])
  rng = jax.random.PRNGKey(0)
  views = cfg.data.n_global + cfg.data.n_local

  # Full step (state copied each call because the jitted step donates it).
  step = jax.jit(s["step_fn"])
  def full():
    st = jax.tree.map(jnp.copy, state)
    return step(st, gb, rng)
  t_full = _median_time(full, repeats)
  f_full = _flops(step, state, gb, rng), _model_flops(s["step_fn"], state, gb, rng)

  # data.augment_on='device' (the accelerator recipes): the step renders the views from crops first; time that
  # part alone and give the other parts the rendered views.
  parts = []
  if augment.needs_render(gb):
    render = lambda b, k: augment.render(b, k, cfg.data)  # noqa: E731
    jr = jax.jit(render)
    parts.append(("render views (device augmentation)", _median_time(lambda: jr(gb, rng), repeats),
                  (_flops(jr, gb, rng), _model_flops(render, gb, rng))))
    gb = jax.block_until_ready(jr(gb, rng))

  def teacher_fwd(tp, tbs, batch):
    g = batch["global"]
    img, b, vg = step_lib._flat_views(g)  # pylint: disable=protected-access
    out, _ = step_lib._backbone(nets.teacher, {"params": tp["backbone"], "batch_stats": tbs["backbone"]}, img,  # pylint: disable=protected-access
                                train=True)
    res = []
    if nets.cls_head is not None:
      res.append(nets.cls_head.apply({"params": tp["cls_head"]}, out["f_cls"]))
    if nets.nu_head is not None:
      res += step_lib._nucleus_logits(nets.nu_head, tp["nu_head"], out["f_map"], g, b, vg, g["images"].shape[2])  # pylint: disable=protected-access
    return res
  jt = jax.jit(teacher_fwd)
  t_teacher = _median_time(lambda: jt(teacher_params, state["teacher_batch_stats"], gb), repeats)
  f_teacher = (_flops(jt, teacher_params, state["teacher_batch_stats"], gb),
               _model_flops(teacher_fwd, teacher_params, state["teacher_batch_stats"], gb))

  def student_loss(params, bs, batch, key):
    total = 0.0
    s_bs = bs["backbone"]
    for gi, name in enumerate([k for k in ("global", "local") if k in batch]):
      grp = batch[name]
      img, b, v = step_lib._flat_views(grp)  # pylint: disable=protected-access
      out, s_bs = step_lib._backbone(nets.student, {"params": params["backbone"], "batch_stats": s_bs}, img,  # pylint: disable=protected-access
                                     train=True, rng=jax.random.fold_in(key, gi))
      if nets.cls_head is not None:
        total = total + jnp.mean(nets.cls_head.apply({"params": params["cls_head"]}, out["f_cls"]))
      if nets.nu_head is not None:
        for x in step_lib._nucleus_logits(nets.nu_head, params["nu_head"], out["f_map"], grp, b, v,  # pylint: disable=protected-access
                                          grp["images"].shape[2]):
          total = total + jnp.mean(x)
    return total
  js = jax.jit(jax.grad(student_loss))
  t_student = _median_time(lambda: js(state["params"], state["batch_stats"], gb, rng), repeats)
  f_student = (_flops(js, state["params"], state["batch_stats"], gb, rng),
               _model_flops(jax.grad(student_loss), state["params"], state["batch_stats"], gb, rng))

  # Losses alone, on random logits of the step's shapes.
  b = cfg.batch_size
  kc, kn = cfg.heads.cls_out_dim, cfg.heads.nu_out_dim
  groups = [("global", cfg.data.n_global, cfg.data.max_nuclei_global)]
  if cfg.data.n_local:
    groups.append(("local", cfg.data.n_local, cfg.data.max_nuclei_local))
  r = np.random.default_rng(0)
  t_cls = jnp.asarray(r.normal(size=(cfg.data.n_global, b, kc)), jnp.float32)
  s_cls = jnp.asarray(r.normal(size=(views, b, kc)), jnp.float32)
  s_nu = [jnp.asarray(r.normal(size=(b, m, kn)), jnp.float32) for _, v, m in groups for _ in range(v)]
  ids = [jnp.asarray(batch_np[g]["ids"][:, i]) for g, v, _ in groups for i in range(v)]
  masks = [jnp.asarray(batch_np[g]["mask"][:, i]) for g, v, _ in groups for i in range(v)]
  vg = cfg.data.n_global

  def loss_fn(t_cls, s_cls, s_nu):
    l1 = losses.dino_loss(t_cls, s_cls, jnp.zeros(kc), 0.04, 0.1)
    l2 = losses.nulo_loss(s_nu[:vg], ids[:vg], masks[:vg], s_nu, ids, masks, jnp.zeros(kn), 0.04, 0.1)["loss"]
    return l1 + l2
  jl = jax.jit(jax.value_and_grad(loss_fn, argnums=(1, 2)))
  t_loss = _median_time(lambda: jl(t_cls, s_cls, s_nu), repeats)
  f_loss = (_flops(jl, t_cls, s_cls, s_nu), _model_flops(jax.value_and_grad(loss_fn, argnums=(1, 2)), t_cls, s_cls,
                                                         s_nu))

  rows = []
  for part, t, f in (("full step", t_full, f_full), *parts, ("teacher fwd", t_teacher, f_teacher),
                     ("student fwd+bwd", t_student, f_student), ("losses fwd+bwd", t_loss, f_loss)):
    rows.append(dict(config=name, part=part, batch=b, views=views, seconds=t, flops=f[1], executed_flops=f[0],
                     images_per_s=b / t if part == "full step" else float("nan")))
  return rows


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", default="tiny,vit_s16")
  p.add_argument("--vit_batch", type=int, default=2)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--json", default=None, help="also write the measured rows and parameters to this JSON file")
  args = p.parse_args(argv)
  records = []
  peak = matmul_peak()
  dev = jax.devices()[0]
  print(f"\ndevice: {dev.platform} ({dev.device_kind}); matmul peak (2048^3 f32, same run): {peak / 1e9:.1f} GFLOP/s")
  print("GFLOP: the model's (direct convolutions, as on an accelerator); executed: what XLA counts in the compiled\n"
        "program (less where the CPU runs 3x3 convolutions by Winograd, `model.conv_impl`). GFLOP/s and % of peak use\n"
        "the model's FLOPs.\n")
  print("| config | part | batch | views | time (s) | images/s | GFLOP | executed GFLOP | GFLOP/s | % of matmul peak |")
  print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
  for name in args.configs.split(","):
    for r in bench_config(name, None if name == "tiny" else args.vit_batch, args.repeats):
      fps = r["flops"] / r["seconds"]
      print(f"| {r['config']} | {r['part']} | {r['batch']} | {r['views']} | {r['seconds']:.4f} | "
            f"{r['images_per_s']:.2f} | {r['flops'] / 1e9:.2f} | {r['executed_flops'] / 1e9:.2f} | {fps / 1e9:.1f} | "
            f"{100 * fps / peak:.1f}% |", flush=True)
      records.append(dict(config=r["config"], part=r["part"], batch=r["batch"], views=r["views"],
                          seconds=r["seconds"], images_per_s=r["images_per_s"], gflop=r["flops"] / 1e9,
                          executed_gflop=r["executed_flops"] / 1e9,
                          gflop_per_s=fps / 1e9, pct_of_matmul_peak=100 * fps / peak))
  print(f"\ncommand: python -m experiments.bench_train --configs {args.configs} --vit_batch {args.vit_batch} "
        f"--repeats {args.repeats}")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(dict(
        benchmark="bench_train", params={k: v for k, v in vars(args).items() if k != "json"},
        device=f"{dev.platform} ({dev.device_kind})", matmul_peak_gflop_per_s=peak / 1e9,
        tables=dict(train=records)), indent=1))


if __name__ == "__main__":
  main()
