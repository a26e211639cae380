r"""Sizes the MUSE steps on TPU slices by ahead-of-time compilation and writes the WORKSPACE.md markdown table.

Every compile is the real step (`muse_jax.tools.aot`) compiled on this CPU machine for compile-only TPU devices
(libtpu). Each compile is appended to a results file (JSON lines) as soon as it finishes, so a run can be stopped
(or hit `--stop_at`) and resumed, and the table is rendered from whatever was compiled; a cell without compiles
says "not compiled" and why.

Compile time decides the plan (a vit_s16 pretraining step takes ~7-12 min on 2 cores), so the work is cut honestly:
  * tasks run in the priority order given by `--plan` (one process per task, `--jobs` at once);
  * `VARIANT@TOPOLOGY:search[N]` searches the largest per-chip batch that fits with at most N compiles
    (granularity `--granularity`; the first probe at `--start`, the next ones predicted by the affine memory model,
    `aot.find_max_batch(..., one_point=True)`, so ~3 compiles close a bracket); earlier compiles of the cell in the
    results file are reused;
  * `VARIANT@TOPOLOGY:verify` compiles a data-parallel cell at the largest batch found on another topology of the
    same chip (its per-chip program is the same except collectives) and at one step above it;
  * nothing starts after `--stop_at` (UTC HH:MM); cells left are rendered "not compiled (time budget)".

  pip install -r requirements-tpu.txt
  python experiments/aot_table.py --results runs/aot/table.jsonl --out runs/aot/table.md \
      --plan vit_s16@v5p:2x2x1:search3,vit_s16@v5p:2x2x4:verify,vit_s16@v5e:2x4:search3
  python experiments/aot_table.py --results runs/aot/table.jsonl --render_only   # table from the results file

Topologies: v5e-8 = `v5e:2x4` (8 chips), v5p-8 = `v5p:2x2x1` (4 chips, 8 TensorCores), v5p-32 = `v5p:2x2x4` (16
chips). Meshes are data-parallel (`mesh.fsdp=1`) unless `--fsdp N`. `--step finetune|predict` sizes the NDC steps
(`configs/finetune_ndc.py`) instead of pretraining.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures as cf
import datetime as dt
import json
import multiprocessing as mp
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import clock  # pylint: disable=wrong-import-position

VARIANTS = ("vit_s16", "vit_b16", "lfov_vit_b16", "r50")
TOPOLOGIES = {"v5e:2x4": "v5e-8", "v5p:2x2x1": "v5p-8", "v5p:2x2x4": "v5p-32"}
CONFIGS = {"pretrain": "configs/pretrain.py", "finetune": "configs/finetune_ndc.py", "predict": "configs/finetune_ndc.py"}
DEFAULT_PLAN = ",".join([
    "vit_s16@v5p:2x2x1:search3", "vit_b16@v5p:2x2x1:search1", "r50@v5p:2x2x1:search1",
    "lfov_vit_b16@v5p:2x2x1:search1", "vit_s16@v5p:2x2x4:verify", "vit_s16@v5e:2x4:search3",
    "vit_b16@v5p:2x2x1:search3", "r50@v5p:2x2x1:search3", "lfov_vit_b16@v5p:2x2x1:search3",
    "vit_b16@v5e:2x4:search3", "r50@v5e:2x4:search3", "lfov_vit_b16@v5e:2x4:search3",
    "vit_b16@v5p:2x2x4:verify", "r50@v5p:2x2x4:verify", "lfov_vit_b16@v5p:2x2x4:verify"])
FIELDS = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "code_bytes", "flops", "bytes_accessed",
          "transcendentals", "optimal_seconds", "compile_seconds")


def cell_key(step: str, variant: str, topology: str, fsdp: int) -> str:
  return f"{step}|{variant}|{topology}|fsdp{fsdp}"


def load_results(path: str) -> list[dict]:
  if not path or not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _known(records: list[dict], key: str):
  from muse_jax.tools import aot  # pylint: disable=import-outside-toplevel
  out = {}
  for r in records:
    if r["cell"] == key and "batch" in r:
      out[r["batch"]] = aot.CompileResult(**{k: r[k] for k in FIELDS}) if r["fits"] else None
  return out


def die_with_parent(parent_pid: int) -> None:
  """Worker initializer: on Linux the worker is killed when the driver dies (even by SIGKILL), so a killed run leaves
  no orphaned compile behind (one kept running for 20 min, holding 10 GB, and appended its results on its own)."""
  if sys.platform.startswith("linux"):
    import ctypes  # pylint: disable=import-outside-toplevel
    import signal  # pylint: disable=import-outside-toplevel
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
  if os.getppid() != parent_pid:  # the driver died before the line above ran
    os._exit(1)  # pylint: disable=protected-access


def run_task(task: str, args: argparse.Namespace) -> str:
  """Runs in a worker process: one plan task; appends every compile to the results file. Returns a log line."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from muse_jax.tools import aot, tpu_chips  # pylint: disable=import-outside-toplevel
  variant, _, rest = task.partition("@")
  topology, _, mode = rest.rpartition(":")
  key = cell_key(args.step, variant, topology, args.fsdp)
  chip = tpu_chips.chip_for_topology(topology)
  g = args.granularity if variant != "lfov_vit_b16" else max(1, args.granularity // 2)
  overrides = [f"mesh.fsdp={args.fsdp}"] if args.step == "pretrain" else []
  cfg = aot.load_config(f"{CONFIGS[args.step]}:{variant}", overrides + list(args.overrides))
  devices = aot.topology_devices(topology)
  stop_at = args.stop_epoch

  def try_batch(b: int):
    if stop_at and time.time() > stop_at:
      raise TimeoutError("time budget")
    rec = {"cell": key, "step": args.step, "variant": variant, "topology": topology, "fsdp": args.fsdp,
           "batch": b, "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    t0 = time.perf_counter()
    try:
      spec = aot.BUILDERS[args.step](cfg, devices, b)
      rec["mesh"] = dict(spec.mesh.shape)
      _, res = aot.compile_spec(spec)
      rec.update({k: getattr(res, k) for k in FIELDS}, total_bytes=res.total_bytes, fits=aot.fits(res, chip))
    except aot.DoesNotFitError as e:
      res = None
      rec.update(fits=False, compile_seconds=time.perf_counter() - t0, error=str(e)[:300])
    with open(args.results, "a") as f:
      f.write(json.dumps(rec) + "\n")
    return res if rec["fits"] else None

  records = load_results(args.results)
  t0 = time.perf_counter()
  try:
    if mode == "verify":
      # The largest batch found for this variant on another topology of the same chip; compile it and one step up.
      same = [r for r in records if r["variant"] == variant and r["step"] == args.step and r["fsdp"] == args.fsdp
              and r["topology"] != topology and tpu_chips.chip_for_topology(r["topology"]).name == chip.name]
      fit = [r["batch"] for r in same if r.get("fits")]
      if not fit:
        return f"{task}: nothing to verify (no compiled fit on another {chip.name} topology)"
      best = max(fit)
      known = _known(records, key)
      for b in (best, best + g):
        if b not in known:
          known[b] = try_batch(b)
      return f"{task}: {best} {'fits' if known[best] else 'DOES NOT FIT'}, {best + g} " \
             f"{'fits' if known[best + g] else 'does not fit'} ({time.perf_counter() - t0:.0f} s)"
    n = int(mode.removeprefix("search") or 3)
    known = _known(records, key)
    start = args.start_v5e if chip.name == "v5e" else args.start
    if variant == "lfov_vit_b16":
      start = max(g, start // 4)
    best, _, probes = aot.find_max_batch(try_batch, start=start, granularity=g, max_compiles=n,
                                         capacity=chip.compiler_hbm_bytes, known=known, one_point=True)
    return f"{task}: best {best} after {len(probes)} new compiles ({time.perf_counter() - t0:.0f} s)"
  except TimeoutError:
    return f"{task}: stopped (time budget) after {time.perf_counter() - t0:.0f} s"
  except Exception as e:  # pylint: disable=broad-except
    with open(args.results, "a") as f:
      f.write(json.dumps({"cell": key, "step": args.step, "variant": variant, "topology": topology,
                          "fsdp": args.fsdp, "task_error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
              + "\n")
    return f"{task}: error {type(e).__name__}: {str(e).splitlines()[0][:200]}"


def parse_report(text: str) -> dict | None:
  """One compile from a `python -m muse_jax.tools.aot` report: its `json:` line, or (older reports without it) the
  text, whose memory figures are rounded to 0.01 GiB (the record then says so)."""
  m = re.search(r"^json: (.*)$", text, re.M)
  if m:
    j = json.loads(m.group(1))
    if not j.get("result"):
      return None
    return {"step": j["step"], "variant": j["variant"], "topology": j["topology"], "mesh": j["mesh"],
            "batch": j["per_device_batch"], **{k: j["result"][k] for k in FIELDS}, "total_bytes":
            j["result"]["total_bytes"]}
  head = re.search(r"^(\w+) ([\w]+)[,:].*\ntopology (\S+): .*mesh (\{[^}]*\}); per-chip batch (\d+)", text, re.M)
  mem = re.search(r"arguments ([\d.]+) GiB, outputs ([\d.]+) GiB \(aliased with donated args ([\d.]+) GiB\), "
                  r"temporaries ([\d.]+) GiB, program ([\d.]+) GiB", text)
  fl = re.search(r"FLOPs/step ([\d.e+]+), HBM bytes/step ([\d.e+]+), transcendentals ([\d.e+]+)", text)
  ct = re.search(r"compiled in ([\d.]+) s", text)
  lt = re.search(r"libtpu cost model: ([\d.]+) ms/step", text)
  if not (head and mem and fl and ct):
    return None
  gib = [int(float(x) * 2**30) for x in mem.groups()]
  rec = {"step": head.group(1), "variant": head.group(2), "topology": head.group(3),
         "mesh": ast.literal_eval(head.group(4)), "batch": int(head.group(5)),
         "argument_bytes": gib[0], "output_bytes": gib[1], "alias_bytes": gib[2], "temp_bytes": gib[3],
         "code_bytes": gib[4], "flops": float(fl.group(1)), "bytes_accessed": float(fl.group(2)),
         "transcendentals": float(fl.group(3)), "optimal_seconds": float(lt.group(1)) / 1e3 if lt else None,
         "compile_seconds": float(ct.group(1)), "rounded": "memory from the text report (0.01 GiB)"}
  rec["total_bytes"] = gib[0] + gib[1] - gib[2] + gib[3] + gib[4]
  return rec


def ingest(paths: list[str], results: str) -> None:
  """Appends the compiles of aot reports (e.g. the CI check's logs) to the results file, once per file."""
  from muse_jax.tools import tpu_chips  # pylint: disable=import-outside-toplevel
  done = {r.get("source") for r in load_results(results)}
  for path in paths:
    if os.path.abspath(path) in done:
      continue
    with open(path) as f:
      rec = parse_report(f.read())
    if rec is None:
      print(f"ingest: {path}: no compiled report in it", file=sys.stderr)
      continue
    fsdp = int(rec["mesh"].get("fsdp", 1))
    chip = tpu_chips.chip_for_topology(rec["topology"])
    rec.update(cell=cell_key(rec["step"], rec["variant"], rec["topology"], fsdp), fsdp=fsdp,
               fits=rec["total_bytes"] <= chip.compiler_hbm_bytes, source=os.path.abspath(path))
    with open(results, "a") as f:
      f.write(json.dumps(rec) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# Rendering.


def _affine_estimate(fits: list[dict], cap: int, g: int) -> int | None:
  """Largest batch the affine memory model predicts from the compiled fits (two-point line, else one-point)."""
  pts = sorted((r["batch"], r["total_bytes"], r["temp_bytes"]) for r in fits)
  if not pts:
    return None
  if len(pts) >= 2:
    (b1, m1, _), (b2, m2, _) = pts[-2], pts[-1]
    slope = (m2 - m1) / (b2 - b1)
    return int((b2 + (cap - m2) / slope) // g) * g if slope > 0 else None
  b, m, t = pts[0]
  return int((b * (cap - (m - t)) / t) // g) * g if t > 0 else None


def _recompute_note(fits: list[dict], lo: int, tol: float = 0.01) -> str:
  """A note when the compile at `lo` does more FLOPs per sample than the smallest compiled fit (by over `tol`).

  Near the memory limit XLA rematerialises activations to fit: memory then stays just under the limit while the
  batch grows, and the extra FLOPs show that the fit is bought with recompute (the roofline columns include it).
  """
  if not fits or not lo:
    return ""
  base = min(fits, key=lambda r: r["batch"])
  top = next(r for r in fits if r["batch"] == lo)
  if base["batch"] == lo or not base.get("flops") or not top.get("flops"):
    return ""
  extra = (top["flops"] / lo) / (base["flops"] / base["batch"]) - 1.0
  if extra <= tol:
    return ""
  return (f"the compiler recomputes to fit: FLOPs per sample {100 * extra:+.1f}% over batch {base['batch']}, "
          "memory held near the limit (no affine estimate)")


def render(records: list[dict], variants, topologies, step: str, fsdp: int, granularity: int, cmd: str,
           stop_note: str) -> str:
  from muse_jax.tools import aot, tpu_chips  # pylint: disable=import-outside-toplevel
  head = ("| config | slice (topology) | mesh | compiled per-chip batches (+ fits, - does not) "
          "| largest per-chip batch that fits | GiB/chip there (usable) | FLOPs/chip/step there | roofline ms/step "
          "| est. samples/s, slice (roofline) | est. samples/s (libtpu model) | how obtained |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  cells = []
  for v in variants:
    for t in topologies:
      found = sorted({r["fsdp"] for r in records if r.get("variant") == v and r.get("topology") == t
                      and r.get("step") == step and "batch" in r} | {fsdp})
      cells += [(v, t, f) for f in found]
  for v, t, f in cells:  # one row per (variant, topology, fsdp) with compiles; the requested mesh always
    key = cell_key(step, v, t, f)
    chip = tpu_chips.chip_for_topology(t)
    name = f"{TOPOLOGIES.get(t, t)} (`{t}`)"
    recs = [r for r in records if r["cell"] == key and "batch" in r]
    errs = [r["task_error"] for r in records if r["cell"] == key and "task_error" in r]
    g = granularity if v != "lfov_vit_b16" else max(1, granularity // 2)
    if not recs:
      why = f"error: {errs[-1]}" if errs else stop_note
      lines.append(f"| {v} | {name} | | not compiled ({why}) | | | | | | | |")
      continue
    by_b = {}
    for r in recs:
      by_b[r["batch"]] = r
    fits = [r for r in by_b.values() if r["fits"]]
    lo = max((r["batch"] for r in fits), default=0)
    hi = min((b for b, r in by_b.items() if not r["fits"] and b > lo), default=None)
    probes = ", ".join(f"{b}{'+' if by_b[b]['fits'] else '-'}" for b in sorted(by_b))
    mesh = " x ".join(f"{k} {val}" for k, val in (recs[-1].get("mesh") or {}).items())
    cap = chip.compiler_hbm_bytes
    est = _affine_estimate(fits, cap, g)
    if est is not None and hi is not None:
      est = min(est, hi - g)  # never above a compiled non-fit
    remat = _recompute_note(fits, lo)
    if remat:
      est = None  # memory that the compiler holds at the limit by recomputing is not affine in the batch
    elif est is not None and lo and by_b[lo]["total_bytes"] >= aot.NEAR_CAPACITY * cap and not (
        hi is not None and hi - lo <= g):  # (a bracketed row needs no estimate, so no note either)
      est = None  # within 10% of the limit memory goes flat or even falls (see the search): the line is no guide
      remat = (f"the largest fit is within {1 - aot.NEAR_CAPACITY:.0%} of the limit, where memory is not affine in "
               "the batch (no affine estimate)")
    if lo and hi is not None and hi - lo <= g:
      largest, how = f"**{lo}**", f"compiled: {lo} fits, {hi} does not" + (f" (granularity {g})" if hi - lo == g
                                                                              else "")
    elif lo:
      largest = f">= {lo}"
      state = (f"one compile, no search ({stop_note})" if len(by_b) == 1 else f"search incomplete ({stop_note})")
      how = (f"{state}; affine memory model from the compiles predicts ~{est} "
             "(an estimate, not compiled)" if est else state)
    else:
      largest, how = f"< {min(by_b)}", "no compiled batch fits"
    if remat:
      how += "; " + remat
    srcs = sorted({os.path.basename(os.path.dirname(r["source"])) + "/" + os.path.basename(r["source"])
                   for r in recs if r.get("source")})
    if srcs:
      how += "; from " + ", ".join(srcs) + (" (memory rounded to 0.01 GiB)" if any(r.get("rounded") for r in recs)
                                            else "")
    if not fits:
      lines.append(f"| {v} | {name} | {mesh} | {probes} | {largest} | | | | | | {how} |")
      continue
    r = by_b[lo]
    n = tpu_chips.topology_chip_count(t)
    t_c, t_m = r["flops"] / chip.peak_bf16_flops, r["bytes_accessed"] / chip.hbm_bandwidth
    st = max(t_c, t_m)
    libtpu = f"{lo * n / r['optimal_seconds']:.0f}" if r.get("optimal_seconds") and r["optimal_seconds"] > 0 \
        else "n/a"
    lines.append(
        f"| {v} | {name} | {mesh} | {probes} | {largest} | {r['total_bytes'] / 2**30:.1f} ({cap / 2**30:.2f}) | "
        f"{r['flops']:.3g} | {1e3 * st:.3g} ({'c' if t_c >= t_m else 'm'}) | {lo * n / st:.0f} | {libtpu} | "
        f"{how} |")
  unit = {"pretrain": "region (2 global + N local views)",
          "finetune": "training field (`lfov.field` px, with its semi-supervised views)",
          "predict": "inference tile (`infer.window` px)"}.get(step, "sample")
  notes = [
      "",
      f"Generated by `{cmd}` (libtpu 0.0.42.1, jax 0.10.2), compiling the real {step} step on a 2-core CPU host for "
      "compile-only TPU devices; every number in a row comes from the compile at the batch in bold (or the largest "
      "compiled fit). Memory = arguments + outputs - donated aliases + temporaries + program, per chip; usable = "
      f"what libtpu lets one program use. Throughput is per slice, one sample = one {unit}; roofline step time = "
      "max(FLOPs / peak bf16, HBM bytes / bandwidth) from the published chip numbers (c = compute-bound, m = "
      "memory-bound); both throughput columns are upper bounds (float32 compute runs below the bf16 peak; "
      "collectives and input feeding are not modelled).",
  ]
  return "\n".join(lines + notes) + "\n"


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--step", default="pretrain", choices=sorted(CONFIGS))
  p.add_argument("--variants", default=",".join(VARIANTS), help="rows of the rendered table")
  p.add_argument("--topologies", default=",".join(TOPOLOGIES), help="columns of the rendered table")
  p.add_argument("--plan", default=DEFAULT_PLAN, help="tasks in priority order: VARIANT@TOPOLOGY:searchN|verify")
  p.add_argument("--fsdp", type=int, default=1)
  p.add_argument("--granularity", type=int, default=8)
  p.add_argument("--start", type=int, default=32, help="first per-chip batch of a v5p/v4/v6e search")
  p.add_argument("--start_v5e", type=int, default=16, help="first per-chip batch of a v5e search")
  p.add_argument("--stop_at", default="", help="UTC HH:MM: no compile starts after it")
  p.add_argument("--jobs", type=int, default=1, help="tasks compiled in parallel (one process each)")
  p.add_argument("--results", default="aot_results.jsonl", help="JSON lines, one per compile (appended)")
  p.add_argument("--render_only", action="store_true")
  p.add_argument("--ingest", nargs="*", default=[], help="aot reports (logs of python -m muse_jax.tools.aot, e.g. "
                 "the CI check's) whose compiles are added to the results file before the plan runs")
  p.add_argument("--out", default="-", help="markdown file, or - for stdout")
  p.add_argument("overrides", nargs="*", help="config overrides x.y=value applied to every cell")
  args = p.parse_args()
  args.stop_epoch = clock.next_utc(args.stop_at, "--stop_at") if args.stop_at else 0.0
  if args.ingest:
    ingest(args.ingest, args.results)
  if not args.render_only:
    tasks = [t for t in args.plan.split(",") if t]
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx, max_tasks_per_child=1,
                                initializer=die_with_parent, initargs=(os.getpid(),)) as ex:
      # Verify tasks need their search's result: with one job the plan order guarantees it.
      for line in (ex.map(run_task, tasks, [args] * len(tasks))):
        print(line, file=sys.stderr, flush=True)
  cmd = "python experiments/aot_table.py " + " ".join(sys.argv[1:])
  stop_note = f"time budget: stopped at {args.stop_at} UTC" if args.stop_at else "not in the plan"
  md = render(load_results(args.results), args.variants.split(","), args.topologies.split(","), args.step,
              args.fsdp, args.granularity, cmd, stop_note)
  if args.out == "-":
    sys.stdout.write(md)
  else:
    with open(args.out, "w") as f:
      f.write(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
