"""Data-layer benchmark: pipeline throughput vs. backbone consumption, shared nuclei, detector F1.

    python experiments/bench_data.py                         # bundled sample
    python experiments/bench_data.py --data /path/to/BRCA-M2C --batches 10 --repeats 3

Reports:
1. regions/s of the default pretraining recipe (2 x 224 global + 8 x 96 local views per region, all augmentations)
   with 0, 1 and 2 Grain workers (median of `--repeats` timings of `--batches` batches, after a warm-up that
   includes worker start-up and drains the batches computed ahead; 0 workers = in-process, `read_threads` threads);
2. the rate at which a ViT-S/16 consumes regions: student forward+backward on the 2 global and 8 local views plus
   the teacher forward on the 2 global views (the pretraining step's backbone work, without heads and optimiser),
   measured in the same run, and the ratio pipeline / consumer (target >= 2);
3. the mean number of nuclei shared by a local view and the global view it was placed in, and by a (global,
   local) pair in general;
4. with `--data`: the classical detector's precision / recall / F1 on the BRCA-M2C test split at a 3 µm radius;
5. where the views are augmented (`--aug host,device`, issue #23): the pipeline rows for each `data.augment_on`,
   the host rate **per worker core** (in-process, one read thread: one core's production), the rate at which the
   jitted `muse_jax.pretrain.augment.render` turns device-layout batches into views on this machine's JAX device,
   and the host cores needed per accelerator at given step rates (`--step_rates 'NAME=REGIONS_PER_S;...'`; defaults:
   the ViT-S/16 bf16 step rate measured on one H200 in issue #23, 894 regions/s, for an H100 (same dense bf16 peak,
   989 TFLOP/s) and the same MFU on a v5p chip (459 TFLOP/s): 894 x 459 / 989 = 415 regions/s).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np


def _pipeline_rate(source, cfg, batch_size: int, batches: int, repeats: int) -> float:
  from muse_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  it = iter(pipeline.make_pretrain_dataset(source, cfg, seed=0, batch_size=batch_size))
  # Warm-up: worker start-up, then drain what the threads and workers computed ahead, so that the timed batches
  # arrive at the production rate.
  lead = max(1, cfg.num_workers) * (cfg.read_threads + cfg.read_buffer + cfg.prefetch_buffer) + 1
  for _ in range(lead):
    next(it)
  # Each timed window is at least as long as the lead, so that batches computed ahead cannot dominate it.
  batches = max(batches, lead)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(batches):
      next(it)
    times.append(time.perf_counter() - t)
  if hasattr(it, 'close'):
    it.close()
  return batches * batch_size / statistics.median(times)


def _consumer_rate(cfg, batch_size: int, repeats: int, variant: str, dtype: str | None) -> float | None:
  try:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from configs.models import get_config  # pylint: disable=g-import-not-at-top
    from muse_jax.models import build_backbone  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f'(no backbone available: {e})')
    return None
  mcfg = get_config(variant)
  if dtype:
    mcfg.dtype = dtype
  print(f'consumer: {variant} ({mcfg.get("dtype", "float32")}) on {jax.devices()[0].platform}')
  model = build_backbone(mcfg)
  g = jnp.zeros((batch_size * cfg.n_global, cfg.global_size, cfg.global_size, 3), jnp.float32)
  loc = jnp.zeros((batch_size * cfg.n_local, cfg.local_size, cfg.local_size, 3), jnp.float32)
  variables = model.init(jax.random.key(0), g[:1], train=False)

  def loss(params, rest, x):
    out, _ = model.apply({'params': params, **rest}, x, train=True, mutable=['batch_stats'],
                         rngs={'dropout': jax.random.key(1)})
    return jnp.mean(out['f_map'] ** 2) + jnp.mean(out['f_cls'] ** 2)

  grad = jax.jit(jax.grad(loss))
  fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
  params = variables['params']
  rest = {k: v for k, v in variables.items() if k != 'params'}

  def step():
    a = grad(params, rest, g)
    b = grad(params, rest, loc)
    c = fwd(variables, g)
    jax.block_until_ready((a, b, c))

  step()  # compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  return batch_size / statistics.median(times)


def _views_rate(source, cfg, n: int, repeats: int) -> float:
  """Regions/s of `views.make_views` alone in this thread (one core; no loader, shuffle or batching)."""
  from muse_jax.data import views  # pylint: disable=g-import-not-at-top
  plain = cfg.to_dict()
  rng = np.random.default_rng(0)
  views.make_views(source[0], rng, plain)
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    for k in range(n):
      views.make_views(source[k % len(source)], rng, plain)
    times.append(time.perf_counter() - t)
  return n / statistics.median(times)


def _render_rate(source, cfg, batch_size: int, repeats: int) -> float:
  """Regions/s of the jitted device-side rendering (`augment.render`) of real device-layout batches here."""
  import jax  # pylint: disable=g-import-not-at-top
  from muse_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from muse_jax.pretrain import augment  # pylint: disable=g-import-not-at-top
  it = iter(pipeline.make_pretrain_dataset(source, cfg, seed=0, batch_size=batch_size))
  batch = jax.device_put(next(it))
  plain = cfg.to_dict()
  render = jax.jit(lambda b, k: augment.render(b, k, plain))
  jax.block_until_ready(render(batch, jax.random.key(0)))  # compile
  times = []
  for i in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(render(batch, jax.random.key(i + 1)))
    times.append(time.perf_counter() - t)
  return batch_size / statistics.median(times)


DEFAULT_STEP_RATES = 'H100=894;v5p=415'  # ViT-S/16 bf16: issue #23's H200 figure; v5p at the same MFU (459/989)


def _shared(source, cfg, n: int) -> tuple[float, float, float, float]:
  from muse_jax.data import views  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  best, pair, nl, ng = [], [], [], []
  for k in range(n):
    ex = views.make_views(source[k % len(source)], rng, cfg)
    s = views.shared_nuclei(ex)
    best.append(s.max(axis=0))
    pair.append(s)
    nl.append(ex['local']['mask'].sum(-1))
    ng.append(ex['global']['mask'].sum(-1))
  return (float(np.mean(best)), float(np.mean(pair)), float(np.mean(np.concatenate(nl))),
          float(np.mean(np.concatenate(ng))))


def _detector_f1(data_dir: str) -> tuple[float, float, float, int]:
  from muse_jax.data import detect, readers  # pylint: disable=g-import-not-at-top
  tot = np.zeros(3, np.int64)
  samples = readers.read_brca_m2c(data_dir, 'test')
  for s in samples:
    tot += detect.match_points(detect.detect_nuclei(s.image, s.mpp), s.coords, 3.0 / s.mpp)
  return (*detect.f1_score(*tot), len(samples))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--data', default=None, help='BRCA-M2C folder (default: the bundled sample)')
  p.add_argument('--batch_size', type=int, default=8)
  p.add_argument('--batches', type=int, default=5)
  p.add_argument('--model_batch', type=int, default=None, help='consumer batch (default: --batch_size)')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--workers', default='0,1,2')
  p.add_argument('--model', default='vit_s16')
  p.add_argument('--dtype', default=None, help='model compute dtype override (e.g. bfloat16)')
  p.add_argument('--skip_model', action='store_true')
  p.add_argument('--aug', default='host', help="comma list of data.augment_on modes to time: host,device")
  p.add_argument('--step_rates', default=DEFAULT_STEP_RATES,
                 help='NAME=REGIONS_PER_S;...: accelerator step rates for the cores-per-accelerator table (--aug)')
  p.add_argument('--json', default=None, help='also write the measured rows and parameters to this JSON file')
  a = p.parse_args(argv)
  modes = [m.strip() for m in a.aug.split(',') if m.strip()]
  if not modes or any(m not in ('host', 'device') for m in modes):
    p.error(f'--aug {a.aug!r}: expected a comma list of host, device')
  try:
    step_rates = [(k.strip(), float(v)) for k, v in (x.rsplit('=', 1) for x in a.step_rates.split(';') if x.strip())]
  except ValueError:
    p.error(f'--step_rates {a.step_rates!r}: expected NAME=REGIONS_PER_S;...')

  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  from muse_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  cfg = pipeline.default_data_config()
  cfg.source = f'brca:{a.data}' if a.data else 'bundled'
  source = pipeline.open_pretrain_source(cfg)
  print(f'source {cfg.source}: {len(source)} regions; recipe {cfg.n_global}x{cfg.global_size} + '
        f'{cfg.n_local}x{cfg.local_size}, mpp {cfg.mpp_dist} {tuple(cfg.mpp_range)}')

  rows = []
  per_core, render_rates, views_only = {}, {}, {}
  for mode in modes:
    cfg.augment_on = mode
    tag = '' if modes == ['host'] else f' ({mode} augmentation)'
    for w in [int(x) for x in a.workers.split(',')]:
      cfg.num_workers = w
      rows.append((f'pipeline{tag}, {w} worker(s)', _pipeline_rate(source, cfg, a.batch_size, a.batches, a.repeats)))
    if len(modes) > 1 or mode == 'device':
      cfg.num_workers, threads = 0, cfg.read_threads
      cfg.read_threads = 1
      per_core[mode] = _pipeline_rate(source, cfg, a.batch_size, a.batches, a.repeats)
      cfg.read_threads = threads
      views_only[mode] = _views_rate(source, cfg, 4 * a.batch_size, a.repeats)
      print(f'host, {mode} augmentation, one core (in-process, 1 read thread): {per_core[mode]:.1f} regions/s; '
            f'views alone (make_views, no loader): {views_only[mode]:.1f} regions/s')
      if mode == 'device':
        render_rates[mode] = _render_rate(source, cfg, a.batch_size, a.repeats)
        print(f'device-side render (jitted augment.render) on this machine: {render_rates[mode]:.1f} regions/s')
  cfg.augment_on = modes[0]
  consumer = None if a.skip_model else _consumer_rate(cfg, a.model_batch or a.batch_size, a.repeats, a.model, a.dtype)
  best = max(r for _, r in rows)
  print('\n| what | regions/s | ratio to consumer |')
  print('| --- | ---: | ---: |')
  for name, r in rows:
    print(f'| {name} | {r:.1f} | {r / consumer:.1f}x |' if consumer else f'| {name} | {r:.1f} | - |')
  if consumer:
    print(f'| {a.model} ({a.dtype or "float32"}) student fwd+bwd (2 global + 8 local) + teacher fwd (2 global), batch {a.model_batch or a.batch_size} | '
          f'{consumer:.2f} | 1.0x |')
    print(f'\nbest pipeline / consumer = {best / consumer:.1f}x (target >= 2x)')

  out = dict(benchmark='bench_data', params={k: v for k, v in vars(a).items() if k != 'json'},
             source=cfg.source, regions=len(source),
             recipe=dict(n_global=cfg.n_global, global_size=cfg.global_size, n_local=cfg.n_local,
                         local_size=cfg.local_size, mpp_dist=cfg.mpp_dist, mpp_range=list(cfg.mpp_range)),
             tables=dict(throughput=[dict(what=name, regions_per_s=r,
                                          ratio_to_consumer=r / consumer if consumer else None) for name, r in rows]))
  if consumer:
    out['tables']['throughput'].append(dict(
        what=f'{a.model} ({a.dtype or "float32"}) student fwd+bwd (2 global + 8 local) + teacher fwd (2 global), '
             f'batch {a.model_batch or a.batch_size}', regions_per_s=consumer, ratio_to_consumer=1.0, consumer=True))
  if per_core:
    from muse_jax.data import views  # pylint: disable=g-import-not-at-top
    bufs = (views.crop_buffer_size(cfg.global_size, cfg), views.crop_buffer_size(cfg.local_size, cfg))
    feed = []
    print(f'\n| host cores per accelerator | step regions/s | ' + ' | '.join(f'{m} augmentation' for m in per_core) + ' |')
    print('| --- | ---: |' + ' ---: |' * len(per_core))
    for name, rate in step_rates:
      need = {m: rate / r for m, r in per_core.items()}
      feed.append(dict(accelerator=name, step_regions_per_s=rate, **{f'cores_{m}': v for m, v in need.items()}))
      print(f'| {name} | {rate:.0f} | ' + ' | '.join(f'{v:.1f}' for v in need.values()) + ' |')
    out['tables']['host_per_core'] = [dict(augment_on=m, regions_per_s_per_core=r, views_only_regions_per_s=views_only[m],
                                           render_regions_per_s=render_rates.get(m),
                                           crop_buffers=list(bufs) if m == 'device' else None) for m, r in per_core.items()]
    out['tables']['cores_per_accelerator'] = feed
    if len(per_core) == 2:
      print(f"\nper-core host rate, device / host augmentation: {per_core['device'] / per_core['host']:.2f}x "
            f"(views alone {views_only['device'] / views_only['host']:.2f}x; crop buffers {bufs[0]} / {bufs[1]} px)")
  best_s, pair_s, nl, ng = _shared(source, cfg, 64)
  out['tables']['shared_nuclei'] = [dict(regions=64, shared_local_best_global=best_s, shared_any_pair=pair_s,
                                         nuclei_per_local_view=nl, nuclei_per_global_view=ng)]
  print(f'\nshared nuclei (default recipe, 64 regions): local view & its best global view {best_s:.1f}; '
        f'any (global, local) pair {pair_s:.1f}; nuclei per local view {nl:.1f}, per global view {ng:.1f}')
  if a.data:
    pr, rc, f1, n = _detector_f1(a.data)
    print(f'classical detector on BRCA-M2C test ({n} tiles), 3 µm radius: precision {pr:.3f} recall {rc:.3f} '
          f'F1 {f1:.3f}')
    out['tables']['detector'] = [dict(split='test', tiles=n, radius_um=3.0, precision=pr, recall=rc, f1=f1)]
  import os  # pylint: disable=g-import-not-at-top
  print(f'\nmachine: {os.cpu_count()} CPUs')
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps(out, indent=1))
  print('\ncommand: python experiments/bench_data.py ' + ' '.join(sys.argv[1:] if argv is None else argv))
  return 0


if __name__ == '__main__':
  sys.exit(main())
