r"""Exports the teacher backbone of a pretraining run as a backbone directory (`muse_jax.backbone_io`).

  python -m muse_jax.export --workdir runs/tiny --out runs/tiny/export [--step N]

The export holds the teacher's backbone variables (no heads, no optimizer state) and the model config; load it with
`muse_jax.backbone_io.load_backbone(out)`. It is the hand-off to evaluation and fine-tuning.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags


def export(workdir: str | os.PathLike, out: str | os.PathLike, step: int | None = None) -> str:
  """Writes the teacher backbone of `workdir`'s latest (or `step`) checkpoint to `out`; returns `out`.

  The run's config is read back from `workdir/config.json`.
  """
  from etils import epath  # pylint: disable=import-outside-toplevel

  from muse_jax import backbone_io  # pylint: disable=import-outside-toplevel
  from muse_jax.pretrain import state as state_lib  # pylint: disable=import-outside-toplevel
  from muse_jax.pretrain import train  # pylint: disable=import-outside-toplevel

  cfg_path = epath.Path(workdir) / train.CONFIG_FILE
  if not cfg_path.exists():
    raise FileNotFoundError(f"{cfg_path} not found: is {workdir} a pretraining workdir?")
  config = backbone_io.config_from_json(json.loads(cfg_path.read_text()))
  config.progress_bar = False
  config.data_source = "synthetic"  # restoring the state needs no data
  state, at = train.load_state(workdir, config, step)
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
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(export(_WORKDIR.value, _OUT.value, _STEP.value), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
