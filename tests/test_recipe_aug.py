"""H&E-scale augmentations (colour_aug, blur in µm, overlapping global views), the `small` recipe's config, and the
raw-pixel evaluation baseline."""
import numpy as np
import pytest

from configs import pretrain
from muse_jax.data import pipeline, views
from muse_jax.evaluation import features, runner


def _cfg(**kw):
  cfg = pipeline.default_data_config()
  cfg.color_jitter_p, cfg.grayscale_p, cfg.blur_p, cfg.solarize_p = 1.0, 0.0, (0.0, 0.0, 0.0), 0.0
  for k, v in kw.items():
    cfg[k] = v
  return cfg.to_dict()


def _he_image(seed=0, size=32):
  """A pink (eosin) field with dark purple (haematoxylin) disks: an H&E-like test image."""
  rng = np.random.default_rng(seed)
  img = np.empty((size, size, 3), np.uint8)
  img[:] = (230, 160, 200)
  yy, xx = np.mgrid[:size, :size]
  for _ in range(4):
    cx, cy = rng.uniform(4, size - 4, 2)
    img[(xx - cx) ** 2 + (yy - cy) ** 2 <= 9] = (70, 40, 120)
  return img


def test_color_aug_none_keeps_colours_and_hed_changes_stain_not_structure():
  img = _he_image()
  out = views.photometric(img, np.random.default_rng(0), _cfg(color_aug="none"), blur_p=0.0, solarize_p=0.0)
  np.testing.assert_array_equal(out, img)
  changed = []
  for seed in range(5):
    out = views.photometric(img, np.random.default_rng(seed), _cfg(color_aug="hed", stain_jitter=0.2),
                            blur_p=0.0, solarize_p=0.0)
    changed.append(np.abs(out.astype(int) - img).mean())
    # Morphology is kept: the nuclei (dark pixels) stay exactly where they were (the pixel ordering by
    # darkness between nucleus and background is preserved).
    dark_in, dark_out = img.sum(-1) < 400, out.astype(int).sum(-1) < out.astype(int).sum(-1).mean()
    np.testing.assert_array_equal(dark_in, dark_out)
  assert max(changed) > 2.0  # the stain did change
  # HED jitter never turns the image gray (it keeps H&E colours), unlike DINO's grayscale / saturation.
  assert np.ptp(out.astype(int), axis=-1).mean() > 20


def test_color_aug_validation():
  img = _he_image()
  with pytest.raises(ValueError, match="color_aug"):
    views.photometric(img, np.random.default_rng(0), _cfg(color_aug="lab"), blur_p=0.0, solarize_p=0.0)
  with pytest.raises(ValueError, match="stain_jitter > 0"):
    views.photometric(img, np.random.default_rng(0), _cfg(color_aug="hed", stain_jitter=0.0), blur_p=0.0,
                      solarize_p=0.0)


def test_blur_sigma_in_um_follows_the_view_mpp():
  cfg = _cfg(blur_sigma_um=(1.0, 1.0))
  assert views.blur_sigma_px(np.random.default_rng(0), cfg, 0.5) == pytest.approx(2.0)
  assert views.blur_sigma_px(np.random.default_rng(0), cfg, 1.0) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="mpp"):
    views.blur_sigma_px(np.random.default_rng(0), cfg, None)
  # Without blur_sigma_um the DINO pixel range is used, whatever the mpp.
  px = _cfg(blur_sigma=(3.0, 3.0))
  assert views.blur_sigma_px(np.random.default_rng(0), px, 0.25) == pytest.approx(3.0)
  # The same physical blur at two view scales: the same blurred tissue (compare at the coarser grid).
  img = np.kron(_he_image(1, 32), np.ones((2, 2, 1), np.uint8))  # 64 px at 0.25 µm/px
  fine = views.photometric(img, np.random.default_rng(0), cfg, blur_p=1.0, solarize_p=0.0, mpp=0.25)
  coarse_in = img.reshape(32, 2, 32, 2, 3).mean((1, 3)).astype(np.uint8)  # the same tissue at 0.5 µm/px
  coarse = views.photometric(coarse_in, np.random.default_rng(0), cfg, blur_p=1.0, solarize_p=0.0, mpp=0.5)
  down = fine.reshape(32, 2, 32, 2, 3).mean((1, 3))
  assert np.abs(down - coarse.astype(float))[4:-4, 4:-4].mean() < 6.0


def test_global_in_global_makes_the_teacher_views_share_nuclei():
  src = pipeline.open_pretrain_source(pipeline.default_data_config())
  shared = {}
  for flag in (False, True):
    cfg = pipeline.default_data_config()
    cfg.color_jitter_p, cfg.grayscale_p, cfg.blur_p, cfg.solarize_p = 0.0, 0.0, (0.0, 0.0, 0.0), 0.0
    cfg.global_size, cfg.local_size, cfg.n_local, cfg.mpp_range = 96, 48, 1, (0.5, 0.5)
    cfg.global_in_global = flag
    rng = np.random.default_rng(0)
    n = []
    for k in range(len(src)):
      for _ in range(4):
        g = views.make_views(src[k], rng, cfg)["global"]
        n.append(len(set(g["ids"][0][g["mask"][0]]) & set(g["ids"][1][g["mask"][1]])))
    shared[flag] = float(np.mean(n))
  assert shared[True] > 2 * shared[False] and shared[True] > 5


def test_small_recipe_config():
  c = pretrain.get_config("small")
  assert c.model.name == "tiny_p8" and c.model.patch_size == 8
  assert c.data.color_aug == "hed" and c.data.stain_jitter > 0 and c.data.grayscale_p == 0
  assert c.data.blur_sigma_um is not None and c.data.global_in_global
  assert c.data.global_size % c.model.patch_size == 0 and c.data.local_size % c.model.patch_size == 0
  for f in ("warmup_frac", "freeze_last_layer_frac", "teacher_half_life_frac"):
    assert c.optim[f] > 0, f
  # The full-size configs keep DINO's RGB pipeline and epoch-based schedules.
  v = pretrain.get_config("vit_s16")
  assert v.data.color_aug == "rgb" and v.data.blur_sigma_um is None and v.optim.teacher_half_life_frac == 0


# ------------------------------------------------------------------------------------------- raw pixels


def test_raw_patch_features_known_answer():
  img = np.zeros((1, 8, 8, 3), np.uint8)
  img[0, 2, 5] = (255, 0, 0)
  fn = features.RawPatchFeatureFn(3)
  out = fn(img, np.array([[[5.2, 1.8], [0.0, 0.0]]], np.float32), np.array([[True, False]]))
  assert out.shape == (1, 2, 27)
  win = out[0, 0].reshape(3, 3, 3)
  mean = np.array([0.485, 0.456, 0.406], np.float32)
  std = np.array([0.229, 0.224, 0.225], np.float32)
  np.testing.assert_allclose(win[1, 1], (np.array([1.0, 0, 0]) - mean) / std, rtol=1e-6)  # the centre pixel
  np.testing.assert_allclose(win[0, 0], -mean / std, rtol=1e-6)
  assert (out[0, 1] == 0).all()  # masked
  # At the border the window is edge-replicated, never out of range.
  edge = fn(img, np.array([[[0.0, 0.0]]], np.float32), np.array([[True]]))
  assert np.isfinite(edge).all()


def test_raw_source_parsing_and_evaluation_on_the_bundled_sample():
  assert features.parse_raw_source("raw:16") == 16 and features.parse_raw_source("random:tiny") is None
  with pytest.raises(ValueError, match="raw:<patch"):
    features.parse_raw_source("raw:abc")
  with pytest.raises(ValueError, match=r"\[1, 128\]"):
    features.parse_raw_source("raw:0")
  cfg = runner.default_config()
  cfg.backbone, cfg.protocols, cfg.linear_epochs, cfg.progress = "raw:16", "knn,linear", 5, False
  res = runner.run(cfg, None)
  assert res["rows"][0]["method"] == "Raw pixels (16 px patch)" and res["rows"][0]["feature_dim"] == 768
  assert res["rows"][0]["result"]["honest"]["accuracy"] > 0.4
  cfg.protocols = "knn,finetune"
  with pytest.raises(ValueError, match="no network to fine-tune"):
    runner.run(cfg, None)
