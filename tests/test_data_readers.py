"""Tests for muse_jax.data readers, the bundled sample, bad-input handling and evaluation tiles."""

import json
import logging
import pathlib

import numpy as np
import pytest
from PIL import Image

from muse_jax import data
from muse_jax.data import eval_tiles, readers


def _write_png(path, arr):
  Image.fromarray(arr).save(path)
  return path


def test_bundled_sample_layout_and_splits():
  root = data.bundled_sample_dir()
  assert 'Redistribution' in (root / 'LICENSE').read_text()
  total = sum(p.stat().st_size for p in root.rglob('*') if p.is_file() and 'CMU-1' not in str(p))
  assert total < 15e6
  counts = {}
  for split in ('train', 'val', 'test'):
    ss = data.load_labelled('brca_m2c', None, split)
    counts[split] = len(ss)
    for s in ss:
      assert s.image.dtype == np.uint8 and s.image.shape[2] == 3
      assert s.coords.dtype == np.float32 and s.classes.dtype == np.int32 and s.mpp == 0.5
      assert s.split == split and len(s.coords) > 0
      assert set(np.unique(s.classes)) <= {0, 1, 2}
  assert counts['train'] >= 1 and counts['val'] >= 1 and counts['test'] >= 1
  names = {split: {s.name for s in data.load_labelled('brca_m2c', None, split)} for split in ('train', 'test')}
  assert not names['train'] & names['test']


def test_brca_labels_are_y_x_class(tmp_path):
  p = tmp_path / 'a_gt_class_coords.txt'
  p.write_text('10 20 1\n30 40 3\n')
  coords, classes = readers.read_brca_labels(p)
  np.testing.assert_array_equal(coords, [[20, 10], [40, 30]])
  np.testing.assert_array_equal(classes, [0, 2])


def test_bad_label_row_names_file_and_line(tmp_path):
  p = tmp_path / 'a_gt_class_coords.txt'
  p.write_text('10 20 1\n10 abc 2\n')
  with pytest.raises(ValueError, match=r'a_gt_class_coords.txt:2'):
    readers.read_brca_labels(p)
  p.write_text('10 20\n')
  with pytest.raises(ValueError, match=r':1: expected three numbers'):
    readers.read_brca_labels(p)
  p.write_text('10 20 7\n')
  with pytest.raises(ValueError, match=r':1: class'):
    readers.read_brca_labels(p)


def test_corrupt_and_truncated_png(tmp_path):
  good = _write_png(tmp_path / 'good.png', np.full((32, 32, 3), 100, np.uint8))
  raw = good.read_bytes()
  trunc = tmp_path / 'trunc.png'
  trunc.write_bytes(raw[: len(raw) // 2])
  junk = tmp_path / 'junk.png'
  junk.write_bytes(b'not a png at all')
  for p in (trunc, junk):
    with pytest.raises(ValueError, match=p.name):
      readers.read_image(p)


def test_grayscale_and_rgba_become_rgb(tmp_path):
  g = readers.read_image(_write_png(tmp_path / 'g.png', np.full((8, 9), 77, np.uint8)))
  assert g.shape == (8, 9, 3) and (g == 77).all()
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[..., 3] = 255
  rgba[0, 0, 3] = 0  # transparent pixel -> white
  im = readers.read_image(_write_png(tmp_path / 'a.png', rgba))
  assert im.shape == (4, 4, 3)
  np.testing.assert_array_equal(im[1, 1], [200, 0, 0])
  np.testing.assert_array_equal(im[0, 0], [255, 255, 255])


def test_out_of_image_points_dropped_and_logged(caplog):
  with caplog.at_level(logging.WARNING):
    c, k = readers.drop_outside(np.array([[1, 1], [50, 2], [3, -4], [9.4, 9.4]]), np.array([0, 1, 2, 0]),
                                (10, 10), 'pts.csv')
  np.testing.assert_array_equal(k, [0, 0])
  assert 'dropped 2 of 4' in caplog.text and 'pts.csv' in caplog.text


def test_csv_and_geojson_points_with_class_names(tmp_path):
  cmap = {'Tumor': 1, 'Lymphocyte': 0}
  p = tmp_path / 'a.csv'
  p.write_text('x,y,class\n1.5,2,Tumor\n3,4,lymphocyte\n5,6,\n')
  c, k = readers.read_points_csv(p, cmap)
  np.testing.assert_allclose(c, [[1.5, 2], [3, 4], [5, 6]])
  np.testing.assert_array_equal(k, [1, 0, -1])
  p.write_text('x,y,class\n1,2,Tumor\n3,4,Necrosis\n')
  with pytest.raises(ValueError, match=r'a.csv:3: unknown class name .Necrosis'):
    readers.read_points_csv(p, cmap)
  _, k = readers.read_points_csv(p, cmap, unknown_class='ignore')
  np.testing.assert_array_equal(k, [1, -1])
  p.write_text('x,y\n1,2\nfoo,3\n')
  with pytest.raises(ValueError, match=r'a.csv:3'):
    readers.read_points_csv(p)
  gj = {'type': 'FeatureCollection', 'features': [
      {'type': 'Feature', 'geometry': {'type': 'Point', 'coordinates': [10, 20]},
       'properties': {'classification': {'name': 'Tumor', 'color': [255, 0, 0]}}},
      {'type': 'Feature', 'geometry': {'type': 'Polygon', 'coordinates': [[[0, 0], [4, 0], [4, 2], [0, 2], [0, 0]]]},
       'properties': {'classification': {'name': 'Lymphocyte'}}},
      {'type': 'Feature', 'geometry': {'type': 'MultiPoint', 'coordinates': [[1, 1], [2, 2]]}, 'properties': {}}]}
  q = tmp_path / 'b.geojson'
  q.write_text(json.dumps(gj))
  c, k = readers.read_points_geojson(q, cmap)
  np.testing.assert_allclose(c, [[10, 20], [2, 1], [1, 1], [2, 2]])
  np.testing.assert_array_equal(k, [1, 0, -1, -1])


def test_folder_reader_skips_bad_files_and_reports(tmp_path):
  img = tmp_path / 'images'
  img.mkdir()
  _write_png(img / 'ok.png', np.full((20, 20, 3), 120, np.uint8))
  (tmp_path / 'images' / 'ok.csv').write_text('x,y,class\n3,4,a\n100,100,a\n')
  (img / 'bad.png').write_bytes(b'\x89PNG\r\n\x1a\n broken')
  (img / 'bad.csv').write_text('x,y\n1,1\n')
  _write_png(img / 'empty.png', np.full((20, 20, 3), 120, np.uint8))
  (img / 'empty.csv').write_text('x,y,class\n')
  errors = []
  ss = readers.read_labelled_folder(tmp_path, mpp=0.25, class_map={'a': 0}, errors=errors)
  assert [s.name for s in ss] == ['empty', 'ok']
  assert len(ss[0].coords) == 0 and len(ss[1].coords) == 1
  assert len(errors) == 1 and 'bad.png' in errors[0][0]
  with pytest.raises(ValueError, match='bad.png'):
    readers.read_labelled_folder(tmp_path, mpp=0.25, class_map={'a': 0})


def test_eval_tiles_grid_and_coordinates():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (300, 460, 3), dtype=np.uint8)
  coords = np.array([[10, 10], [230, 5], [459, 299], [100, 250]], np.float32)
  s = readers.Sample(image, coords, np.array([0, 1, 2, 0]), 0.5, 't', 'test')
  tiles = eval_tiles.make_eval_tiles([s], target_mpp=0.5, size=224, valid=224)
  # 3 x 2 grid, windows with nuclei: (0,0) twice -> one tile, (0,1) [230,5], (1,2) [459,299], (1,0) [100,250].
  assert sorted(t['name'] for t in tiles) == ['t_r0_c0', 't_r0_c1', 't_r1_c0', 't_r1_c2']
  assert sum(len(t['coords']) for t in tiles) == 4
  for t in tiles:
    assert t['image'].shape == (224, 224, 3) and t['image'].dtype == np.uint8
    for (x, y) in t['coords']:
      # The pixel under each coordinate is the source pixel.
      name = t['name']
      i, j = int(name.split('_r')[1].split('_c')[0]), int(name.split('_c')[1])
      sx, sy = int(round(x)) + j * 224, int(round(y)) + i * 224
      np.testing.assert_array_equal(t['image'][int(round(y)), int(round(x))], image[sy, sx])
  big = eval_tiles.make_eval_tiles([s], target_mpp=0.5, size=512, valid=224)
  t = next(t for t in big if t['name'] == 't_r0_c0')
  assert t['valid_box'] == (144, 144, 368, 368) and 'reflect' in t['context']
  np.testing.assert_allclose(t['coords'][0], [154, 154])
  np.testing.assert_array_equal(t['image'][154, 154], image[10, 10])
  up = eval_tiles.make_eval_tiles([s], target_mpp=0.25, size=224, valid=224)
  assert all(t['resampled'] == 'up' for t in up) and sum(len(t['coords']) for t in up) == 4
  assert all((t['coords'] >= 0).all() and (t['coords'] < 224).all() for t in up)
