"""CLI: nucleus-classification evaluation of a backbone (spec §5: kNN, linear probe, fine-tuning).

  python -m muse_jax.evaluate --backbone random:vit_s16 --dataset brca_m2c --data_dir /path/to/BRCA-M2C \
      --protocols knn,linear,finetune --mpp 0.5 --size 224 --out runs/eval_vit_s16

`--backbone` is a backbone directory (pretraining export, torch import, fine-tuning output), `random:<variant>`, or
`raw:<px>`: the raw-pixel baseline (a <px> x <px> window of normalised pixels centred on each nucleus; kNN and
linear only).
`--data_dir bundled` uses the small BRCA-M2C sample inside the package. `--all` runs the grid mpp {0.5, 0.25} x
size {224, 512} x protocols and writes one table (BRCA-M2C's mpp 0.25 is an upsampled substitute, marked †).
Writes results.json, results.md and confusion-matrix PNGs to `--out`, and prints the Markdown table.

Every flag is checked before any work starts (`runner.validate_config`: mpp in [0.0625, 4] µm/px, size a multiple
of 32 in [224, 2048], epochs / batch sizes / seeds integers, the backbone source and data folder exist); a user
error is one line `error: <what> (<where>): <why>` on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys

from muse_jax import cli
from muse_jax.evaluation import runner


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  d = runner.default_config()
  p = cli.ArgumentParser(prog="python -m muse_jax.evaluate", description=__doc__.splitlines()[0])
  p.add_argument("--backbone", required=True,
                 help="backbone directory, random:<variant> (tiny, vit_s16, ...) or raw:<px> (the raw-pixel "
                      "baseline: ImageNet-normalised <px> x <px> pixels centred on each nucleus, e.g. raw:16)")
  p.add_argument("--backbone_seed", type=int, default=d.backbone_seed, help="seed of a random:<variant> init")
  p.add_argument("--method", default="", help="row label in the tables (default: from the backbone)")
  p.add_argument("--dataset", default=d.dataset, choices=["brca_m2c"])
  p.add_argument("--data_dir", default=d.data_dir, help="dataset folder or 'bundled'")
  p.add_argument("--protocols", default=d.protocols, help="comma list of knn, linear, finetune")
  p.add_argument("--mpp", type=float, default=d.mpp, help="target µm/px (0.5 or 0.25)")
  p.add_argument("--size", type=int, default=d.size, help="image side (224 or 512; valid window 224)")
  p.add_argument("--all", action="store_true", help="grid: mpp {0.5, 0.25} x size {224, 512}")
  p.add_argument("--out", default=None, help="output folder (default: runs/eval)")
  p.add_argument("--batch_size", type=int, default=d.batch_size, help="tiles per feature-extraction call")
  p.add_argument("--linear_epochs", type=int, default=d.linear_epochs)
  p.add_argument("--finetune_epochs", type=int, default=d.finetune_epochs)
  p.add_argument("--finetune_lr", type=float, default=d.finetune_lr, help="0 = 1e-5 (ViT) / 4e-5 (R50)")
  p.add_argument("--pad_mode", default=d.pad_mode, choices=["reflect", "constant"])
  p.add_argument("--seed", type=int, default=d.seed)
  p.add_argument("--no_progress", action="store_true")
  return p.parse_args(argv)


def _main(argv: list[str] | None) -> int:
  a = parse_args(argv)
  cfg = runner.default_config()
  for key in ("backbone", "backbone_seed", "method", "dataset", "data_dir", "protocols", "mpp", "size", "all",
              "batch_size", "linear_epochs", "finetune_epochs", "finetune_lr", "pad_mode", "seed"):
    cfg[key] = getattr(a, key)
  cfg.progress = not a.no_progress
  out = runner.run(cfg, a.out or "runs/eval")
  print(out["markdown"])
  print(f"wrote {a.out or 'runs/eval'}/results.json, results.md, confusion_*.png")
  return 0


def main(argv: list[str] | None = None) -> int:
  """The CLI; a user error is one line on stderr and exit code 2 (`cli.run`)."""
  return cli.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
