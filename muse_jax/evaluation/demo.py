"""The accuracy table at the end of `make demo`: a pretrained backbone against the same architecture at random
initialisation, kNN and linear probe on the bundled BRCA-M2C sample (mpp 0.5, 224 px).

`demo_table(export_dir, workdir=...)` is what `muse_jax.demo` calls; `demo_table({label: source, ...})` compares
any backbones. It runs in well under a minute on 2 CPU cores for the tiny model (the linear probe is cut to 30
epochs there, and the table says so).
"""
from __future__ import annotations

import os
import pathlib

from muse_jax.evaluation import runner


def compare_with_random_init(export_dir: str, seed: int = 0) -> dict[str, tuple]:
  """{'<name> pretrained (teacher)': loaded export, '<name> random init': same config, random variables}."""
  from muse_jax import backbone_io  # pylint: disable=import-outside-toplevel

  model_cfg, variables = backbone_io.load_backbone(export_dir)
  name = model_cfg.get("name", model_cfg.arch)
  return {f"MUSE {name}, pretrained (teacher export)": (model_cfg, variables),
          f"{name}, random init (seed {seed})": (model_cfg, backbone_io.random_backbone(model_cfg, seed))}


def demo_table(backbone_sources: dict[str, str | tuple] | str | os.PathLike, *, data_dir: str = "bundled",
               mpp: float = 0.5, size: int = 224, linear_epochs: int = 30,
               workdir: str | os.PathLike | None = None, progress: bool = False) -> str:
  """kNN and linear accuracy of several backbones on the bundled sample, as one Markdown table.

  Args:
    backbone_sources: {row label: `random:<variant>` | backbone directory | (model_cfg, variables)}, e.g.
      {'MUSE tiny (pretrained teacher)': 'runs/demo/export', 'tiny, random init': 'random:tiny'}; or a single
      backbone directory, which is compared with a random initialisation of the same architecture.
    data_dir: dataset folder ('bundled' = the sample in the package).
    mpp, size: the evaluation setting.
    linear_epochs: linear-probe epochs (the spec's 100 are cut for speed; the table says so).
    workdir: if given, each backbone's full report goes to `workdir/eval_demo/<i>/`.
    progress: show progress bars.

  Returns:
    Markdown: one row per backbone with kNN (best k on test / k on val), linear top-1 and macro-F1 (test).
  """
  if not isinstance(backbone_sources, dict):
    backbone_sources = compare_with_random_init(str(backbone_sources))
  lines = [f"| Method | kNN top-1 % (best k on test) | kNN top-1 % (k on val) | kNN macro-F1 % (k on val) | "
           f"linear top-1 % | linear macro-F1 % |", "| --- | --- | --- | --- | --- | --- |"]
  counts = ""
  for i, (label, source) in enumerate(backbone_sources.items()):
    cfg = runner.default_config()
    cfg.backbone = source if isinstance(source, str) else f"<in-memory {label}>"
    cfg.method, cfg.data_dir, cfg.mpp, cfg.size = label, str(data_dir), mpp, size
    cfg.linear_epochs, cfg.progress = linear_epochs, progress
    res = runner.run(cfg, None if workdir is None else pathlib.Path(workdir) / "eval_demo" / str(i),
                     backbone=None if isinstance(source, str) else source)
    by = {r["protocol"]: r for r in res["rows"]}
    k, lin = by["knn"]["result"], by["linear"]["result"]
    counts = by["knn"]["counts"]
    lines.append(f"| {label} | {100 * k['official']['accuracy']:.2f} (k={k['official']['k']}) | "
                 f"{100 * k['honest']['accuracy']:.2f} (k={k['honest']['k']}) | "
                 f"{100 * k['honest']['metrics']['macro_f1']:.2f} | {100 * lin['accuracy']:.2f} | "
                 f"{100 * lin['metrics']['macro_f1']:.2f} |")
  lines.append("")
  where = "Bundled BRCA-M2C sample" if str(data_dir) == "bundled" else f"BRCA-M2C at {data_dir}"
  lines.append(f"{where} ({counts} train/val/test nuclei), "
               f"mpp {mpp}, size {size}. kNN: T=0.07, k in {{10, 20, 100, 200, 500}} (k clamped to the train "
               f"count). Linear probe: {linear_epochs} epochs (spec: 100), otherwise §5.4. A toy-scale check, "
               f"not comparable with the published tables.")
  return "\n".join(lines) + "\n"
