"""Tests for the pure parts of `experiments/benchmarks.py`: summary rows, markdown assembly, `--only` merge, failures.

No benchmark runs here: entries are built by hand in the shape `run_one` produces, and `run_one` itself runs
stand-in `python -c` scripts of a few milliseconds (ok, failure with stderr, no JSON, timeout).
"""
import json
import math
import sys

import pytest

from experiments import benchmarks as bm


def _run(started="2026-11-30 15:00", command="PYTHONPATH=. .venv/bin/python -m experiments.benchmarks --quick"):
  return dict(started_utc=started, finished_utc=started, command=command, profile="quick", wall_s=12.5,
              load_before=[1.0, 2.0, 3.0], load_after=[4.0, 5.0, 6.0], note="shared machine",
              machine=dict(cpu_model="Test CPU", cpu_count=2, cpus_usable=2, ram_gib=8.0, os="TestOS",
                           python="3.12.0", jax="0.10.2", jaxlib="0.10.2", devices="cpu:cpu (x1)"))


def _entry(name, result=None, status="ok", run="2026-11-30 15:00", stdout="", reason=None, stderr_tail="",
           brca=None):
  return dict(name=name, command=f"PYTHONPATH=. .venv/bin/python -m experiments.{name} --json x.json", rc=0,
              wall_s=3.0, run=run, brca=brca, load_before=[1.0, 1.0, 1.0], load_after=[2.0, 2.0, 2.0],
              stdout=stdout, stderr_tail=stderr_tail, result=result, status=status, reason=reason)


EVAL_RESULT = {"benchmark": "bench_eval", "params": {"repeats": 1}, "tables": {"eval": [
    dict(step="features", variant="tiny", size_px=224, batch=10, tiles=20, nuclei=1000, seconds=1.0,
         tiles_per_s=20.0, nuclei_per_s=1000.0, ratio_vs_tiny=1.0),
    dict(step="features", variant="vit_s16", size_px=224, batch=10, tiles=20, nuclei=1000, seconds=25.0,
         tiles_per_s=0.8, nuclei_per_s=40.0, ratio_vs_tiny=0.04),
    dict(step="knn", train=18600, query=8900, dim=384, seconds=10.0, queries_per_s=890.0,
         baseline_full_sort_seconds=15.0, speedup_vs_full_sort=1.5, agreement=1.0),
]}}


def test_fmt_and_ratio_text():
  assert bm.fmt(None) == "-" and bm.fmt(float("nan")) == "-"
  assert bm.fmt(1234.4) == "1234"
  assert bm.fmt(12.345) == "12.3"
  assert bm.fmt(1.2345) == "1.23"
  assert bm.fmt(0.012345) == "0.0123"
  assert bm.fmt(7) == "7" and bm.fmt("skipped") == "skipped"
  assert bm.ratio_text(10.0, 15.0, "s") == "0.667x (1.50x faster)"
  assert bm.ratio_text(30.0, 10.0, "ms (wall)") == "3.00x (3.00x slower)"
  assert bm.ratio_text(40.0, 1000.0, "nuclei/s") == "0.04x (25.0x slower)"
  assert bm.ratio_text(300.0, 1.0, "regions/s") == "300x (300x faster)"
  assert bm.ratio_text(50.0, 200.0, "GFLOP/s") == "0.25x (25.0% of it)"
  assert bm.ratio_text(1.0, 1.0, "s") == "1.00x"
  assert bm.ratio_text(1.0, 0.0, "s") == "-" and bm.ratio_text(None, 1.0, "s") == "-"


def test_summary_rows_eval_have_same_run_baselines():
  rows = bm.summary_rows(_entry("bench_eval", EVAL_RESULT))
  assert [r["unit"] for r in rows] == ["nuclei/s", "nuclei/s", "s"]
  tiny, vit, knn = rows
  assert tiny["figure"] == "1000" and tiny["baseline"] == "-" and tiny["ratio"] == "-"
  assert vit["figure"] == "40.0" and vit["baseline"] == "tiny 1000 nuclei/s"
  assert vit["ratio"] == "0.04x (25.0x slower)"
  assert knn["figure"] == "10.0" and knn["baseline"] == "full sort 15.0 s"
  assert knn["ratio"] == "0.667x (1.50x faster)"


def test_failure_row_names_reason_and_last_stderr_line():
  e = _entry("bench_train", status="failed", reason="exit code 1",
             stderr_tail="Traceback (most recent call last):\n  File x\nValueError: batch 0 | bad\n\n")
  (row,) = bm.summary_rows(e)
  assert row["what"] == "FAILED (exit code 1)"
  assert row["baseline"] == "last stderr line: ValueError: batch 0 | bad"
  md = bm.render_markdown({"runs": [_run()], "benchmarks": {"bench_train": e}})
  assert "| bench_train | FAILED (exit code 1) |" in md
  assert "ValueError: batch 0 \\| bad" in md  # pipe escaped inside the table
  assert "Last 25 lines of stderr:" in md and "status: **failed** (exit code 1)" in md


def test_unreadable_result_is_reported_not_raised():
  (row,) = bm.summary_rows(_entry("bench_eval", {"tables": {"eval": [{"step": "features"}]}}))
  assert row["what"].startswith("(summary not readable: KeyError")


def test_data_without_brca_says_skipped():
  res = {"source": "bundled", "tables": {"throughput": [
      dict(what="pipeline, 0 worker(s)", regions_per_s=30.0, ratio_to_consumer=300.0),
      dict(what="tiny consumer", regions_per_s=0.1, ratio_to_consumer=1.0, consumer=True)],
      "shared_nuclei": [dict(regions=64, shared_local_best_global=5.0, shared_any_pair=3.0,
                             nuclei_per_local_view=6.0, nuclei_per_global_view=40.0)]}}
  rows = bm.summary_rows(_entry("bench_data", res))
  assert rows[0]["baseline"] == "consumer 0.1 regions/s (target >= 2x)"
  assert rows[0]["ratio"] == "300x (300x faster)"
  assert any(r["figure"] == "skipped (no --brca)" for r in rows)
  assert rows[-1]["what"].startswith("skipped without --brca")
  rows = bm.summary_rows(_entry("bench_data", res, brca="/d"))
  assert not any(r["what"].startswith("skipped without --brca") for r in rows)


def test_data_rows_for_host_and_device_augmentation():
  res = {"source": "brca:/d", "tables": {
      "host_per_core": [dict(augment_on="host", regions_per_s_per_core=30.0, views_only_regions_per_s=40.0,
                             render_regions_per_s=None, crop_buffers=None),
                        dict(augment_on="device", regions_per_s_per_core=120.0, views_only_regions_per_s=400.0,
                             render_regions_per_s=15.0, crop_buffers=[453, 197])],
      "cores_per_accelerator": [dict(accelerator="H100", step_regions_per_s=894.0, cores_host=29.8,
                                     cores_device=7.45)]}}
  rows = {r["what"]: r for r in bm.summary_rows(_entry("bench_data", res, brca="/d"))}
  dev = rows["host pipeline per core, device augmentation (in-process, 1 read thread; source brca:/d)"]
  assert dev["figure"] == "120" and dev["baseline"] == "host augmentation 30.0 regions/s" and dev["ratio"].startswith("4")
  assert rows["make_views alone per core, device augmentation"]["ratio"].startswith("10")
  assert rows["host cores to feed H100 at 894 regions/s, device augmentation"]["figure"] == "7.45"
  assert rows["host cores to feed H100 at 894 regions/s, host augmentation"]["figure"] == "29.8"
  assert rows["device-side render (jitted augment.render) on this CPU"]["figure"] == "15.0"


def test_markdown_header_summary_and_sections():
  out = "note line\n\n| a | b |\n|---|---|\n| 1 | 2 |\ncommand: python x\n"
  data = {"runs": [_run()], "benchmarks": {"bench_eval": _entry("bench_eval", EVAL_RESULT, stdout=out)}}
  md = bm.render_markdown(data)
  assert md.startswith("# Benchmarks\n")
  head, rest = md.split("## Summary", 1)
  for s in ("Test CPU", "2 logical cores", "8.00 GiB", "TestOS", "Python 3.12.0", "jax 0.10.2", "cpu:cpu (x1)",
            "before: 1.00 / 2.00 / 3.00; after: 4.00 / 5.00 / 6.00", "2026-11-30 15:00",
            "`PYTHONPATH=. .venv/bin/python -m experiments.benchmarks --quick`", "shared machine"):
    assert s in head, s
  table = [ln for ln in rest.split("## bench_eval")[0].splitlines() if ln.startswith("|")]
  assert table[0] == "| benchmark | what | figure | unit | baseline | ratio | command |"
  assert len(table) == 2 + 3  # header, rule, three rows
  assert all(ln.endswith("| `PYTHONPATH=. .venv/bin/python -m experiments.bench_eval --json x.json` |")
             for ln in table[2:])
  section = rest.split("## bench_eval", 1)[1]
  # The printed table stays a table; other printed lines are fenced verbatim.
  assert "```text\nnote line\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n```text\ncommand: python x\n```" in section


def test_merge_only_keeps_other_entries_and_their_run():
  old_run = _run("2026-11-30 14:00")
  previous = {"runs": [old_run], "benchmarks": {
      "bench_backbone": _entry("bench_backbone", {"tables": {}}, run="2026-11-30 14:00"),
      "bench_eval": _entry("bench_eval", EVAL_RESULT, run="2026-11-30 14:00")}}
  previous = json.loads(json.dumps(previous))  # as read back from benchmarks.json
  new_eval = _entry("bench_eval", EVAL_RESULT, run="2026-11-30 15:00", stdout="new")
  merged = bm.merge(previous, _run(), {"bench_eval": new_eval}, ["bench_backbone", "bench_eval", "bench_train"])
  assert list(merged["benchmarks"]) == ["bench_backbone", "bench_eval"]
  assert merged["benchmarks"]["bench_eval"]["stdout"] == "new"
  assert merged["benchmarks"]["bench_backbone"]["run"] == "2026-11-30 14:00"
  assert [r["started_utc"] for r in merged["runs"]] == ["2026-11-30 14:00", "2026-11-30 15:00"]
  # Once every benchmark of the old run is replaced, that run leaves the header.
  merged2 = bm.merge(merged, _run("2026-11-30 16:00"),
                     {"bench_backbone": _entry("bench_backbone", {"tables": {}}, run="2026-11-30 16:00")},
                     ["bench_backbone", "bench_eval"])
  assert [r["started_utc"] for r in merged2["runs"]] == ["2026-11-30 15:00", "2026-11-30 16:00"]
  md = bm.render_markdown(merged2)
  assert "## Run 2026-11-30 15:00 (UTC)" in md and "benchmarks from this run: bench_eval" in md
  assert "## Run 2026-11-30 14:00" not in md
  # The regeneration command is that of the last complete run, not of an --only rerun.
  only_run = dict(_run("2026-11-30 17:00", command="X --only eval"), only=["bench_eval"])
  merged3 = bm.merge(merged2, only_run, {"bench_eval": _entry("bench_eval", EVAL_RESULT, run="2026-11-30 17:00")},
                     ["bench_backbone", "bench_eval"])
  md = bm.render_markdown(merged3)
  assert "Regenerate with:\n\n    PYTHONPATH=. .venv/bin/python -m experiments.benchmarks --quick\n" in md
  assert "more than one run" in md and "`X --only eval`" in md


def test_merge_without_previous_and_sanitize():
  merged = bm.merge(None, _run(), {"bench_eval": _entry("bench_eval", {"x": float("nan")})}, ["bench_eval"])
  clean = bm.sanitize(merged)
  assert clean["benchmarks"]["bench_eval"]["result"]["x"] is None
  json.loads(json.dumps(clean, allow_nan=False))
  assert math.isnan(merged["benchmarks"]["bench_eval"]["result"]["x"])


def test_resolve_names():
  avail = ["bench_backbone", "bench_eval"]
  assert bm.resolve_names(None, avail) == avail
  assert bm.resolve_names("eval, bench_backbone", avail) == ["bench_eval", "bench_backbone"]
  with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
    bm.resolve_names("nope", avail)


def test_command_adds_data_flag_and_json_only_where_needed(tmp_path):
  j = tmp_path / "b.json"
  cmd = bm.bench_command("bench_data", ["--repeats", "1"], "/data/BRCA", j)
  assert cmd[1:] == ["-m", "experiments.bench_data", "--repeats", "1", "--data", "/data/BRCA", "--json", str(j)]
  cmd = bm.bench_command("bench_eval", [], "/data/BRCA", j)
  assert "--data" not in cmd and cmd[-2:] == ["--json", str(j)]
  assert bm.discover() == sorted(bm.discover()) and "bench_eval" in bm.discover()


def _script(tmp_path, code):
  """A stand-in benchmark: `python -c code --json PATH` (a subprocess of a few ms, no benchmark)."""
  return [sys.executable, "-c", code, "--json", str(tmp_path / "out.json")]


def test_run_one_ok_reads_json(tmp_path):
  code = "import json, sys; print('| a |'); json.dump({'tables': {}}, open(sys.argv[2], 'w'))"
  e = bm.run_one("bench_x", _script(tmp_path, code), timeout=60, brca=None, run_id="r")
  assert e["status"] == "ok" and e["result"] == {"tables": {}} and e["stdout"] == "| a |\n" and e["rc"] == 0


def test_run_one_failure_keeps_stderr_tail(tmp_path):
  code = ("import sys; print('partial'); [print(f'line {i}', file=sys.stderr) for i in range(40)]; "
          "sys.exit(3)")
  e = bm.run_one("bench_x", _script(tmp_path, code), timeout=60, brca=None, run_id="r")
  assert e["status"] == "failed" and e["reason"] == "exit code 3" and e["stdout"] == "partial\n"
  assert e["stderr_tail"].splitlines() == [f"line {i}" for i in range(40 - bm.STDERR_TAIL_LINES, 40)]
  (row,) = bm.summary_rows(e)
  assert row["what"] == "FAILED (exit code 3)" and row["baseline"] == "last stderr line: line 39"


def test_run_one_missing_json_and_timeout(tmp_path):
  e = bm.run_one("bench_x", _script(tmp_path, "print('no json')"), timeout=60, brca=None, run_id="r")
  assert e["status"] == "failed" and e["reason"].startswith("no readable JSON")
  e = bm.run_one("bench_x", _script(tmp_path, "import time; time.sleep(30)"), timeout=0.5, brca=None, run_id="r")
  assert e["status"] == "failed" and e["reason"] == "timed out after 0.5 s" and e["wall_s"] < 20


def test_sanitize_writes_the_brca_folder_as_a_placeholder():
  data = {"source": "brca:/data/x/BRCA-M2C", "cmd": ["--data", "/data/x/BRCA-M2C/"], "v": float("nan"),
          "out": "pipeline (source brca:/data/x/BRCA-M2C) 93 regions/s"}
  s = bm.sanitize(data, "/data/x/BRCA-M2C/")
  assert s == {"source": "brca:<BRCA-M2C>", "cmd": ["--data", "<BRCA-M2C>/"], "v": None,
               "out": "pipeline (source brca:<BRCA-M2C>) 93 regions/s"}
  assert bm.sanitize(data)["source"] == "brca:/data/x/BRCA-M2C"
