"""Collapse diagnostics of a DINO / NuLo pretraining run, read from the logged metrics.

The jitted step logs, per head (`image_` = DINO CLS head, `nu_` = NuLo nucleus head; see
`losses.head_health`): `teacher_entropy`, `batch_entropy`, `kl`, `max_prob`, `logit_std`, `center_norm`, and
`teacher_student_dist` for the backbones. `HealthMonitor` reads those averaged records (one per logging interval)
and names the two failure modes of self-distillation (thresholds are config fields, `config.health`):

* **uniform**: the centred, sharpened teacher distribution is (nearly) flat for every sample:
  `teacher_entropy >= uniform_entropy_ratio * ln K` (default 0.9). The student can only learn "output uniform";
  typical when the teacher logits vary across samples by much less than the teacher temperature (`logit_std`).
* **one prototype**: every sample goes to the same prototype: the batch-mean teacher distribution uses fewer than
  `min_prototypes` prototypes, `exp(batch_entropy) < min_prototypes` (default 2).

A mode is reported only after `grace_frac` of the run (the first steps of every run are near-uniform: the teacher is
random) and only when it holds in `patience` consecutive records; the step reported is the first record of that
streak. A collapse that ends is reported as recovered. The monitor is pure Python on dicts, so it can be replayed
on a finished run's `metrics.jsonl` (`from_metrics_file`).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

import ml_collections

HEADS = {"image": "image (DINO CLS) head", "nu": "nucleus (NuLo) head"}


def default_config() -> ml_collections.ConfigDict:
  """Thresholds of the collapse detector (documented in WORKSPACE.md, "Run health")."""
  c = ml_collections.ConfigDict()
  c.uniform_entropy_ratio = 0.9   # uniform collapse: teacher entropy >= this fraction of ln K
  c.min_prototypes = 2.0          # one-prototype collapse: exp(batch entropy) below this
  c.grace_frac = 0.1              # ignore the first fraction of the run ...
  c.grace_steps = 20              # ... and at least this many steps
  c.patience = 2                  # consecutive logged records a mode must hold
  return c


class HealthMonitor:
  """Tracks the collapse state of each head over the logged records of a run.

  Args:
    num_prototypes: {'image': K_cls, 'nu': K_nu} for the heads present.
    total_steps: the run's length (for the grace period).
    cfg: thresholds (`default_config()`).
  """

  def __init__(self, num_prototypes: dict[str, int], total_steps: int, cfg: ml_collections.ConfigDict | None = None):
    self.k = {h: int(k) for h, k in num_prototypes.items()}
    self.cfg = cfg if cfg is not None else default_config()
    self.grace = max(int(self.cfg.grace_steps), int(math.ceil(float(self.cfg.grace_frac) * total_steps)))
    self.streak: dict[str, tuple[str, int, int] | None] = {h: None for h in self.k}  # (mode, first step, count)
    self.collapsed: dict[str, dict[str, Any] | None] = {h: None for h in self.k}
    self.events: list[dict[str, Any]] = []
    self.last: dict[str, dict[str, float]] = {}
    self.last_step = 0
    self.teacher_student_dist: float | None = None

  def mode(self, head: str, rec: dict[str, float]) -> str | None:
    """'uniform', 'one_prototype' or None for one record of one head."""
    ent, bent = rec.get(f"{head}_teacher_entropy"), rec.get(f"{head}_batch_entropy")
    if ent is None or bent is None:
      return None
    if ent >= float(self.cfg.uniform_entropy_ratio) * math.log(self.k[head]):
      return "uniform"
    if math.exp(bent) < float(self.cfg.min_prototypes):
      return "one_prototype"
    return None

  def update(self, rec: dict[str, Any]) -> list[str]:
    """Feeds one logged record (with `step`); returns the one-line messages of new events (collapse, recovery)."""
    step = int(rec["step"])
    self.last_step = step
    if "teacher_student_dist" in rec:
      self.teacher_student_dist = float(rec["teacher_student_dist"])
    msgs = []
    for h in self.k:
      keys = [k for k in rec if k.startswith(f"{h}_")]
      if not keys:
        continue
      self.last[h] = {k[len(h) + 1:]: float(rec[k]) for k in keys}
      mode = self.mode(h, rec) if step > self.grace else None
      cur = self.streak[h]
      if mode is None:
        self.streak[h] = None
        if self.collapsed[h] is not None:
          ev = {"event": "recovered", "head": h, "step": step, "mode": self.collapsed[h]["mode"]}
          self.events.append(ev)
          self.collapsed[h] = None
          msgs.append(f"health: {HEADS[h]} recovered from {ev['mode'].replace('_', '-')} collapse at step {step}")
        continue
      cur = (mode, step, 1) if cur is None or cur[0] != mode else (mode, cur[1], cur[2] + 1)
      self.streak[h] = cur
      if cur[2] >= int(self.cfg.patience) and (self.collapsed[h] is None or self.collapsed[h]["mode"] != mode):
        ev = {"event": "collapse", "head": h, "mode": mode, "step": cur[1], "detected_at": step,
              **{k: self.last[h].get(k) for k in ("teacher_entropy", "batch_entropy", "max_prob", "logit_std")}}
        self.collapsed[h] = ev
        self.events.append(ev)
        msgs.append("health: COLLAPSE " + self._describe(h, ev))
    return msgs

  def _describe(self, h: str, ev: dict[str, Any]) -> str:
    ln_k = math.log(self.k[h])
    if ev["mode"] == "uniform":
      why = (f"teacher entropy {ev['teacher_entropy']:.2f} of ln K = {ln_k:.2f}, logit spread "
             f"{ev['logit_std']:.3g}")
    else:
      why = (f"{math.exp(ev['batch_entropy']):.2f} prototype(s) in use of {self.k[h]}, teacher max-prob "
             f"{ev['max_prob']:.2f}")
    return f"of the {HEADS[h]}: {ev['mode'].replace('_', '-')} since step {ev['step']} ({why})"

  def status(self) -> dict[str, Any]:
    """The run's health so far.

    Returns:
      {'healthy': no collapse was ever detected, 'collapsed_now': a head is collapsed at the last record,
      'heads': {head: state, collapse event, K, last values}, 'events': collapse / recovery events in order,
      'line': the one-line summary printed at the end of a run, 'teacher_student_dist', 'step'}.
    """
    heads = {}
    parts = []
    for h in self.k:
      last = self.last.get(h, {})
      ev = self.collapsed[h]
      state = "collapsed" if ev is not None else ("healthy" if last else "no data")
      heads[h] = {"state": state, "collapse": ev, "num_prototypes": self.k[h], "last": last}
      if ev is not None:
        parts.append(f"{h} COLLAPSED ({ev['mode'].replace('_', '-')} since step {ev['step']})")
      elif last:
        parts.append(f"{h} ok (teacher entropy {last.get('teacher_entropy', float('nan')):.2f}/"
                     f"{math.log(self.k[h]):.2f}, {math.exp(last.get('batch_entropy', 0.0)):.0f} prototypes in use, "
                     f"KL {last.get('kl', float('nan')):.2f})")
    collapsed_now = any(v["collapse"] is not None for v in heads.values())
    past = [e for e in self.events if e["event"] == "collapse" and self.collapsed[e["head"]] is not e]
    for e in past:
      rec = next((r["step"] for r in self.events if r["event"] == "recovered" and r["head"] == e["head"]
                  and r["step"] > e["step"]), None)
      parts.append(f"{e['head']} was collapsed ({e['mode'].replace('_', '-')} from step {e['step']}"
                   + (f", recovered at step {rec})" if rec is not None else ")"))
    dist = "" if self.teacher_student_dist is None else f"; teacher-student distance {self.teacher_student_dist:.3g}"
    verdict = "COLLAPSED" if collapsed_now else ("RECOVERED from a collapse" if past else "healthy")
    line = (f"health at step {self.last_step}: {verdict}: " + ("; ".join(parts) if parts else "no health metrics")
            + dist)
    return {"healthy": not self.events, "collapsed_now": collapsed_now, "heads": heads, "events": list(self.events),
            "line": line, "teacher_student_dist": self.teacher_student_dist, "step": self.last_step}


def from_records(records: Iterable[dict[str, Any]], num_prototypes: dict[str, int], total_steps: int,
                 cfg: ml_collections.ConfigDict | None = None) -> HealthMonitor:
  """A monitor fed with `records` in order (replaying a run)."""
  mon = HealthMonitor(num_prototypes, total_steps, cfg)
  for r in records:
    mon.update(r)
  return mon


def from_metrics_file(path: str | os.PathLike, num_prototypes: dict[str, int], total_steps: int,
                      cfg: ml_collections.ConfigDict | None = None) -> HealthMonitor:
  """Replays a `metrics.jsonl`."""
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return from_records(rows, num_prototypes, total_steps, cfg)


def num_prototypes(config: ml_collections.ConfigDict) -> dict[str, int]:
  """{'image': K_cls, 'nu': K_nu} for the heads a pretraining config trains."""
  out = {}
  if config.loss.w_image > 0:
    out["image"] = int(config.heads.cls_out_dim)
  if config.loss.w_nu > 0:
    out["nu"] = int(config.heads.nu_out_dim)
  return out
