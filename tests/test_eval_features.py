"""Feature extraction (spec §5.2): one feature per labelled nucleus, in order, padded batches; bad input."""
import numpy as np
import pytest

from muse_jax.evaluation import features


def _fake_fn(images, coords, mask):
  """feature = (x, y, tile mean intensity); zeros where masked."""
  b, n = mask.shape
  out = np.zeros((b, n, 3), np.float32)
  out[..., :2] = coords
  out[..., 2] = images.reshape(b, -1).mean(1)[:, None]
  return out * mask[..., None]


def _tiles(rng, n_tiles, size=64, num_classes=3, unknown=True):
  tiles = []
  for i in range(n_tiles):
    n = int(rng.integers(1, 40))
    classes = rng.integers(-1 if unknown else 0, num_classes, n).astype(np.int32)
    tiles.append({"image": np.full((size, size, 3), i, np.uint8),
                  "coords": rng.uniform(0, size, (n, 2)).astype(np.float32),
                  "classes": classes, "name": f"t{i}"})
  return tiles


def test_one_feature_per_labelled_nucleus_in_order_padded_batches():
  rng = np.random.default_rng(0)
  tiles = _tiles(rng, 7)
  for batch_size in (1, 3, 10):
    out = features.extract_features(tiles, _fake_fn, num_classes=3, batch_size=batch_size)
    want_xy = np.concatenate([t["coords"][t["classes"] >= 0] for t in tiles])
    want_y = np.concatenate([t["classes"][t["classes"] >= 0] for t in tiles])
    want_tile = np.concatenate([np.full((t["classes"] >= 0).sum(), i) for i, t in enumerate(tiles)])
    np.testing.assert_array_equal(out["features"][:, :2], want_xy)
    np.testing.assert_array_equal(out["labels"], want_y)
    np.testing.assert_array_equal(out["tile_index"], want_tile)
    np.testing.assert_array_equal(out["features"][:, 2], want_tile.astype(np.float32))
    for i, t in enumerate(tiles):
      sel = out["tile_index"] == i
      np.testing.assert_array_equal(out["nucleus_index"][sel], np.flatnonzero(t["classes"] >= 0))


def test_tiny_backbone_batched_equals_one_tile_at_a_time():
  from muse_jax import backbone_io

  model_cfg, variables = backbone_io.load_backbone("random:tiny", seed=0)
  rng = np.random.default_rng(1)
  tiles = _tiles(rng, 5, unknown=False)
  for t in tiles:
    t["image"] = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
  fn = features.make_feature_fn(model_cfg, variables, image_size=64)
  batched = features.extract_features(tiles, fn, num_classes=3, batch_size=4)
  assert batched["features"].shape == (sum(len(t["classes"]) for t in tiles), model_cfg.map_dim)
  single = features.extract_features(tiles[3:4], fn, num_classes=3, batch_size=4)
  np.testing.assert_allclose(batched["features"][batched["tile_index"] == 3], single["features"], atol=1e-5)
  assert np.abs(batched["features"]).sum() > 0


def test_bad_input_errors():
  rng = np.random.default_rng(2)
  tiles = _tiles(rng, 2)
  tiles[1]["classes"][0] = 3
  with pytest.raises(ValueError, match="t1.*outside the class map"):
    features.extract_features(tiles, _fake_fn, num_classes=3)
  with pytest.raises(ValueError, match="empty split"):
    features.extract_features([], _fake_fn, num_classes=3, split="val")
  tiles = _tiles(rng, 2)
  for t in tiles:
    t["classes"][:] = -1
  with pytest.raises(ValueError, match="no labelled nuclei"):
    features.extract_features(tiles, _fake_fn, num_classes=3)


def test_checkpoint_of_another_architecture_is_rejected():
  from configs import models as model_configs
  from muse_jax import backbone_io

  _, variables = backbone_io.load_backbone("random:tiny", seed=0)
  with pytest.raises(ValueError, match="do not fit architecture"):
    features.make_feature_fn(model_configs.get_config("vit_s16"), variables, image_size=224)
  with pytest.raises(ValueError, match="not a multiple of 16"):
    features.make_feature_fn(model_configs.get_config("tiny"), variables, image_size=100)
