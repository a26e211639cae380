"""Backbone directories: round trip, random init, and clear errors for the wrong architecture."""
import json

import jax
import numpy as np
import pytest

from muse_jax import backbone_io


@pytest.fixture(scope="module")
def tiny():
  return backbone_io.load_backbone("random:tiny", seed=0)


def test_random_is_seeded(tiny):
  cfg, v0 = tiny
  _, v1 = backbone_io.load_backbone("random:tiny", seed=0)
  _, v2 = backbone_io.load_backbone("random:tiny", seed=1)
  leaves0, leaves1, leaves2 = (jax.tree.leaves(v) for v in (v0, v1, v2))
  assert all(np.array_equal(a, b) for a, b in zip(leaves0, leaves1))
  assert not all(np.array_equal(a, b) for a, b in zip(leaves0, leaves2) if a.size > 1)
  assert set(v0) == {"params", "batch_stats"}
  assert cfg.name == "tiny"


def test_round_trip(tiny, tmp_path):
  cfg, variables = tiny
  out = backbone_io.save_backbone(tmp_path / "bb", cfg, variables, extra={"source": "test"})
  assert backbone_io.is_backbone_dir(out)
  assert json.loads((out / "info.json").read_text())["source"] == "test"
  cfg2, v2 = backbone_io.load_backbone(out)
  assert cfg2.to_dict() == cfg.to_dict()
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(v2)):
    np.testing.assert_array_equal(a, b)
  # Saving again over the same directory replaces it atomically.
  backbone_io.save_backbone(out, cfg, variables)
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_wrong_architecture_is_named(tiny, tmp_path):
  cfg, variables = tiny
  out = backbone_io.save_backbone(tmp_path / "bb", cfg, variables)
  other = json.loads((out / "model_config.json").read_text())
  other["embed_dim"] = other["embed_dim"] * 2
  other["map_dim"] = other["map_dim"] * 2
  other["cls_dim"] = other["cls_dim"] * 2
  (out / "model_config.json").write_text(json.dumps(other))
  with pytest.raises(ValueError, match="wrong shape"):
    backbone_io.load_backbone(out)


def test_save_refuses_mismatched_variables(tiny, tmp_path):
  cfg, variables = tiny
  broken = jax.tree.map(lambda x: x, variables)
  broken["params"] = dict(broken["params"])
  broken["params"].pop(sorted(broken["params"])[0])
  with pytest.raises(ValueError, match="missing"):
    backbone_io.save_backbone(tmp_path / "bb", cfg, broken)


def test_missing_source(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such directory"):
    backbone_io.load_backbone(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="not a backbone directory"):
    backbone_io.load_backbone(tmp_path / "empty")
