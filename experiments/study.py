r"""The small-scale reproduction study of issue #9: ablations of MUSE pretraining on BRCA-M2C, on CPUs.

  python experiments/study.py all --brca /path/to/BRCA-M2C --slide /path/to/CMU-1-Small-Region --root runs/study
  python experiments/study.py report --root runs/study          # tables, figures, JSON from what has finished

Stages (each resumable: a finished run is skipped, an interrupted pretraining resumes from its checkpoint):
  slide     cuts the unlabelled slide into 512 px regions at its native mpp (~0.499 µm/px), skipping background
            (`muse_jax.slide.tissue` on a thumbnail), with nucleus points from the classical detector
            (`muse_jax.data.detect`) as sidecar CSVs: `ROOT/slide_regions/{images,points}/`, read by the
            pipeline's `folder:` source.
  pretrain  `python -m muse_jax.main --config configs/pretrain.py:<--variant, default small>` for every method x seed on
            `brca:BRCA|folder:ROOT/slide_regions` (BRCA-M2C train + val + the slide regions; never test), then
            `python -m muse_jax.export` (the teacher backbone).
  eval      `python -m muse_jax.evaluate` kNN + linear at mpp 0.5 / size 224 on the full BRCA-M2C test split.
  ndc       `python -m muse_jax.finetune --config configs/finetune_ndc.py:tiny,no_semi,no_lfov` (500 steps, the same
            for every method), `python -m muse_jax.predict` on the val and test tiles (threshold 0.05), `python -m
            muse_jax.score`: threshold chosen on val (`--sweep`), test at it and at 0.5 (mcspatnet, muse).
            Controls: `--ndc_tag T --ndc_override FIELD=VALUE` writes to `ROOT/ndc_T/` (not in the report).
  report    `ROOT/study.md` + `ROOT/study.json` (mean ± std over seeds, per-seed values, wall times) and PNGs in
            `--figures` (loss curves, accuracy / F1 by method).
  all       the five in order.

Methods: `random` (random init of the variant's backbone with the seed, no pretraining), `raw` (the raw-pixel
baseline `raw:16` of `muse_jax.evaluate`; kNN / linear only), `dino` (loss.w_nu=0), `nulo` (loss.w_image=0),
`muse` (both losses), `muse_fixed` (both, fixed mpp 0.5). Every run is a subprocess of the project's own CLI; its
command line, wall time and exit status go to `ROOT/<stage>/<method>_s<seed>/run.json` and its output to `log.txt`,
and are printed, so what is printed is what a user would type.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shlex
import subprocess
import sys
import time
from typing import Any, Sequence

METHODS = ("random", "raw", "dino", "nulo", "muse", "muse_fixed")
PRETRAINED = ("dino", "nulo", "muse", "muse_fixed")
DEFAULT_VARIANT = "small"  # configs/pretrain.py variant of the pretrained methods (issue #21's recipe)
RAW_SOURCE = "raw:16"  # the raw-pixel baseline: 16 px windows of pixels centred on each nucleus
# Absolute loss weights, so that a variant whose default is one loss only (`small_sk`: NuLo) still ablates right.
METHOD_OVERRIDES: dict[str, dict[str, str]] = {
    "dino": {"loss.w_image": "1.0", "loss.w_nu": "0.0"},
    "nulo": {"loss.w_image": "0.0", "loss.w_nu": "1.0"},
    "muse": {"loss.w_image": "1.0", "loss.w_nu": "1.0"},
    "muse_fixed": {"loss.w_image": "1.0", "loss.w_nu": "1.0", "data.mpp_range": "(0.5, 0.5)"},
}
METHOD_LABELS = {"random": "random init", "raw": "raw pixels (16 px)", "dino": "DINO (image loss)",
                 "nulo": "NuLo (nucleus loss)",
                 "muse": "MUSE (both)", "muse_fixed": "MUSE, fixed mpp 0.5"}
SEEDS = (0, 1, 2)
REGION_SIZE = 512
REGION_MIN_TISSUE = 0.5
EVAL_MPP, EVAL_SIZE = 0.5, 224
NDC_STEPS = 500
# Supervised only, fully labelled 256 px tile crops (no padded context): the most labels per CPU-second; the
# semi-supervised large-FoV recipe is the product default, not something two shared cores can run 15 times.
NDC_CONFIG = "configs/finetune_ndc.py:tiny,no_semi,no_lfov"
NDC_PRED_THRESHOLD = 0.05  # predict with a low threshold once; score at 0.5 and at the threshold chosen on val
NDC_SELECT = "mcspatnet/f_det"  # what the val sweep maximises
STAGES = ("slide", "pretrain", "eval", "ndc", "report")
# (table key, JSON path inside a run's gathered numbers, header)
EVAL_METRICS = (("knn_best_acc", "kNN acc (best k on test)"), ("knn_val_acc", "kNN acc (k on val)"),
                ("linear_acc", "linear acc"), ("knn_best_f1", "kNN macro-F1 (best k)"),
                ("knn_val_f1", "kNN macro-F1 (k on val)"), ("linear_f1", "linear macro-F1"))
NDC_METRICS = (("mcspatnet_det_v", "F_det (mcspatnet)"), ("mcspatnet_mean_v", "mean class F1 (mcspatnet)"),
               ("muse_det_v", "F_det (muse)"), ("muse_mean_v", "mean class F1 (muse)"))
NDC_FIXED_METRICS = (("mcspatnet_det", "F_det (mcspatnet) @0.5"), ("mcspatnet_mean", "mean class F1 (mcspatnet) @0.5"),
                     ("muse_det", "F_det (muse) @0.5"), ("muse_mean", "mean class F1 (muse) @0.5"))


# ----------------------------------------------------------------------------------------------------- commands

def run_name(method: str, seed: int) -> str:
  return f"{method}_s{seed}"


def model_variant(variant: str) -> str:
  """The backbone variant (configs/models.py) that a configs/pretrain.py variant trains."""
  import sys as _sys  # pylint: disable=import-outside-toplevel,reimported
  repo = str(pathlib.Path(__file__).resolve().parent.parent)
  if repo not in _sys.path:
    _sys.path.insert(0, repo)
  from configs import pretrain  # pylint: disable=import-outside-toplevel
  return str(pretrain.get_config(variant).model.name)


def pretrain_command(python: str, root: pathlib.Path, method: str, seed: int, source: str,
                     region_mpp: float | None, extra: Sequence[str] = (),
                     variant: str = DEFAULT_VARIANT) -> list[str]:
  """`python -m muse_jax.main` for one pretrained method and seed (`region_mpp` None: no slide regions)."""
  cmd = [python, "-m", "muse_jax.main", "--config", f"configs/pretrain.py:{variant}",
         "--workdir", str(root / "pretrain" / run_name(method, seed)),
         f"--config.seed={seed}", f"--config.data.source={source}"]
  if region_mpp is not None:
    cmd.append(f"--config.data.region_mpp={region_mpp}")
  cmd += [f"--config.{k}={v}" for k, v in METHOD_OVERRIDES[method].items()]
  return cmd + list(extra)


def backbone_of(root: pathlib.Path, method: str, seed: int, variant: str = DEFAULT_VARIANT) -> str:
  """The backbone source of a method: random:<model> (seed passed separately), raw:16, or the exported teacher."""
  if method == "random":
    return f"random:{model_variant(variant)}"
  if method == "raw":
    return RAW_SOURCE
  return str(root / "pretrain" / run_name(method, seed) / "export")


def eval_command(python: str, root: pathlib.Path, brca: str, method: str, seed: int,
                 variant: str = DEFAULT_VARIANT) -> list[str]:
  return [python, "-m", "muse_jax.evaluate", "--backbone", backbone_of(root, method, seed, variant),
          "--backbone_seed", str(seed), "--method", f"{method} s{seed}", "--dataset", "brca_m2c",
          "--data_dir", brca, "--protocols", "knn,linear", "--mpp", str(EVAL_MPP), "--size", str(EVAL_SIZE),
          "--out", str(root / "eval" / run_name(method, seed)), "--no_progress"]


def ndc_commands(python: str, root: pathlib.Path, brca: str, method: str, seed: int,
                 steps: int = NDC_STEPS, overrides: Sequence[str] = (), stage_dir: str = "ndc",
                 variant: str = DEFAULT_VARIANT) -> list[list[str]]:
  """Fine-tune; predict the val and test tiles; choose the score threshold on val; score test (mcspatnet + muse).

  Test is scored twice: at the config's fixed threshold 0.5 (`scores.json`) and at the threshold that maximises
  `NDC_SELECT` on val (`scores_valthr.json`; the val sweep is `val_sweep.json`).
  """
  wd = root / stage_dir / run_name(method, seed)
  if method == "raw":
    raise ValueError("the raw-pixel baseline has no backbone to fine-tune (ndc stage)")
  # random init: the backbone variant that the pretrained methods train (tiny_p8 for small / small_sk), so the
  # comparison is between initialisations of one architecture.
  init = backbone_of(root, method, seed, variant)

  def files(split):
    names = (pathlib.Path(brca) / f"brca_ds_{split}.txt").read_text().split()
    return [str(pathlib.Path(brca) / "images" / n) for n in names]

  ft = [python, "-m", "muse_jax.finetune", "--config", NDC_CONFIG, "--init", init,
        "--workdir", str(wd / "train"), f"--config.seed={seed}", f"--config.data.dir={brca}",
        f"--config.train.steps={steps}", "--config.train.progress=False", f"--config.train.ckpt_every={steps}",
        "--config.train.log_every=25", "--config.train.eval_every=0", "--config.eval.max_images=3"]
  ft += [f"--config.{o}" for o in overrides]
  preds = [[python, "-m", "muse_jax.predict", "--checkpoint", str(wd / "train" / "export"), "--inputs", *files(split),
            "--mpp", "0.5", "--out", str(wd / f"{split}_pred"), "--no-overlay",
            "--score-threshold", str(NDC_PRED_THRESHOLD)] for split in ("val", "test")]
  base = [python, "-m", "muse_jax.score", "--labels", brca, "--mpp", "0.5", "--modes", "mcspatnet,muse"]
  sweep = base + ["--predictions", str(wd / "val_pred"), "--split", "val", "--sweep", "auto", "--select", NDC_SELECT,
                  "--json", str(wd / "val_sweep.json")]
  fixed = base + ["--predictions", str(wd / "test_pred"), "--split", "test", "--score-threshold", "0.5",
                  "--json", str(wd / "scores.json")]
  chosen = base + ["--predictions", str(wd / "test_pred"), "--split", "test",
                   "--threshold-from", str(wd / "val_sweep.json"), "--json", str(wd / "scores_valthr.json")]
  return [ft, *preds, sweep, fixed, chosen]


def short_cmd(cmd: Sequence[str], max_inputs: int = 2) -> str:
  """The command as a shell line, with long `--inputs` lists shortened (for tables)."""
  out, skip = [], 0
  for i, a in enumerate(cmd):
    if skip:
      skip -= 1
      continue
    out.append(a)
    if a == "--inputs":
      files = []
      for x in cmd[i + 1:]:
        if x.startswith("--"):
          break
        files.append(x)
      out += files[:max_inputs] + ([f"... ({len(files)} files)"] if len(files) > max_inputs else [])
      skip = len(files)
  return shlex.join(out)


# ------------------------------------------------------------------------------------------------------ runner

def run_logged(cmds: list[list[str]], run_dir: pathlib.Path, *, cwd: str, env: dict[str, str] | None = None,
               done_file: str = "run.json") -> dict[str, Any]:
  """Runs `cmds` one after the other (stops at the first failure), logs to `run_dir/log.txt`, records
  `run_dir/run.json` {'commands', 'wall_s' (per command), 'rc', 'finished'}. Skips when already finished."""
  run_dir.mkdir(parents=True, exist_ok=True)
  done = run_dir / done_file
  if done.exists():
    rec = json.loads(done.read_text())
    if rec.get("finished"):
      print(f"[skip] {run_dir} (finished: {sum(rec['wall_s']):.0f} s)", flush=True)
      return rec
  rec = {"commands": [shlex.join(c) for c in cmds], "wall_s": [], "rc": None, "finished": False,
         "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  with (run_dir / "log.txt").open("a") as log:
    for c in cmds:
      print("$ " + short_cmd(c), flush=True)
      log.write("$ " + shlex.join(c) + "\n")
      log.flush()
      t = time.perf_counter()
      p = subprocess.run(c, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
      rec["wall_s"].append(round(time.perf_counter() - t, 1))
      rec["rc"] = p.returncode
      print(f"  -> rc {p.returncode} in {rec['wall_s'][-1]:.0f} s", flush=True)
      if p.returncode:
        break
  rec["finished"] = rec["rc"] == 0
  done.write_text(json.dumps(rec, indent=2))
  return rec


# ------------------------------------------------------------------------------------------------------ slide

def cut_slide(slide_path: str, out: pathlib.Path, *, size: int = REGION_SIZE,
              min_tissue: float = REGION_MIN_TISSUE) -> dict[str, Any]:
  """Cuts `slide_path` into non-overlapping `size` px regions at its native mpp, keeping those with at least
  `min_tissue` tissue (thumbnail mask), and writes `out/images/<name>.png` + `out/points/<name>.csv` (x, y from
  the classical detector). Returns a summary (also `out/regions.json`)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel

  from muse_jax.data import detect  # pylint: disable=import-outside-toplevel
  from muse_jax.slide import reader, tissue  # pylint: disable=import-outside-toplevel

  summary_path = out / "regions.json"
  if summary_path.exists():
    return json.loads(summary_path.read_text())
  (out / "images").mkdir(parents=True, exist_ok=True)
  (out / "points").mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  with reader.open_slide(slide_path) as s:
    mpp = float(s.mpp)
    thumb_mpp = 8.0
    thumb = s.thumbnail(thumb_mpp)
    mask = tissue.tissue_mask(thumb, thumb_mpp)
    w, h = s.dimensions
    scale = mpp / thumb_mpp  # thumbnail px per level-0 px
    kept, skipped = [], 0
    for y in range(0, h - size + 1, size):
      for x in range(0, w - size + 1, size):
        m = mask[int(y * scale):int(math.ceil((y + size) * scale)), int(x * scale):int(math.ceil((x + size) * scale))]
        frac = float(m.mean()) if m.size else 0.0
        if frac < min_tissue:
          skipped += 1
          continue
        img = s.read_level(0, x, y, size, size)
        pts = detect.detect_nuclei(img, mpp)
        name = f"cmu1_x{x}_y{y}"
        Image.fromarray(img).save(out / "images" / f"{name}.png")
        with (out / "points" / f"{name}.csv").open("w") as f:
          f.write("x,y\n" + "".join(f"{px:.2f},{py:.2f}\n" for px, py in np.asarray(pts)))
        kept.append({"name": name, "x": x, "y": y, "tissue": round(frac, 3), "nuclei": int(len(pts))})
  summary = {"slide": str(slide_path), "mpp": mpp, "size": size, "min_tissue": min_tissue,
             "slide_px": [int(w), int(h)], "regions": kept, "skipped_background": skipped,
             "nuclei": int(sum(r["nuclei"] for r in kept)), "seconds": round(time.perf_counter() - t0, 1)}
  summary_path.write_text(json.dumps(summary, indent=2))
  return summary


# ------------------------------------------------------------------------------------------------- stages

def slide_source(root: pathlib.Path, brca: str, no_slide: bool = False) -> str:
  return f"brca:{brca}" if no_slide else f"brca:{brca}|folder:{root / 'slide_regions'}"


def do_pretrain(args, method: str, seed: int) -> dict[str, Any] | None:
  """Pretrains one method/seed (resuming) and exports its teacher; None for `random`."""
  if method in ("random", "raw"):
    return None
  root = pathlib.Path(args.root)
  no_slide = getattr(args, "no_slide", False)
  region_mpp = None if no_slide else json.loads((root / "slide_regions" / "regions.json").read_text())["mpp"]
  wd = root / "pretrain" / run_name(method, seed)
  extra = [f"--config.total_steps={args.pretrain_steps}"] if args.pretrain_steps else []
  cmds = [pretrain_command(args.python, root, method, seed, slide_source(root, args.brca, no_slide), region_mpp,
                           extra, args.variant),
          [args.python, "-m", "muse_jax.export", "--workdir", str(wd), "--out", str(wd / "export")]]
  return run_logged(cmds, wd, cwd=args.repo)


def do_eval(args, method: str, seed: int) -> dict[str, Any]:
  root = pathlib.Path(args.root)
  return run_logged([eval_command(args.python, root, args.brca, method, seed, args.variant)],
                    root / "eval" / run_name(method, seed), cwd=args.repo, done_file="run.json")


def do_ndc(args, method: str, seed: int) -> dict[str, Any]:
  root = pathlib.Path(args.root)
  stage_dir = f"ndc_{args.ndc_tag}" if args.ndc_tag else "ndc"
  return run_logged(ndc_commands(args.python, root, args.brca, method, seed, args.ndc_steps, args.ndc_override,
                                 stage_dir, args.variant), root / stage_dir / run_name(method, seed), cwd=args.repo)


def chain(args, method: str, seed: int, stages: Sequence[str]) -> None:
  """The stages of one method/seed in order; a failed stage stops the chain (reported, not raised)."""
  for st, fn in (("pretrain", do_pretrain), ("eval", do_eval), ("ndc", do_ndc)):
    if st not in stages:
      continue
    if st == "ndc" and method == "raw":
      continue
    if st != "pretrain" and method not in ("random", "raw") and getattr(args, "wait_pretrain", False):
      while not _finished(args, "pretrain", method, seed):  # another driver is pretraining it
        if args.deadline and time.time() > args.deadline:
          print(f"[deadline] {run_name(method, seed)} was not pretrained in time", flush=True)
          return
        time.sleep(10)
    if args.deadline and time.time() > args.deadline and not _finished(args, st, method, seed):
      print(f"[deadline] not starting {st} {run_name(method, seed)}", flush=True)
      return
    rec = fn(args, method, seed)
    if rec is not None and not rec.get("finished"):
      print(f"[failed] {st} {run_name(method, seed)}: see {args.root}/{st}/{run_name(method, seed)}/log.txt",
            flush=True)
      return


def _finished(args, stage: str, method: str, seed: int) -> bool:
  p = pathlib.Path(args.root) / stage / run_name(method, seed) / "run.json"
  return p.exists() and json.loads(p.read_text()).get("finished", False)


def run_all(args, stages: Sequence[str]) -> None:
  """Seed-major order (every method of seed 0 first), `--jobs` chains at a time."""
  from concurrent.futures import ThreadPoolExecutor  # pylint: disable=import-outside-toplevel

  jobs = [(m, s) for s in args.seeds for m in args.methods]
  if args.jobs <= 1:
    for m, s in jobs:
      chain(args, m, s, stages)
    return
  with ThreadPoolExecutor(args.jobs) as ex:
    for f in [ex.submit(chain, args, m, s, stages) for m, s in jobs]:
      f.result()


# ------------------------------------------------------------------------------------------------- gather

def _get(d: Any, *keys, default=None):
  for k in keys:
    if not isinstance(d, dict) or k not in d:
      return default
    d = d[k]
  return d


def eval_numbers(results: dict) -> dict[str, float]:
  """kNN (best k on test, k on val) and linear accuracy / macro-F1 (in %) from an evaluate `results.json`."""
  out: dict[str, float] = {}
  for r in results.get("rows", []):
    res = r["result"]
    if r["protocol"] == "knn":
      out["knn_best_acc"] = 100 * res["official"]["accuracy"]
      out["knn_best_f1"] = 100 * res["official"]["metrics"]["macro_f1"]
      out["knn_best_k"] = res["official"]["k"]
      if "honest" in res:
        out["knn_val_acc"] = 100 * res["honest"]["accuracy"]
        out["knn_val_f1"] = 100 * res["honest"]["metrics"]["macro_f1"]
        out["knn_val_k"] = res["honest"]["k"]
    elif r["protocol"] == "linear":
      out["linear_acc"] = 100 * res["accuracy"]
      out["linear_f1"] = 100 * res["metrics"]["macro_f1"]
      out["linear_epoch"] = res.get("best_epoch")
  return out


def ndc_numbers(scores: list[dict], suffix: str = "") -> dict[str, float]:
  """Detection F1 and mean class F1 (in %) per matching rule from a `muse_jax.score --json` file."""
  out = {}
  for s in scores:
    out[f"{s['mode']}_det{suffix}"] = 100 * s["detection"]["f1"]
    out[f"{s['mode']}_mean{suffix}"] = 100 * s["mean_f1"]
  return out


def read_curve(metrics_path: pathlib.Path) -> list[dict]:
  if not metrics_path.exists():
    return []
  return [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip() and '"loss"' in x]


def gather(root: pathlib.Path, methods: Sequence[str] = METHODS, seeds: Sequence[int] = SEEDS) -> dict:
  """Every number of the study: {'runs': {name: {method, seed, eval..., ndc..., wall_s...}}, 'curves': {...}}."""
  runs, curves = {}, {}
  for m in methods:
    for s in seeds:
      name = run_name(m, s)
      rec: dict[str, Any] = {"method": m, "seed": s}
      for stage in ("pretrain", "eval", "ndc"):
        rj = root / stage / name / "run.json"
        if rj.exists():
          r = json.loads(rj.read_text())
          rec[f"{stage}_wall_s"] = r["wall_s"]
          rec[f"{stage}_finished"] = r["finished"]
          rec[f"{stage}_commands"] = r["commands"]
      ev = root / "eval" / name / "results.json"
      if ev.exists():
        rec.update(eval_numbers(json.loads(ev.read_text())))
      nd = root / "ndc" / name
      for fname, suffix in (("scores.json", ""), ("scores_valthr.json", "_v")):  # test at 0.5 / at the val threshold
        if (nd / fname).exists():
          rec.update(ndc_numbers(json.loads((nd / fname).read_text()), suffix))
      if (nd / "val_sweep.json").exists():
        rec["ndc_threshold"] = json.loads((nd / "val_sweep.json").read_text())["best_threshold"]
      if m not in ("random", "raw"):
        curve = read_curve(root / "pretrain" / name / "metrics.jsonl")
        if curve:
          curves[name] = [{k: c.get(k) for k in ("step", "loss", "loss_image", "loss_nu", "steps_per_s")}
                          for c in curve]
          rec["pretrain_steps"] = curve[-1]["step"]
          hp = root / "pretrain" / name / "health.json"
          if hp.exists():
            rec["health"] = json.loads(hp.read_text())["line"]
          rec["final_loss"] = curve[-1]["loss"]
          rec["steps_per_s"] = curve[-1].get("steps_per_s")
      runs[name] = rec
  heads = {}
  for cfg in sorted((root / "pretrain").glob("*/config.json")) if (root / "pretrain").is_dir() else []:
    heads = json.loads(cfg.read_text()).get("heads", {})
    break
  return {"runs": runs, "curves": curves, "heads": heads}


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
  """Mean and sample standard deviation (ddof=1; 0 for one value) of the finite values, and their count."""
  v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
  if not v:
    return float("nan"), float("nan"), 0
  mu = sum(v) / len(v)
  sd = math.sqrt(sum((x - mu) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
  return mu, sd, len(v)


def aggregate(data: dict, keys: Sequence[str], methods: Sequence[str] = METHODS) -> dict[str, dict[str, tuple]]:
  """{method: {key: (mean, std, n)}} over the seeds present."""
  out = {}
  for m in methods:
    rs = [r for r in data["runs"].values() if r["method"] == m]
    out[m] = {k: mean_std([r.get(k) for r in rs]) for k in keys}
  return out


def fmt_ms(t: tuple) -> str:
  mu, sd, n = t
  if n == 0:
    return "not run"
  return f"{mu:.2f} ± {sd:.2f}" + ("" if n == 3 else f" (n={n})")


def table(data: dict, metrics: Sequence[tuple[str, str]], methods: Sequence[str] = METHODS) -> str:
  """Markdown: one row per method, mean ± std over seeds of each metric."""
  agg = aggregate(data, [k for k, _ in metrics], methods)
  lines = ["| method | " + " | ".join(h for _, h in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
  for m in methods:
    lines.append(f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(fmt_ms(agg[m][k]) for k, _ in metrics) + " |")
  return "\n".join(lines)


def paired_table(data: dict, metrics: Sequence[tuple[str, str]], methods: Sequence[str] = METHODS,
                 baseline: str = "random") -> str:
  """Markdown: per method, mean ± std over seeds of (method - baseline) with the same seed (paired differences)."""
  lines = ["| method - " + baseline + " (same seed) | " + " | ".join(h for _, h in metrics) + " |",
           "|---" * (len(metrics) + 1) + "|"]
  runs = data["runs"]
  for m in methods:
    if m == baseline:
      continue
    cells = []
    for k, _ in metrics:
      diffs = [r.get(k) - runs[run_name(baseline, r["seed"])].get(k) for r in runs.values()
               if r["method"] == m and r.get(k) is not None
               and runs.get(run_name(baseline, r["seed"]), {}).get(k) is not None]
      mu, sd, n = mean_std(diffs)
      cells.append("not run" if n == 0 else f"{mu:+.2f} ± {sd:.2f}" + ("" if n == 3 else f" (n={n})"))
    lines.append(f"| {METHOD_LABELS.get(m, m)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def per_seed_table(data: dict, metrics: Sequence[tuple[str, str]]) -> str:
  lines = ["| run | " + " | ".join(h for _, h in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
  for name, r in data["runs"].items():
    cells = []
    for k, _ in metrics:
      v = r.get(k)
      cells.append("–" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v)))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def wall_table(data: dict) -> str:
  lines = ["| run | pretrain + export (s) | steps | steps/s | eval kNN + linear (s) | NDC fine-tune + predict val + "
           "predict test + val sweep + score test @0.5 + score test @val threshold (s) |", "|---|---|---|---|---|---|"]
  for name, r in data["runs"].items():
    def w(key):
      v = r.get(key)
      return "–" if not v else " + ".join(f"{x:.0f}" for x in v) + ("" if r.get(key.replace("wall_s", "finished"))
                                                                     else " (unfinished)")
    sps = r.get("steps_per_s")
    lines.append(f"| {name} | {w('pretrain_wall_s')} | {r.get('pretrain_steps', '–')} | "
                 f"{'–' if sps is None else f'{sps:.2f}'} | {w('eval_wall_s')} | {w('ndc_wall_s')} |")
  return "\n".join(lines)


def plot_figures(data: dict, fig_dir: pathlib.Path, methods: Sequence[str] = METHODS) -> list[str]:
  """Loss curves per method (one line per seed) and accuracy / F1 bars by method with the seed spread."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig_dir.mkdir(parents=True, exist_ok=True)
  written = []
  pre = [m for m in methods if m not in ("random", "raw")]
  if data["curves"]:
    fig, axes = plt.subplots(1, len(pre), figsize=(3.2 * len(pre), 2.8), sharey=False, squeeze=False)
    axes = axes[0]
    for ax, m in zip(axes, pre):
      for name, c in sorted(data["curves"].items()):
        if data["runs"][name]["method"] != m:
          continue
        steps = [x["step"] for x in c]
        ax.plot(steps, [x["loss"] for x in c], label=f"total s{data['runs'][name]['seed']}")
        if m in ("muse", "muse_fixed"):
          ax.plot(steps, [x["loss_image"] for x in c], ls=":", lw=0.8, color=ax.lines[-1].get_color())
          ax.plot(steps, [x["loss_nu"] for x in c], ls="--", lw=0.8, color=ax.lines[-1].get_color())
      heads = data.get("heads") or {}
      for key, on in (("cls_out_dim", m != "nulo"), ("nu_out_dim", m not in ("dino",))):
        if on and heads.get(key):  # cross-entropy of a uniform teacher/student: ln K
          ax.axhline(math.log(heads[key]), color="grey", lw=0.6, ls="-.")
      ax.set_title(METHOD_LABELS[m], fontsize=8)
      ax.set_xlabel("step", fontsize=8)
      ax.tick_params(labelsize=7)
      ax.legend(fontsize=6)
    axes[0].set_ylabel("loss (MUSE: total; dotted image, dashed nucleus;\ngrey: ln K, uniform)", fontsize=6)
    fig.tight_layout()
    p = fig_dir / "study_loss_curves.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    written.append(str(p))
  for fname, metrics, title in (
      ("study_eval_by_method.png", EVAL_METRICS, "BRCA-M2C test, mpp 0.5 / 224: kNN and linear (%)"),
      ("study_ndc_by_method.png", NDC_METRICS, "BRCA-M2C test, NDC after fine-tuning (%)")):
    fig, ax = plt.subplots(figsize=(7.5, 3.0))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
      rs = [r for r in data["runs"].values() if r["method"] == m]
      for i, (k, _) in enumerate(metrics):
        vals = [r[k] for r in rs if r.get(k) is not None]
        if not vals:
          continue
        mu, sd, _ = mean_std(vals)
        x = i + (j - (len(methods) - 1) / 2) * width
        ax.errorbar([x], [mu], yerr=[sd], fmt="o", ms=4, color=f"C{j}", capsize=2,
                    label=METHOD_LABELS[m] if i == 0 else None)
        ax.scatter([x] * len(vals), vals, s=5, color="k", zorder=3)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([h for _, h in metrics], fontsize=6, rotation=15)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(title + "; mean ± std over seeds, dots = seeds", fontsize=8)
    ax.grid(axis="y", lw=0.3)
    ax.legend(fontsize=6, ncol=len(methods), loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    p = fig_dir / fname
    fig.savefig(p, dpi=90)
    plt.close(fig)
    written.append(str(p))
  return written


def report(root: pathlib.Path, fig_dir: pathlib.Path, methods: Sequence[str] = METHODS,
           seeds: Sequence[int] = SEEDS) -> str:
  """Writes `root/study.json`, `root/study.md` and the figures; returns the Markdown."""
  data = gather(root, methods, seeds)
  figs = plot_figures(data, fig_dir, methods)
  md = ["### Linear / kNN (BRCA-M2C test, mpp 0.5, size 224; %, mean ± std over seeds)", "",
        table(data, EVAL_METRICS, methods), "",
        "Paired differences to random init with the same seed (percentage points):", "",
        paired_table(data, EVAL_METRICS, methods), "",
        "### NDC after fine-tuning (BRCA-M2C test; F1 %, mean ± std over seeds)", "",
        "Score threshold chosen on val (by " + NDC_SELECT + "):", "",
        table(data, NDC_METRICS, methods), "",
        "Paired differences to random init with the same seed (percentage points):", "",
        paired_table(data, NDC_METRICS, methods), "",
        "At the config's fixed score threshold 0.5:", "",
        table(data, NDC_FIXED_METRICS, methods), "", "### Per seed", "",
        per_seed_table(data, EVAL_METRICS + (("knn_best_k", "k (best)"), ("knn_val_k", "k (val)"),
                                             ("linear_epoch", "linear epoch")) + NDC_METRICS
                       + (("ndc_threshold", "NDC threshold (val)"),) + NDC_FIXED_METRICS
                       + (("final_loss", "final pretrain loss"),)), "",
        "### Wall time per run (s)", "", wall_table(data), ""]
  text = "\n".join(md)
  (root / "study.md").write_text(text)
  (root / "study.json").write_text(json.dumps({**data, "figures": figs}, indent=1))
  return text


# ------------------------------------------------------------------------------------------------------- CLI

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python experiments/study.py", description=__doc__.splitlines()[0])
  p.add_argument("stage", choices=STAGES + ("all",))
  p.add_argument("--brca", default=os.environ.get("MUSE_BRCA_M2C_DIR"), help="BRCA-M2C folder")
  p.add_argument("--slide", default=None, help="the unlabelled slide (a file, or a folder holding one .svs)")
  p.add_argument("--root", default="runs/study", help="output folder of every run")
  p.add_argument("--figures", default=str(pathlib.Path(__file__).parent / "figures"))
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
  p.add_argument("--no_slide", action="store_true",
                 help="pretrain on BRCA-M2C train + val only (no slide regions; the slide stage is not needed)")
  p.add_argument("--variant", default=DEFAULT_VARIANT,
                 help="configs/pretrain.py variant of the pretrained methods ('small': issue #21's recipe; 'study': "
                      "the first study's)")
  p.add_argument("--pretrain_steps", type=int, default=0, help="override total_steps (0: the study config's)")
  p.add_argument("--ndc_steps", type=int, default=NDC_STEPS)
  p.add_argument("--ndc_override", action="append", default=[],
                 help="ndc: extra fine-tuning config override FIELD=VALUE (repeatable), e.g. "
                      "optim.backbone_train_mode=True; use with --ndc_tag")
  p.add_argument("--ndc_tag", default="", help="ndc: write the runs to ROOT/ndc_<tag>/ (controls; not in the report)")
  p.add_argument("--jobs", type=int, default=1, help="method/seed chains run at once")
  p.add_argument("--deadline", default=None,
                 help="HH:MM UTC (the next such time, tomorrow once passed): start no new run after it")
  p.add_argument("--wait_pretrain", action="store_true",
                 help="eval/ndc: wait for each pretraining (run by another driver) to finish")
  p.add_argument("--python", default=sys.executable)
  a = p.parse_args(argv)
  a.methods = [m for m in a.methods.split(",") if m]
  bad = [m for m in a.methods if m not in METHODS]
  if bad:
    p.error(f"--methods: unknown {bad}; expected some of {METHODS}")
  a.seeds = [int(s) for s in a.seeds.split(",") if s]
  if a.ndc_override and not a.ndc_tag:
    p.error("--ndc_override changes the NDC runs: give --ndc_tag so they do not mix with the study's ndc/ runs")
  a.repo = str(pathlib.Path(__file__).resolve().parent.parent)
  a.root = str(pathlib.Path(a.root).resolve())
  if a.deadline:
    sys.path.insert(0, a.repo)
    from experiments import clock  # pylint: disable=import-outside-toplevel
    a.deadline = clock.next_utc(a.deadline, "--deadline")
  if a.stage != "report" and not a.brca:
    p.error("--brca (or MUSE_BRCA_M2C_DIR) is required")
  if a.stage in ("slide", "all") and not a.slide:
    p.error("--slide is required for the slide stage")
  return a


def main(argv: Sequence[str] | None = None) -> int:
  a = parse_args(argv)
  root = pathlib.Path(a.root)
  root.mkdir(parents=True, exist_ok=True)
  if a.stage in ("slide", "all"):
    slide = pathlib.Path(a.slide)
    if slide.is_dir():
      found = sorted(slide.glob("*.svs"))
      if not found:
        raise SystemExit(f"--slide {slide}: no .svs file in the folder")
      slide = found[0]
    s = cut_slide(str(slide), root / "slide_regions")
    print(f"slide: {len(s['regions'])} regions of {s['size']} px at {s['mpp']} µm/px, {s['nuclei']} detected "
          f"nuclei, {s['skipped_background']} background windows skipped", flush=True)
  stages = ["pretrain", "eval", "ndc"] if a.stage == "all" else [a.stage]
  if any(s in stages for s in ("pretrain", "eval", "ndc")):
    run_all(a, stages)
  if a.stage in ("report", "all"):
    print(report(root, pathlib.Path(a.figures), a.methods, a.seeds))
  return 0


if __name__ == "__main__":
  sys.exit(main())
