"""Tests for the classical detector, point matching, ArrayRecord preparation (no TensorFlow) and tfds sources."""

import sys

import numpy as np
import pytest
from PIL import Image

from muse_jax import data
from muse_jax.data import detect, pipeline, prepare, readers


def test_match_points_known_answer():
  gt = np.array([[0, 0], [10, 0], [20, 0]], np.float32)
  pred = np.array([[1, 0], [9, 0], [50, 50], [10.5, 0]], np.float32)
  assert detect.match_points(pred, gt, 3.0) == (2, 2, 1)
  assert detect.match_points(np.zeros((0, 2)), gt, 3.0) == (0, 0, 3)
  p, r, f = detect.f1_score(2, 2, 1)
  assert f == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))


def test_detector_finds_bundled_nuclei_and_scales_with_mpp():
  s = data.load_labelled('brca_m2c', None, 'train')[0]
  pred = detect.detect_nuclei(s.image, s.mpp)
  tp, fp, fn = detect.match_points(pred, s.coords, 3.0 / s.mpp)
  assert detect.f1_score(tp, fp, fn)[2] > 0.5
  # Same tissue at 2x the pixels (0.25 µm/px): parameters in µm give about the same detections.
  big = np.asarray(Image.fromarray(s.image).resize((s.image.shape[1] * 2, s.image.shape[0] * 2), Image.BICUBIC))
  pred2 = detect.detect_nuclei(big, s.mpp / 2)
  assert abs(len(pred2) - len(pred)) < 0.25 * len(pred)
  tp2, _, _ = detect.match_points((pred2 + 0.5) / 2 - 0.5, pred, 1.5 / s.mpp)
  assert tp2 > 0.7 * len(pred)
  assert detect.detect_nuclei(np.full((40, 40, 3), 255, np.uint8), 0.5).shape == (0, 2)


def test_prepare_brca_m2c_roundtrip_without_tensorflow(tmp_path):
  res = prepare.run('brca_m2c', 'bundled', str(tmp_path))
  assert res['splits'] == {'train': 6, 'val': 2, 'test': 3} and res['skipped'] == []
  raw = {s.name: s for s in data.load_labelled('brca_m2c', None, 'test')}
  rec = data.load_labelled('brca_m2c', tmp_path, 'test')
  assert sorted(raw) == sorted(s.name for s in rec)
  for s in rec:
    r = raw[s.name]
    np.testing.assert_array_equal(s.image, r.image)
    np.testing.assert_array_equal(s.coords, r.coords)
    np.testing.assert_array_equal(s.classes, r.classes)
    assert s.mpp == 0.5 and s.split == 'test'
  assert 'tensorflow' not in sys.modules


def test_prepare_regions_skips_bad_files_and_feeds_pipeline(tmp_path, capsys):
  src = tmp_path / 'regions'
  src.mkdir()
  tile = data.load_labelled('brca_m2c', None, 'val')[0]
  Image.fromarray(tile.image[:200, :200]).save(src / 'a_detector.png')
  Image.fromarray(tile.image[200:, 200:]).save(src / 'b_sidecar.png')
  (src / 'b_sidecar.csv').write_text('x,y\n10,10\n20,30\n900,900\n')
  (src / 'c_corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 40)
  Image.fromarray(np.full((50, 50, 3), 250, np.uint8)).save(src / 'd_blank.png')  # no nuclei -> skipped
  out = tmp_path / 'dd'
  assert prepare.main(['--dataset', 'regions', '--source', str(src), '--mpp', '0.5', '--out', str(out)]) == 0
  printed = capsys.readouterr()
  assert 'train 2; 2 file(s) skipped' in printed.out
  assert 'c_corrupt.png' in printed.err and 'd_blank' in printed.err
  cfg = pipeline.default_data_config()
  cfg.source = f'tfds:regions@{out}'
  cfg.global_size, cfg.local_size, cfg.n_local = 64, 32, 2
  source = pipeline.open_pretrain_source(cfg)
  assert len(source) == 2
  recs = {(r['name'].decode() if isinstance(r['name'], bytes) else r['name']): r for r in source}
  np.testing.assert_array_equal(recs['b_sidecar']['coords'], [[10, 10], [20, 30]])
  assert len(recs['a_detector']['coords']) > 10
  batch = next(iter(pipeline.make_pretrain_dataset(source, cfg, seed=0, batch_size=2)))
  assert batch['global']['images'].shape == (2, 2, 64, 64, 3)
  with pytest.raises(ValueError, match='--mpp'):
    prepare.run('regions', str(src), str(tmp_path / 'x'))


def test_load_detections_and_regions_folder(tmp_path):
  (tmp_path / 'im.png').write_bytes(b'')
  Image.fromarray(np.full((30, 30, 3), 200, np.uint8)).save(tmp_path / 'im.png')
  (tmp_path / 'im.geojson').write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", '
                                       '"geometry": {"type": "Point", "coordinates": [5, 6]}, "properties": {}}]}')
  np.testing.assert_array_equal(detect.load_detections(tmp_path / 'im.geojson'), [[5, 6]])
  ss = readers.read_regions_folder(tmp_path, mpp=0.5)
  assert len(ss) == 1 and ss[0].classes.tolist() == [-1]
