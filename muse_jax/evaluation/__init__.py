"""Nucleus-classification evaluation (spec §5): feature extraction, kNN, linear probe, fine-tuning, reports.

Entry points: `run(config, workdir)` (the driver behind `python -m muse_jax.evaluate`), `default_config()`,
`demo_table(...)` (the table at the end of `make demo`), and the protocol functions `knn.knn_eval`,
`linear.linear_probe`, `finetune.finetune` on precomputed features / tiles.
"""
from muse_jax.evaluation.demo import demo_table
from muse_jax.evaluation.runner import default_config, run

__all__ = ["default_config", "demo_table", "run"]
