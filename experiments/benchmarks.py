r"""Runs every `experiments/bench_*.py` and writes `experiments/BENCHMARKS.md` (+ `experiments/benchmarks.json`).

Run from the repository root:

  PYTHONPATH=. .venv/bin/python -m experiments.benchmarks --quick --brca /path/to/BRCA-M2C   # ~15 min on 2 cores
  PYTHONPATH=. .venv/bin/python -m experiments.benchmarks --brca /path/to/BRCA-M2C           # each benchmark's defaults
  PYTHONPATH=. .venv/bin/python -m experiments.benchmarks --quick --only bench_eval,predict  # rerun a subset
  PYTHONPATH=. .venv/bin/python -m experiments.benchmarks --render   # rewrite the markdown from benchmarks.json

Each benchmark runs in its own subprocess (cwd = repository root, `PYTHONPATH` = repository root) with the
arguments of the chosen profile plus `--json experiments/out/benchmarks/<name>.json`; its printed output is kept,
its JSON rows are read back. Profiles: `full` (no arguments: each benchmark's defaults), `quick` (tiny + vit_s16 at
the smallest sensible sizes and repeats, ~15 min on 2 cores) and `smoke` (tiny models only, a check of the wiring).
`--brca PATH` (a BRCA-M2C folder) is passed to the benchmarks that read real data (`bench_data`: pipeline on the
BRCA-M2C regions and the classical detector's F1 on its test split); without it those parts are skipped and the
summary says so. A benchmark that exits non-zero, times out or writes no JSON is reported as failed, with the last
lines of its stderr. `--only NAME[,NAME]` reruns a subset and keeps the other benchmarks' entries from the previous
`benchmarks.json`.

The output has: a header (machine, date, load average before/after, the regeneration command), ONE summary table
(a row per measurement that matters: what, figure, unit, the same-run baseline and ratio where the benchmark has one,
and the exact command of that benchmark), then per benchmark the output it printed (tables as markdown, other
lines verbatim).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
MD_PATH = EXPERIMENTS / "BENCHMARKS.md"
JSON_PATH = EXPERIMENTS / "benchmarks.json"
OUT_DIR = EXPERIMENTS / "out" / "benchmarks"
STDERR_TAIL_LINES = 25

# Arguments per profile; a benchmark missing from a profile runs with its defaults.
PROFILES: dict[str, dict[str, list[str]]] = {
    "full": {},
    "quick": {
        "bench_backbone": ["--models", "tiny,vit_s16,vit_b16,r50", "--repeats", "3", "--sampler_repeats", "1",
                           "--conv_impl", "auto,xla"],
        "bench_corpus": ["--sizes", "4096", "8192", "--repeats", "1"],
        "bench_host_malloc": ["--what", "backbone:vit_s16,backbone:r50,pretrain:vit_s16", "--rounds", "2",
                              "--repeats", "3"],
        "bench_data": ["--batch_size", "8", "--batches", "5", "--repeats", "3", "--workers", "0,1,2",
                       "--model", "vit_s16", "--model_batch", "1", "--aug", "host,device"],
        "bench_eval": ["--repeats", "1", "--tiles", "20"],
        "bench_predict": ["--variants", "tiny,vit_s16", "--repeats", "1", "--image", "512", "--batch", "2"],
        "bench_slide": ["--sizes", "1024", "2048", "--models", "dots", "tiny", "vit_s16", "--vit-max-size", "1024"],
        "bench_train": ["--configs", "tiny,vit_s16", "--vit_batch", "1", "--repeats", "3"],
    },
    "smoke": {
        "bench_backbone": ["--models", "tiny", "--repeats", "1", "--sampler_repeats", "1"],
        "bench_corpus": ["--roi_size", "512", "--sizes", "--repeats", "1"],
        "bench_host_malloc": ["--what", "backbone:tiny", "--rounds", "1", "--repeats", "1"],
        "bench_data": ["--batch_size", "2", "--batches", "1", "--repeats", "1", "--workers", "0", "--model", "tiny",
                       "--model_batch", "1"],
        "bench_eval": ["--repeats", "1", "--tiles", "4", "--skip_vit"],
        "bench_predict": ["--variants", "tiny", "--repeats", "1", "--image", "256"],
        "bench_slide": ["--sizes", "512", "--models", "dots", "tiny"],
        "bench_train": ["--configs", "tiny", "--repeats", "1"],
    },
}
# Benchmarks that read a BRCA-M2C folder: name -> (their flag, what is skipped without it).
DATA_FLAGS = {"bench_data": ("--data", "pipeline on BRCA-M2C regions (bundled sample used instead) and the classical "
                                       "detector's F1 on the BRCA-M2C test split")}

Row = dict[str, Any]


# ----------------------------------------------------------------------------------------------------------------
# Formatting helpers.

def fmt(x: Any) -> str:
  """A number with about three significant figures; '-' for None/NaN; strings unchanged."""
  if x is None:
    return "-"
  if isinstance(x, bool) or isinstance(x, str):
    return str(x)
  if isinstance(x, int):
    return str(x)
  x = float(x)
  if math.isnan(x) or math.isinf(x):
    return "-"
  a = abs(x)
  if a >= 100:
    return f"{x:.0f}"
  if a >= 10:
    return f"{x:.1f}"
  if a >= 1:
    return f"{x:.2f}"
  return f"{x:.3g}"


def cell(x: Any) -> str:
  """A markdown table cell: pipes escaped, newlines flattened."""
  return str(x).replace("|", "\\|").replace("\n", " ").strip()


def sanitize(obj: Any, brca: str | None = None) -> Any:
  """NaN/inf -> None, recursively (so that benchmarks.json is standard JSON); with `brca`, that folder's path is
  written `<BRCA-M2C>` in every string (commands, sources, printed output: no machine paths in the repository)."""
  if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
    return None
  if isinstance(obj, str) and brca:
    return obj.replace(str(pathlib.Path(brca).resolve()), "<BRCA-M2C>").replace(str(brca).rstrip("/"), "<BRCA-M2C>")
  if isinstance(obj, dict):
    return {k: sanitize(v, brca) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [sanitize(v, brca) for v in obj]
  return obj


LOWER_IS_BETTER = ("s", "ms", "s/mm²", "MB", "h")  # units (first word) where a smaller figure is better


def ratio_text(figure: Any, base: Any, unit: str) -> str:
  """'figure / baseline' as 'R x', with which way it goes for times and rates: '0.65x (1.54x faster)'."""
  try:
    r = float(figure) / float(base)
  except (TypeError, ValueError, ZeroDivisionError):
    return "-"
  if math.isnan(r) or math.isinf(r) or r <= 0:
    return "-"
  lower = unit.split(" ")[0] in LOWER_IS_BETTER
  if unit.split(" ")[0] in ("GFLOP/s",):  # achieved vs peak: a fraction, no direction
    return f"{fmt(r)}x ({100 * r:.1f}% of it)"
  better = (r < 1) if lower else (r > 1)
  k = 1 / r if r < 1 else r
  word = ("faster" if better else "slower") if lower or unit.endswith("/s") else ("better" if better else "worse")
  return f"{fmt(r)}x" if abs(r - 1) < 1e-9 else f"{fmt(r)}x ({fmt(k)}x {word})"


def _row(what: str, figure: Any, unit: str, baseline: str = "-", base_value: Any = None) -> Row:
  """A summary row; the ratio is figure / base_value (units equal), '-' without a baseline."""
  return dict(what=what, figure=fmt(figure), unit=unit, baseline=baseline,
              ratio=ratio_text(figure, base_value, unit) if base_value is not None else "-")


# ----------------------------------------------------------------------------------------------------------------
# Summary rows per benchmark (from its JSON). Each returns rows of what/figure/unit/baseline/ratio, with
# ratio = figure / baseline (both in the row's unit).

def _summary_backbone(res: dict) -> list[Row]:
  t = res["tables"]
  p = res.get("params", {})
  shape = f"batch {p.get('batch', '?')}, {p.get('size', '?')} px, fp32"
  rows = []
  for r in t.get("backbones", []):
    impl = f", conv_impl={r['conv_impl']}" if r.get("conv_impl") not in (None, "auto") else ""
    for part, key in (("forward", "forward"), ("fwd+bwd", "fwd_bwd")):
      ref = r.get(f"torch_{key}_s")
      rows.append(_row(f"{r['model']} backbone {part} ({shape}{impl})", r[f"{key}_wall_s"], "s (wall)",
                       f"PyTorch {fmt(ref)} s (same run, interleaved)" if ref else "-", ref))
  sampler = t.get("sampler", [])
  base = next((r for r in sampler if r["method"].startswith("vectorised")), None)
  for r in sampler:
    if r is base:
      rows.append(_row(f"sample_nuclei vectorised (jit) fwd+bwd (B={r['b']}, N={r['n']}, C={r['c']})",
                       r["fwd_bwd_wall_ms"], "ms (wall)"))
    else:
      rows.append(_row(f"sample_nuclei {r['method']} fwd+bwd", r["fwd_bwd_wall_ms"], "ms (wall)",
                       f"vectorised (jit) {fmt(base['fwd_bwd_wall_ms'])} ms" if base else "-",
                       base["fwd_bwd_wall_ms"] if base else None))
  return rows


def _summary_corpus(res: dict) -> list[Row]:
  t = res["tables"]
  rows = []
  for r in t.get("cmu", []):
    what = f"corpus build, CMU slide, {r['roi_size']} px ROIs at 0.5 µm/px, 1 worker"
    rows.append(_row(f"{what}: read + detect loop", r["loop_rois_per_s"], "ROIs/s"))
    rows.append(_row(f"{what}: whole Beam pipeline ({r['rois']} ROIs, start-up included)", r["build_rois_per_s"],
                     "ROIs/s", f"read + detect loop {fmt(r['loop_rois_per_s'])} ROIs/s", r["loop_rois_per_s"]))
    rows.append(_row(f"{what}: whole Beam pipeline", r["build_nuclei_per_s"], "nuclei/s"))
  for r in t.get("synthetic", []):
    rows.append(_row(f"corpus build, synthetic {r['size']}² px slide ({r['rois']} ROIs of {r['roi_size']} px), "
                     "1 worker", r["rois_per_s"], "ROIs/s"))
    rows.append(_row(f"corpus build, synthetic {r['size']}² px slide: peak RSS", r["peak_rss_mb"], "MB"))
  for e in t.get("estimate", []):
    rows.append(_row(f"TCGA_nu-sized corpus ({res['tcga_nu_rois']:,} ROIs of 1024 px) on {e['workers']} "
                     f"workers at {fmt(e['rois_per_s_per_worker'])} ROIs/s per worker (estimate)", e["hours"], "h"))
  for f in res.get("failed", []):
    rows.append(_row(f"corpus build {f['what']} {f.get('size', '')}".strip(), "FAILED", "-"))
  return rows


def _summary_data(res: dict) -> list[Row]:
  t = res["tables"]
  rows = []
  thr = t.get("throughput", [])
  consumer = next((r for r in thr if r.get("consumer")), None)
  for r in thr:
    if r is consumer:
      rows.append(_row(f"consumer: {r['what']}", r["regions_per_s"], "regions/s"))
    else:
      rows.append(_row(f"{r['what']} (source {res.get('source', '?')})", r["regions_per_s"], "regions/s",
                       f"consumer {fmt(consumer['regions_per_s'])} regions/s (target >= 2x)" if consumer else "-",
                       consumer["regions_per_s"] if consumer else None))
  per_core = {r["augment_on"]: r for r in t.get("host_per_core", [])}
  host = per_core.get("host")
  for mode, r in per_core.items():
    base = host if mode != "host" and host else None
    rows.append(_row(f"host pipeline per core, {mode} augmentation (in-process, 1 read thread; source "
                     f"{res.get('source', '?')})", r["regions_per_s_per_core"], "regions/s",
                     f"host augmentation {fmt(base['regions_per_s_per_core'])} regions/s" if base else "-",
                     base["regions_per_s_per_core"] if base else None))
    rows.append(_row(f"make_views alone per core, {mode} augmentation", r["views_only_regions_per_s"], "regions/s",
                     f"host augmentation {fmt(base['views_only_regions_per_s'])} regions/s" if base else "-",
                     base["views_only_regions_per_s"] if base else None))
    if r.get("render_regions_per_s"):
      rows.append(_row("device-side render (jitted augment.render) on this CPU", r["render_regions_per_s"],
                       "regions/s"))
  for r in t.get("cores_per_accelerator", []):
    for mode in per_core:
      rows.append(_row(f"host cores to feed {r['accelerator']} at {fmt(r['step_regions_per_s'])} regions/s, {mode} "
                       "augmentation", r[f"cores_{mode}"], "cores"))
  for r in t.get("shared_nuclei", []):
    rows.append(_row(f"nuclei shared by a local view and its best global view (default recipe, {r['regions']} "
                     "regions)", r["shared_local_best_global"], "nuclei"))
  det = t.get("detector")
  if det:
    d = det[0]
    rows.append(_row(f"classical detector on BRCA-M2C test ({d['tiles']} tiles, {fmt(d['radius_um'])} µm radius), "
                     f"P {fmt(d['precision'])} / R {fmt(d['recall'])}", d["f1"], "F1"))
  else:
    rows.append(_row("classical detector on BRCA-M2C test", "skipped (no --brca)", "F1"))
  return rows


def _summary_eval(res: dict) -> list[Row]:
  rows = []
  recs = res["tables"].get("eval", [])
  tiny = next((r for r in recs if r["step"] == "features" and r["variant"] == "tiny"), None)
  for r in recs:
    if r["step"] == "features":
      other = tiny is not None and r is not tiny
      rows.append(_row(f"feature extraction {r['variant']} ({r['size_px']} px, batch {r['batch']}, "
                       f"{r['tiles']} bundled tiles)", r["nuclei_per_s"], "nuclei/s",
                       f"tiny {fmt(tiny['nuclei_per_s'])} nuclei/s" if other else "-",
                       tiny["nuclei_per_s"] if other else None))
    elif r["step"] == "knn":
      rows.append(_row(f"kNN {r['train']:,} x {r['query']:,} x {r['dim']} (synthetic), 5 k, top-k by argpartition",
                       r["seconds"], "s", f"full sort {fmt(r['baseline_full_sort_seconds'])} s",
                       r["baseline_full_sort_seconds"]))
    elif r["step"] == "linear_probe":
      rows.append(_row(f"linear probe {r['train']:,} x {r['dim']}, {r['epochs']} epochs (synthetic); first call "
                       f"incl. compile {fmt(r['first_call_seconds'])} s", r["seconds"], "s"))
  return rows


def _summary_predict(res: dict) -> list[Row]:
  rows = []
  recs = res["tables"].get("predict", [])
  first = recs[0] if recs else None
  for r in recs:
    other = r is not first
    rows.append(_row(f"NDC predict_tiles {r['variant']} (window {r['window']}, batch {r['batch']})",
                     r["tiles_per_s"], "tiles/s", f"{first['variant']} {fmt(first['tiles_per_s'])} tiles/s"
                     if other else "-", first["tiles_per_s"] if other else None))
    rows.append(_row(f"NDC predict_image {r['variant']} ({res['params'].get('image', '?')}² px image)",
                     r["s_per_mm2_image"], "s/mm²"))
  return rows


def _summary_slide(res: dict) -> list[Row]:
  rows = []
  recs = res["tables"].get("slide", [])
  dots = {r["size"]: r for r in recs if r["model"] == "dots"}
  for r in recs:
    d = dots.get(r["size"]) if r["model"] != "dots" else None
    rows.append(_row(f"whole slide {r['model']}, {r['size']}² px synthetic ({r['tiles']} tissue tiles), "
                     f"{fmt(r['s_per_mm2'])} s/mm² tissue", r["tiles_per_s"], "tiles/s",
                     f"dots {fmt(d['tiles_per_s'])} tiles/s (same slide)" if d else "-",
                     d["tiles_per_s"] if d else None))
    rows.append(_row(f"whole slide {r['model']}, {r['size']}² px: peak RSS", r["peak_rss_mb"], "MB"))
  for f in res.get("failed", []):
    rows.append(_row(f"whole slide {f['model']}, {f['size']}² px", "FAILED", "-"))
  return rows


def _summary_host_malloc(res: dict) -> list[Row]:
  rows = []
  for r in res["tables"].get("host_malloc", []):
    off, on = r["off"], r["on"]
    rows.append(_row(f"{r['what']} with MUSE_HOST_MALLOC=on ({fmt(on['minor_faults'])} page faults / call; off: "
                     f"{fmt(off['minor_faults'])})", on["wall_s"], "s (wall)",
                     f"MUSE_HOST_MALLOC=off {fmt(off['wall_s'])} s (same run, alternating processes)",
                     off["wall_s"]))
  return rows


def _summary_train(res: dict) -> list[Row]:
  peak = res.get("matmul_peak_gflop_per_s")
  rows = [_row("matmul peak (2048³ f32), same run", peak, "GFLOP/s")]
  for r in res["tables"].get("train", []):
    what = f"pretrain {r['config']} {r['part']} (batch {r['batch']}, {r['views']} views)"
    if r["part"] == "full step":
      rows.append(_row(f"{what}: {fmt(r['seconds'])} s", r["images_per_s"], "regions/s"))
    executed = f", {fmt(r['executed_gflop'])} executed" if r.get("executed_gflop") is not None else ""
    rows.append(_row(f"{what}: {fmt(r['seconds'])} s, {fmt(r['gflop'])} GFLOP (XLA{executed})", r["gflop_per_s"],
                     "GFLOP/s",
                     f"matmul peak {fmt(peak)} GFLOP/s", peak))
  return rows


SUMMARIZERS: dict[str, Callable[[dict], list[Row]]] = {
    "bench_backbone": _summary_backbone, "bench_corpus": _summary_corpus, "bench_data": _summary_data,
    "bench_eval": _summary_eval, "bench_host_malloc": _summary_host_malloc, "bench_predict": _summary_predict,
    "bench_slide": _summary_slide, "bench_train": _summary_train,
}


def summary_rows(entry: dict) -> list[Row]:
  """Summary rows of one benchmark entry; a failed benchmark gives one FAILED row with its last stderr line."""
  name = entry["name"]
  if entry["status"] != "ok":
    tail = [ln for ln in entry.get("stderr_tail", "").splitlines() if ln.strip()]
    last = tail[-1] if tail else "(no stderr)"
    reason = entry.get("reason") or f"rc {entry.get('rc')}"
    return [dict(what=f"FAILED ({reason})", figure="-", unit="-",
                 baseline=f"last stderr line: {last}", ratio="-")]
  fn = SUMMARIZERS.get(name)
  try:
    rows = fn(entry["result"]) if fn else []
  except (KeyError, TypeError, IndexError, ValueError) as e:  # a JSON this script does not understand
    rows = [dict(what=f"(summary not readable: {type(e).__name__}: {e})", figure="-", unit="-", baseline="-",
                 ratio="-")]
  if not rows:
    rows = [dict(what="(see its section below)", figure="-", unit="-", baseline="-", ratio="-")]
  if name in DATA_FLAGS and not entry.get("brca"):
    rows.append(dict(what=f"skipped without --brca: {DATA_FLAGS[name][1]}", figure="skipped", unit="-",
                     baseline="-", ratio="-"))
  return rows


# ----------------------------------------------------------------------------------------------------------------
# Markdown assembly.

def stdout_markdown(text: str) -> str:
  """Printed output as markdown: table blocks (lines starting with '|') as tables, other lines in text fences."""
  out, block, kind = [], [], None

  def flush():
    if not block:
      return
    if kind == "table":
      out.append("\n".join(block))
    else:
      while block and not block[-1].strip():
        block.pop()
      while block and not block[0].strip():
        block.pop(0)
      if block:
        out.append("```text\n" + "\n".join(block) + "\n```")
    block.clear()

  for line in text.splitlines():
    k = "table" if line.lstrip().startswith("|") else "text"
    if k != kind:
      flush()
      kind = k
    block.append(line.rstrip())
  flush()
  return "\n\n".join(out)


def render_markdown(data: dict) -> str:
  """BENCHMARKS.md from the combined results ({'runs': [...], 'benchmarks': {name: entry}})."""
  runs = data["runs"]
  complete = [r for r in runs if not r.get("only")]  # runs of every benchmark (not an --only rerun)
  regen = (complete or runs)[-1]
  lines = ["# Benchmarks", "",
           "Written by `experiments/benchmarks.py`. Regenerate with:", "",
           f"    {regen['command']}", ""]
  if len(runs) > 1:
    lines += ["The entries below come from more than one run (a later `--only` rerun replaced some); each "
              "benchmark's section names its run.", ""]
  for run in runs:
    m = run["machine"]
    names = ", ".join(n for n, e in data["benchmarks"].items() if e.get("run") == run["started_utc"])
    lines += [f"## Run {run['started_utc']} (UTC)", "",
              f"- command: `{run['command']}` (profile `{run['profile']}`; benchmarks from this run: {names})",
              f"- date (UTC): {run['started_utc']} to {run['finished_utc']}; wall time {fmt(run['wall_s'])} s",
              f"- machine: {m.get('cpu_model', '?')}, {m.get('cpu_count', '?')} logical cores "
              f"({m.get('cpus_usable', '?')} usable), {fmt(m.get('ram_gib'))} GiB RAM; {m.get('os', '?')}",
              f"- software: Python {m.get('python', '?')}, jax {m.get('jax', '?')}, jaxlib {m.get('jaxlib', '?')}; "
              f"devices {m.get('devices', '?')}",
              f"- load average (1/5/15 min) before: {' / '.join(fmt(x) for x in run['load_before'])}; after: "
              f"{' / '.join(fmt(x) for x in run['load_after'])}"]
    if run.get("note"):
      lines.append(f"- note: {run['note']}")
    if run["profile"] != "full":
      lines.append(f"- profile `{run['profile']}`: smaller sizes and mostly 1 timed repeat per measurement (see each "
                   "command), so one disturbed call passes straight into the figure; the `full` profile takes medians "
                   "of each benchmark's default repeats")
    lines.append("")
  lines += ["## Summary", "",
            "One row per measurement that matters. ratio = figure / baseline (same unit), with which way it goes; "
            "baselines are measured in the same run unless the baseline cell says otherwise. On a shared machine "
            "the ratios stay meaningful and absolute times are pessimistic.", "",
            "| benchmark | what | figure | unit | baseline | ratio | command |",
            "|---|---|---|---|---|---|---|"]
  for name, entry in data["benchmarks"].items():
    cmd = f"`{entry['command']}`"
    for r in summary_rows(entry):
      lines.append("| " + " | ".join(cell(x) for x in (name, r["what"], r["figure"], r["unit"], r["baseline"],
                                                       r["ratio"], cmd)) + " |")
  lines.append("")
  for name, entry in data["benchmarks"].items():
    lines += [f"## {name}", "",
              f"- status: **{entry['status']}**" + (f" ({entry['reason']})" if entry.get("reason") else ""),
              f"- run: {entry.get('run', '?')} UTC; wall time {fmt(entry.get('wall_s'))} s; load average before / after "
              f"{fmt((entry.get('load_before') or [None])[0])} / {fmt((entry.get('load_after') or [None])[0])}",
              f"- command: `{entry['command']}`"]
    if name in DATA_FLAGS and not entry.get("brca"):
      lines.append(f"- skipped (no `--brca`): {DATA_FLAGS[name][1]}")
    lines.append("")
    if entry.get("stdout", "").strip():
      lines += ["Printed output:", "", stdout_markdown(entry["stdout"]), ""]
    if entry["status"] != "ok":
      lines += [f"Last {STDERR_TAIL_LINES} lines of stderr:", "", "```text", entry.get("stderr_tail", "").rstrip(),
                "```", ""]
  return "\n".join(lines).rstrip() + "\n"


def merge(previous: dict | None, new_run: dict, new_entries: dict[str, dict], order: list[str]) -> dict:
  """Combined results: `new_entries` replace the previous entries of the same name, the others are kept.

  Benchmarks are listed in `order` (then any other previous ones); runs that no longer own an entry are dropped.
  """
  old = dict((previous or {}).get("benchmarks", {}))
  old.update(new_entries)
  names = [n for n in order if n in old] + sorted(n for n in old if n not in order)
  benches = {n: old[n] for n in names}
  used = {e.get("run") for e in benches.values()}
  runs = [r for r in (previous or {}).get("runs", []) if r["started_utc"] in used and
          r["started_utc"] != new_run["started_utc"]]
  runs.append(new_run)
  return {"runs": runs, "benchmarks": benches}


# ----------------------------------------------------------------------------------------------------------------
# Running.

def discover() -> list[str]:
  """Names of the benchmark scripts, `bench_*` stems, sorted."""
  return sorted(p.stem for p in EXPERIMENTS.glob("bench_*.py"))


def resolve_names(only: str | None, available: list[str]) -> list[str]:
  """`--only` (comma-separated, with or without the `bench_` prefix) -> benchmark names; ValueError if unknown."""
  if not only:
    return list(available)
  names = []
  for raw in [x.strip() for x in only.split(",") if x.strip()]:
    name = raw if raw.startswith("bench_") else f"bench_{raw}"
    if name not in available:
      raise ValueError(f"--only: unknown benchmark {raw!r}; expected one of {', '.join(available)}")
    names.append(name)
  return names


def _display(cmd: list[str]) -> str:
  """The command as a user types it from the repository root (paths inside the repository made relative)."""
  rel = lambda x: os.path.relpath(x, ROOT) if x.startswith(str(ROOT) + os.sep) else x  # noqa: E731
  return "PYTHONPATH=. " + shlex.join([rel(x) for x in cmd])


def bench_command(name: str, args: list[str], brca: str | None, json_path: pathlib.Path) -> list[str]:
  cmd = [sys.executable, "-m", f"experiments.{name}", *args]
  if brca and name in DATA_FLAGS:
    cmd += [DATA_FLAGS[name][0], brca]
  shown = os.path.relpath(json_path, ROOT) if str(json_path).startswith(str(ROOT) + os.sep) else str(json_path)
  return cmd + ["--json", shown]  # relative to the repository root, the subprocess's cwd


def run_one(name: str, cmd: list[str], timeout: float | None, brca: str | None, run_id: str) -> dict:
  """Runs one benchmark subprocess (its stdout echoed live) and returns its entry."""
  json_path = ROOT / cmd[cmd.index("--json") + 1]  # an absolute path stays as it is
  json_path.unlink(missing_ok=True)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
             PYTHONUNBUFFERED="1")
  load_before = list(os.getloadavg())
  print(f"\n=== {name}: {_display(cmd)}", flush=True)
  t0 = time.perf_counter()
  timed_out = []
  with tempfile.TemporaryFile("w+") as err:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                            start_new_session=True)

    def kill():
      timed_out.append(True)
      try:
        os.killpg(proc.pid, signal.SIGKILL)  # the benchmark and any children it started
      except ProcessLookupError:
        pass

    timer = threading.Timer(timeout, kill) if timeout else None
    if timer:
      timer.start()
    out = []
    for line in proc.stdout:
      out.append(line)
      print(f"  {line}", end="", flush=True)
    rc = proc.wait()
    if timer:
      timer.cancel()
    err.seek(0)
    stderr_tail = "\n".join(err.read().splitlines()[-STDERR_TAIL_LINES:])
  wall = time.perf_counter() - t0
  entry = dict(name=name, command=_display(cmd), rc=rc, wall_s=wall, run=run_id, brca=brca if name in DATA_FLAGS
               else None, load_before=load_before, load_after=list(os.getloadavg()), stdout="".join(out),
               stderr_tail=stderr_tail, result=None, status="ok", reason=None)
  if timed_out:
    entry.update(status="failed", reason=f"timed out after {fmt(timeout)} s")
  elif rc != 0:
    entry.update(status="failed", reason=f"exit code {rc}")
  else:
    try:
      entry["result"] = json.loads(json_path.read_text())
    except (OSError, ValueError) as e:
      entry.update(status="failed", reason=f"no readable JSON at {os.path.relpath(json_path, ROOT)} ({e})")
  print(f"=== {name}: {entry['status']}{' (' + entry['reason'] + ')' if entry['reason'] else ''}, {wall:.0f} s",
        flush=True)
  return entry


def _read(path: str) -> str:
  try:
    return pathlib.Path(path).read_text()
  except OSError:
    return ""


def machine_info() -> dict:
  """CPU model, cores, RAM, OS, Python, jax/jaxlib and devices (jax queried in a subprocess, so that this process
  never holds an accelerator the benchmarks need)."""
  cpu = next((ln.split(":", 1)[1].strip() for ln in _read("/proc/cpuinfo").splitlines()
              if ln.startswith("model name")), platform.processor() or "?")
  mem = next((int(ln.split()[1]) for ln in _read("/proc/meminfo").splitlines() if ln.startswith("MemTotal:")), None)
  os_name = next((ln.split("=", 1)[1].strip('"') for ln in _read("/etc/os-release").splitlines()
                  if ln.startswith("PRETTY_NAME=")), platform.platform())
  info = dict(cpu_model=cpu, cpu_count=os.cpu_count(),
              cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
              ram_gib=mem / 2**20 if mem else None, os=f"{os_name} ({platform.system()} {platform.release()})",
              python=platform.python_version())
  code = ("import json, jax, jaxlib; print(json.dumps(dict(jax=jax.__version__, jaxlib=jaxlib.__version__, "
          "devices=', '.join(f'{d.platform}:{d.device_kind}' for d in jax.devices()) + f' (x{len(jax.devices())})')))")
  try:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    info.update(json.loads(p.stdout.strip().splitlines()[-1]))
  except (subprocess.SubprocessError, ValueError, IndexError) as e:
    info.update(jax="?", jaxlib="?", devices=f"(query failed: {e})")
  return info


def run(profile: str, brca: str | None, only: str | None, timeout: float | None, md_path: pathlib.Path = MD_PATH,
        json_path: pathlib.Path = JSON_PATH, argv: list[str] | None = None, note: str | None = None) -> dict:
  """Runs the benchmarks of `profile` (all, or `only`), merges with the previous JSON, writes the markdown."""
  if profile not in PROFILES:
    raise ValueError(f"profile {profile!r}; expected one of {', '.join(PROFILES)}")
  if brca and not (pathlib.Path(brca) / "images").is_dir():
    raise ValueError(f"--brca {brca}: not a BRCA-M2C folder (expected an images/ folder inside)")
  available = discover()
  names = resolve_names(only, available)
  previous = None
  if only and json_path.exists():
    previous = json.loads(json_path.read_text())
  OUT_DIR.mkdir(parents=True, exist_ok=True)
  started = datetime.datetime.now(datetime.timezone.utc)
  run_id = started.strftime("%Y-%m-%d %H:%M:%S")
  shown = _display([sys.executable, "-m", "experiments.benchmarks"] + list(sys.argv[1:] if argv is None else argv))
  load_before = list(os.getloadavg())
  machine = machine_info()
  t0 = time.perf_counter()
  entries = {}
  for name in names:
    cmd = bench_command(name, PROFILES[profile].get(name, []), brca, OUT_DIR / f"{name}.json")
    entries[name] = run_one(name, cmd, timeout, brca, run_id)
  finished = datetime.datetime.now(datetime.timezone.utc)
  new_run = dict(started_utc=run_id, finished_utc=finished.strftime("%Y-%m-%d %H:%M:%S"), command=shown,
                 profile=profile, only=names if only else None, wall_s=time.perf_counter() - t0, load_before=load_before,
                 load_after=list(os.getloadavg()), machine=machine, note=note)
  data = sanitize(merge(previous, new_run, entries, available), brca)
  json_path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
  md_path.write_text(render_markdown(data))
  print(f"\nwrote {os.path.relpath(md_path, ROOT)} and {os.path.relpath(json_path, ROOT)} "
        f"({fmt(new_run['wall_s'])} s)")
  return data


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  g = p.add_mutually_exclusive_group()
  g.add_argument("--quick", action="store_true", help="the quick profile (~15 min on 2 cores)")
  g.add_argument("--profile", choices=sorted(PROFILES), default=None, help="full (default), quick or smoke")
  p.add_argument("--brca", default=None, help="BRCA-M2C folder for the benchmarks that read real data")
  p.add_argument("--only", default=None, help="comma-separated benchmarks to rerun; the others are kept from the "
                                              "previous benchmarks.json")
  p.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default: none)")
  p.add_argument("--note", default=None, help="a line for the header (e.g. 'shared machine')")
  p.add_argument("--render", action="store_true", help="only rewrite the markdown from the existing JSON")
  p.add_argument("--md", default=str(MD_PATH), help=argparse.SUPPRESS)
  p.add_argument("--out_json", default=str(JSON_PATH), help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  profile = "quick" if a.quick else (a.profile or "full")
  if a.render:
    pathlib.Path(a.md).write_text(render_markdown(json.loads(pathlib.Path(a.out_json).read_text())))
    return 0
  try:
    data = run(profile, a.brca, a.only, a.timeout, pathlib.Path(a.md), pathlib.Path(a.out_json), argv, a.note)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0 if all(e["status"] == "ok" for e in data["benchmarks"].values()) else 1


if __name__ == "__main__":
  sys.exit(main())
