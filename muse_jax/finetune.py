"""CLI: NDC fine-tuning (point head, large-FoV semi-supervised; `muse_jax.ndc.train.run`).

  python -m muse_jax.finetune --config configs/finetune_ndc.py:VARIANT --init SOURCE --workdir DIR \
      [--config.data.dir=/path/to/BRCA-M2C] [--config.train.steps=N]

SOURCE: `random:<variant>`, a backbone directory (pretraining export or torch import). Without --init the
config's `init` (random:<variant>) is used. Rerunning with the same workdir resumes. Multi-host: the same command
on every host with `--multihost` (see `muse_jax/distributed.py`; the batch must be a multiple of the device count).
"""

from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from muse_jax import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/finetune_ndc.py:VARIANT", lock_config=True)
_INIT = flags.DEFINE_string("init", None, "backbone source: random:<variant> or a backbone directory")
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (checkpoints, metrics, export/)")
_DIST = distributed.define_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  del argv
  distributed.initialize_from_flags(_DIST)
  from muse_jax.ndc import train  # pylint: disable=import-outside-toplevel

  config = _CONFIG.value
  if _INIT.value:
    with config.unlocked():
      config.init = _INIT.value
  result = train.run(config, _WORKDIR.value)
  summary = {"step": result["step"], "export": result["export"]}
  if result.get("eval"):
    summary["eval"] = {m: {"f_det": r["detection"]["f1"], "f_mean": r["mean_f1"]} for m, r in result["eval"].items()}
  import jax  # pylint: disable=import-outside-toplevel

  if jax.process_index() == 0:
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  app.run(main)
