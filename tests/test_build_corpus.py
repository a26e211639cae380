"""The whole-slide corpus on Apache Beam (`muse_jax.data.build_corpus`): DirectRunner in-process and multi-process
give the same records, bad slides become dead letters, duplicates are read once, the bundled CMU slide builds, and
pretraining reads the corpus through `tfds:DATA_DIR`."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from muse_jax.data import build_corpus as bc
from muse_jax.data import pipeline
from muse_jax.slide import cmu_small_region_path, synthetic
from errlines import one_error_line

REPO = pathlib.Path(__file__).resolve().parents[1]

IN_PROCESS = ['--direct_num_workers=1', '--direct_running_mode=in_memory']
MULTI_PROCESS = ['--direct_num_workers=2', '--direct_running_mode=multi_processing']
ROI = ['--roi_size', '128', '--min_tissue', '0.5', '--no_progress', '--shard_mb', '0.1']  # ~4 shards


def _records(out) -> list[dict]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  src = tfds.data_source(bc.DATASET, data_dir=str(out), split='train')
  return [src[i] for i in range(len(src))]


@pytest.fixture(scope='module')
def slides(tmp_path_factory):
  """Two good synthetic slides, a byte copy of one, a corrupt file, an mpp-less slide and a blank slide."""
  d = tmp_path_factory.mktemp('slides')
  synthetic.write_synthetic_slide(d / 'a.tif', 512, 512, mpp=0.5, tile=128, seed=1)
  synthetic.write_synthetic_slide(d / 'b.tif', 384, 512, mpp=0.5, tile=128, seed=2)
  shutil.copyfile(d / 'a.tif', d / 'a_copy.tif')
  (d / 'corrupt.svs').write_bytes(b'II*\x00' + b'\x00' * 100)
  synthetic.write_synthetic_slide(d / 'no_mpp.tif', 256, 256, mpp=None, tile=128)
  synthetic.write_synthetic_slide(d / 'blank.tif', 256, 256, mpp=0.5, tissue=False, tile=128)
  return d


@pytest.fixture(scope='module')
def built(slides, tmp_path_factory):
  """The corpus of the slide folder, built with the in-process DirectRunner through the CLI."""
  out = tmp_path_factory.mktemp('corpus')
  rc = bc.main(['--slides', str(slides), '--out', str(out), *ROI, *IN_PROCESS])
  return out, rc


def test_in_process_and_multi_process_give_the_same_records(built, slides, tmp_path):
  out1, _ = built
  # listed in another order (a glob and a file) and built by two worker processes
  rc = bc.main(['--slides', str(slides / 'b.tif'), str(slides / '*.*'), '--out', str(tmp_path), *ROI,
                *MULTI_PROCESS])
  assert rc == 3
  a, b = _records(out1), _records(tmp_path)
  assert len(a) == len(b) > 5
  def shards(out):
    return sorted(p.name for p in (out / bc.DATASET / bc.VERSION).glob('*.array_record-*'))

  assert len(shards(out1)) > 2 and shards(out1) == shards(tmp_path)
  for ra, rb in zip(a, b):
    assert ra.keys() == rb.keys()
    for k in ra:
      np.testing.assert_array_equal(ra[k], rb[k], err_msg=k)
  assert (out1 / bc.FAILED_FILE).read_text() == (tmp_path / bc.FAILED_FILE).read_text()


def test_bad_slides_are_dead_letters_and_the_corpus_finishes(built, slides):
  out, rc = built
  assert rc == 3  # partial: some slides are in failed.jsonl
  rows = [json.loads(line) for line in (out / bc.FAILED_FILE).read_text().splitlines()]
  by_slide = {pathlib.Path(r['slide']).name: r for r in rows}
  assert sorted(by_slide) == ['blank.tif', 'corrupt.svs', 'no_mpp.tif']
  assert by_slide['corrupt.svs']['stage'] == 'open'
  assert by_slide['no_mpp.tif']['stage'] == 'mpp' and 'no resolution' in by_slide['no_mpp.tif']['reason']
  assert by_slide['blank.tif']['stage'] == 'tissue'
  s = json.loads((out / bc.SUMMARY_FILE).read_text())
  assert s['totals']['slides_failed'] == 3 and s['totals']['slides_used'] == 2


def test_duplicate_slide_is_read_once_and_summary_counts(built, slides):
  out, _ = built
  s = json.loads((out / bc.SUMMARY_FILE).read_text())
  assert [pathlib.Path(d['slide']).name for d in s['duplicates']] == ['a_copy.tif']
  assert pathlib.Path(s['duplicates'][0]['same_as']).name == 'a.tif'
  recs = _records(out)
  names = [r['name'].decode() for r in recs]
  assert len(names) == len(set(names)) == s['totals']['rois'] == s['splits']['train']
  assert {n.split('_x')[0] for n in names} == {'a', 'b'}
  assert sum(len(r['coords']) for r in recs) == s['totals']['nuclei']
  assert [pathlib.Path(p['slide']).name for p in s['slides']] == ['a.tif', 'b.tif']
  assert sum(p['rois'] for p in s['slides']) == s['totals']['rois']
  assert s['totals']['nuclei_per_mm2_tissue'] > 0 and s['totals']['nuclei_per_roi']['median'] > 0
  r = recs[0]
  assert r['image'].shape == (128, 128, 3) and r['image'].dtype == np.uint8
  assert r['coords'].dtype == np.float32 and r['coords'].shape[1] == 2
  assert float(r['mpp']) == 0.5 and 0.5 <= float(r['tissue']) <= 1.0
  assert (r['coords'] >= 0).all() and (r['coords'] <= 127).all()
  assert (out / bc.HISTOGRAM_FILE).read_bytes()[:4] == b'\x89PNG'
  assert not (out / bc.PARTS_DIR).exists()


def test_pretraining_reads_the_corpus(built, tmp_path):
  """`muse_jax.main` pretrains 2 steps of `tiny` (small views and heads) from `tfds:DATA_DIR`, no conversion step."""
  out, _ = built
  assert pipeline.resolve_tfds(str(out)) == (bc.DATASET, str(out))  # the one dataset in the data dir
  small = ['total_steps=2', 'steps_per_epoch=2', 'batch_size=4', 'data.global_size=64', 'data.local_size=32',
           'data.n_local=1', 'data.max_nuclei_global=8', 'data.max_nuclei_local=4', 'data.read_threads=1',
           'heads.cls_out_dim=32', 'heads.nu_out_dim=16', 'heads.hidden_dim=32', 'heads.bottleneck_dim=16',
           'async_checkpointing=False', 'progress_bar=False']
  # one CPU device, XLA's cheapest compile (this test is about the data, the step is tested elsewhere)
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true')
  proc = subprocess.run([sys.executable, '-m', 'muse_jax.main', '--config', 'configs/pretrain.py:tiny', '--workdir',
                         str(tmp_path / 'wd'), f'--config.data.source=tfds:{out}', *[f'--config.{o}' for o in small]],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[0])
  assert res['step'] == 2 and res['last_checkpoint_step'] == 2
  rows = [json.loads(line) for line in (tmp_path / 'wd' / 'metrics.jsonl').read_text().splitlines()]
  assert rows and all(np.isfinite(r['loss']) for r in rows)


def test_cmu_slide_builds_with_progress(tmp_path, capfd):
  """The CLI on the bundled Aperio slide, with its progress bar (on the terminal's stderr; Beam's logs in beam.log)."""
  rc = bc.main(['--slides', str(cmu_small_region_path()), '--out', str(tmp_path), '--roi_size', '512',
                *IN_PROCESS])
  assert rc == 0
  err = capfd.readouterr().err
  assert 'ROIs read and detected' in err and 'error' not in err.lower()
  s = json.loads((tmp_path / bc.SUMMARY_FILE).read_text())
  assert s['failed'] == [] and s['totals']['slides_used'] == 1
  assert s['totals']['rois'] >= 4 and s['totals']['nuclei_per_roi']['median'] > 20
  recs = _records(tmp_path)
  assert len(recs) == s['totals']['rois'] and recs[0]['image'].shape == (512, 512, 3)
  assert abs(s['slides'][0]['slide_mpp'] - 0.499) < 0.01
  assert (tmp_path / bc.BEAM_LOG_FILE).exists()


def test_ndc_checkpoint_detector(slides, tmp_path):
  ck = synthetic.write_random_ndc_checkpoint(tmp_path / 'ck', 'tiny', window=128, max_detections=16)
  s = bc.build([str(slides / 'a.tif')], str(tmp_path / 'out'), roi_size=128, detector=f'ndc:{ck}',
               beam_args=IN_PROCESS, progress=False)
  assert s['failed'] == [] and s['options']['detector'] == f'ndc:{ck}'
  recs = _records(tmp_path / 'out')
  assert len(recs) == s['totals']['rois'] > 0
  assert all(0 < len(r['coords']) <= 16 for r in recs)  # a random head: max_detections points per window


def test_no_roi_at_all_is_a_user_error_with_dead_letters(slides, tmp_path, capsys):
  rc = bc.main(['--slides', str(slides / 'blank.tif'), str(slides / 'corrupt.svs'), '--out', str(tmp_path), *ROI,
                *IN_PROCESS])
  assert rc == 2
  one_error_line(capsys, 'no ROI in any slide', 'failed.jsonl')
  assert len((tmp_path / bc.FAILED_FILE).read_text().splitlines()) == 2


@pytest.mark.parametrize('extra, needle', [
    (['--roi_size', '0'], '--roi_size'),
    (['--min_tissue', '1.5'], '--min_tissue'),
    (['--mpp', '50'], '--mpp'),
    (['--detector', 'hovernet'], '--detector'),
    (['--detector', 'ndc:/no/such/checkpoint'], 'checkpoint'),
    (['--no_such_flag=1'], 'unknown flag'),
])
def test_bad_flags_are_one_line(slides, tmp_path, capsys, extra, needle):
  assert bc.main(['--slides', str(slides / 'a.tif'), '--out', str(tmp_path), *extra]) == 2
  one_error_line(capsys, needle)
  assert not (tmp_path / bc.DATASET).exists()


def test_bad_paths_and_existing_corpus(built, slides, tmp_path, capsys):
  assert bc.main(['--slides', str(tmp_path / 'missing'), '--out', str(tmp_path / 'o')]) == 2
  one_error_line(capsys, 'no such file or folder', '--slides')
  assert bc.main(['--slides', str(tmp_path / '*.svs'), '--out', str(tmp_path / 'o')]) == 2
  one_error_line(capsys, 'no file matches', '--slides')
  out, _ = built
  assert bc.main(['--slides', str(slides / 'a.tif'), '--out', str(out)]) == 2
  one_error_line(capsys, 'a corpus already exists', '--overwrite')


@pytest.mark.parametrize('args', [
    ['--runner=DataflowRunner', '--project=PROJECT', '--region=REGION', '--temp_location=gs://BUCKET/tmp',
     '--max_num_workers=64', '--sdk_container_image=IMAGE'],
    ['--runner=FlinkRunner', '--flink_master=HOST:8081', '--parallelism=64', '--environment_type=DOCKER',
     '--environment_config=IMAGE'],
    ['--runner=SparkRunner', '--spark_master_url=spark://HOST:7077', '--environment_type=DOCKER',
     '--environment_config=IMAGE'],
])
def test_cluster_launch_lines_are_standard_beam_options(args):
  """WORKSPACE.md's Dataflow / Flink / Spark lines parse as Beam options (nothing is launched, no cloud call)."""
  opts = bc.pipeline_options(args)
  assert not bc._is_direct(opts)  # pylint: disable=protected-access
  got = opts.get_all_options(drop_default=True)
  assert got['runner'] == args[0].split('=')[1] and 'direct_running_mode' not in got


def test_bench_corpus_summary_rows():
  """`experiments/benchmarks.py` summarises bench_corpus's JSON: per-worker rates, peak RSS, the TCGA_nu estimate."""
  from experiments import benchmarks as bm  # pylint: disable=g-import-not-at-top
  res = {'benchmark': 'bench_corpus', 'tcga_nu_rois': 483627, 'failed': [{'what': 'synthetic', 'size': 8192}],
         'tables': {'cmu': [{'roi_size': 1024, 'rois': 4, 'loop_rois_per_s': 5.0, 'build_rois_per_s': 1.5,
                             'build_nuclei_per_s': 600.0}],
                    'synthetic': [{'size': 4096, 'rois': 4, 'roi_size': 1024, 'rois_per_s': 1.3,
                                   'peak_rss_mb': 320.0}],
                    'estimate': [{'workers': 64, 'rois_per_s_per_worker': 2.0, 'hours': 1.05}]}}
  rows = bm.summary_rows({'name': 'bench_corpus', 'status': 'ok', 'result': res})
  text = [(r['what'], r['figure'], r['unit']) for r in rows]
  assert ('corpus build, CMU slide, 1024 px ROIs at 0.5 µm/px, 1 worker: read + detect loop', '5.00', 'ROIs/s') in text
  assert rows[1]['ratio'] == '0.3x (3.33x slower)'
  assert any(u == 'MB' and f == '320' for _, f, u in text)
  assert any('on 64 workers' in w and f == '1.05' and u == 'h' for w, f, u in text)
  assert text[-1] == ('corpus build synthetic 8192', 'FAILED', '-')
