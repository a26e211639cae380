"""CLI: NDC fine-tuning (point head, large-FoV semi-supervised; `muse_jax.ndc.train.run`).

  python -m muse_jax.finetune --config configs/finetune_ndc.py:VARIANT --init SOURCE --workdir DIR \
      --config.data.dir=DATA [--config.train.steps=N] [--debug]

DATA: a BRCA-M2C folder, a TFDS data dir prepared by `python -m muse_jax.data.prepare`, or `bundled` (the 11-tile
sample shipped with the package; only when asked for by name). SOURCE: `random:<variant>`, a backbone directory
(pretraining export or torch import). Without --init the config's `init` (random:<variant>) is used.

Rerunning with the same workdir resumes. A resume may change only the fields of `muse_jax.ndc.train.RESUMABLE`
(train.steps, logging, checkpoint cadence / retention, progress bar, exported weights, device count, infer.*,
eval.*, the val split, the context cache); any other difference from the workdir's `config.json` is refused,
naming each changed field. Every config field is checked before any data is read or anything is written.

Exit codes (`muse_jax.cli`): 0 done; 1 a bug (traceback); 2 user error, one line on stderr (bad flag or config
value, missing data, a workdir of another command, a resume that changes the config, a checkpoint that cannot be
saved or restored; `--debug` or MUSE_DEBUG=1 shows the traceback).

Multi-host: the same command on every host with `--multihost` (see `muse_jax/distributed.py`; the batch must be a
multiple of the device count).
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

from muse_jax import cli
from muse_jax import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/finetune_ndc.py:VARIANT", lock_config=True)
_INIT = flags.DEFINE_string("init", None, "backbone source: random:<variant> or a backbone directory")
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (checkpoints, metrics, export/)")
_DIST = distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
  if len(argv) > 1:
    raise cli.UserError("unexpected arguments", "command line", f"{argv[1:]} (flags are --name=value)")
  from muse_jax.ndc import train  # pylint: disable=import-outside-toplevel

  config = _CONFIG.value
  if _INIT.value:
    with config.unlocked():
      config.init = _INIT.value
  train.validate_config(config)  # before the (possibly slow) multi-host start-up
  train.check_workdir(_WORKDIR.value, config)
  distributed.initialize_from_flags(_DIST)
  result = train.run(config, _WORKDIR.value)
  summary = {"step": result["step"], "export": result["export"]}
  if result.get("eval"):
    summary["eval"] = {m: {"f_det": r["detection"]["f1"], "f_mean": r["mean_f1"]} for m, r in result["eval"].items()}
  import jax  # pylint: disable=import-outside-toplevel

  if jax.process_index() == 0:
    print(json.dumps(summary, indent=2))
  return cli.EXIT_OK


if __name__ == "__main__":
  cli.run_absl(main)
