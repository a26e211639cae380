"""MUSE pretraining: DINO image loss + NuLo nucleus loss with an EMA teacher kept in the optax state.

Modules: `losses` (pure loss functions), `teacher` (the EMA-teacher optax transform), `optim` (optimizer and
schedules), `mesh` (device mesh and shardings), `state` (train-state creation), `step` (the jitted train step),
`checkpoint` (Orbax wrapper), `synthetic` (a checkpointable synthetic batch source for tests/benchmarks),
`train` (the `run(config, workdir)` driver).
"""
