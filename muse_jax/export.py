r"""Exports the teacher backbone of a pretraining run as a backbone directory (`muse_jax.backbone_io`).

  python -m muse_jax.export --workdir runs/tiny --out runs/tiny/export [--step N] [--debug]

The export holds the teacher's backbone variables (no heads, no optimizer state) and the model config; load it with
`muse_jax.backbone_io.load_backbone(out)`. It is the hand-off to evaluation and fine-tuning.

Exit codes (`muse_jax.cli`): 0 done; 1 a bug (traceback); 2 user error, one line on stderr: the workdir is not a
pretraining workdir (missing, a fine-tuning workdir, no checkpoint), `--step` names no checkpoint, or the
checkpoint does not match the workdir's `config.json`; `--debug` (or MUSE_DEBUG=1) shows the traceback.
"""
from __future__ import annotations

import os
import sys

from absl import flags

from muse_jax import cli


def export(workdir: str | os.PathLike, out: str | os.PathLike, step: int | None = None) -> str:
  """Writes the teacher backbone of `workdir`'s latest (or `step`) checkpoint to `out`; returns `out`.

  The run's config is read back from `workdir/config.json`.
  """
  # pylint: disable=import-outside-toplevel
  from muse_jax import backbone_io
  from muse_jax import config_check
  from muse_jax.pretrain import checkpoint as ckpt_lib
  from muse_jax.pretrain import state as state_lib
  from muse_jax.pretrain import train

  wd = ckpt_lib._abs(workdir)  # pylint: disable=protected-access
  where = f"--workdir {workdir}"
  want = "expected a pretraining workdir (written by python -m muse_jax.main)"
  if not wd.is_dir():
    raise cli.UserError("not found", where, want)
  stored = config_check.read_config(wd)
  if stored is None:
    raise cli.UserError(f"no {train.CONFIG_FILE}", where, want)
  kind = config_check.config_kind(stored)
  if kind != "pretrain":
    raise cli.UserError("not a pretraining workdir", where, f"it is {config_check.describe(kind)}")
  config = backbone_io.config_from_json(stored)
  config.progress_bar = False
  config.data_source = "synthetic"  # restoring the state needs no data
  train.validate_config(config)
  ckdir = wd / train.CHECKPOINT_DIR
  steps = sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()) if ckdir.is_dir() else []
  if not steps:
    raise cli.UserError("no checkpoint yet", where, f"nothing under {train.CHECKPOINT_DIR}/")
  if step is not None and step not in steps:
    raise cli.UserError(f"no checkpoint of step {step}", "--step", f"the workdir has steps {steps}")
  try:
    state, at = train.load_state(workdir, config, step)
  except (ValueError, KeyError) as e:
    raise cli.UserError(f"the checkpoint does not match the workdir's {train.CONFIG_FILE}", where,
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
  variables = state_lib.teacher_backbone_variables(state)
  backbone_io.save_backbone(out, config.model, variables,
                            extra={"source": "muse_jax.export", "workdir": str(workdir), "step": int(at),
                                   "variant": config.variant, "which": "teacher"})
  return str(out)


_WORKDIR = flags.DEFINE_string("workdir", None, "Pretraining workdir (holds config.json and checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Output backbone directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")


def main(argv):
  if len(argv) > 1:
    raise cli.UserError("unexpected arguments", "command line", f"{argv[1:]} (flags are --name=value)")
  print(export(_WORKDIR.value, _OUT.value, _STEP.value), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())
  flags.mark_flags_as_required(["workdir", "out"])
  cli.run_absl(main)
