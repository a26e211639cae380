"""Tests of muse_jax.tools.convert / import_torch / export_torch without PyTorch: key tables, strict conversion,
round trips, the command-line tools, and that nothing imports torch."""

import collections
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from configs.models import get_config
from muse_jax import backbone_io
from muse_jax.tools import convert, export_torch, import_torch, torch_format
from muse_jax.tools.convert import ConversionError

KEYS_DIR = pathlib.Path(__file__).parent / "data" / "official_keys"


def _read_official(name):
  rows = []
  for line in (KEYS_DIR / f"keys_{name}.txt").read_text().splitlines():
    if line.startswith("#") or not line.strip():
      continue
    key, shape, dtype = line.split("\t")
    rows.append((key, tuple(int(s) for s in re.findall(r"\d+", shape)), dtype))
  return rows


def _random_state_dict(model_cfg, seed=0, count=3):
  rng = np.random.default_rng(seed)
  out = collections.OrderedDict()
  for key, shape, dtype in convert.official_key_table(model_cfg):
    if dtype == "int64":
      out[key] = np.array(count, np.int64)
    else:
      out[key] = rng.standard_normal(shape, dtype=np.float32)
  return out


@pytest.mark.parametrize("variant", ["vit_s16", "vit_b16", "r50"])
def test_key_table_matches_official(variant):
  assert convert.official_key_table(get_config(variant)) == _read_official(variant)


def test_vit_s16_round_trip_is_identity():
  cfg = get_config("vit_s16")
  sd = _random_state_dict(cfg)
  variables, info = convert.torch_to_variables(sd, cfg, pos_embed_resize="exact")
  backbone_io.check_variables(cfg, variables)
  assert info["num_batches_tracked"] == 3
  qkv = variables["params"]["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"]
  np.testing.assert_array_equal(qkv, sd["encoder.encoder.blocks.0.attn.qkv.weight"].T)
  conv = variables["params"]["decoder"]["decoder3"]["first_block"]["conv"]["kernel"]
  np.testing.assert_array_equal(conv, sd["decoder.decoder3.first_block.layer.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["batch_stats"]["decoder"]["hyper_feats"]["conv_list_2"]["bn"]["var"],
                                sd["decoder.hyper_feats.conv_list.2.layer.1.running_var"])
  back = convert.variables_to_torch(variables, cfg, num_batches_tracked=3)
  assert list(back) == list(sd)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
    np.testing.assert_array_equal(back[k], v, err_msg=k)


@pytest.mark.parametrize("variant", ["vit_b16", "r50"])
def test_big_variants_convert_strictly_both_ways(variant):
  """Shape-level round trip with zero-memory (broadcast) inputs; values are checked on vit_s16 and tiny models."""
  cfg = get_config(variant)
  sd = {k: np.broadcast_to(np.array(1 if d == "int64" else 0.5, d), s)
        for k, s, d in convert.official_key_table(cfg)}
  variables, _ = convert.torch_to_variables(sd, cfg, pos_embed_resize="exact")
  backbone_io.check_variables(cfg, variables)
  back = convert.variables_to_torch(variables, cfg, num_batches_tracked=1)
  assert [(k, v.shape, str(v.dtype)) for k, v in back.items()] == _read_official(variant)


def test_strict_errors_list_keys_and_shapes():
  cfg = get_config("tiny")
  sd = _random_state_dict(cfg)
  sd.pop("encoder.encoder.blocks.1.mlp.fc1.bias")
  sd["decoder.decoder4.first_block.layer.0.weight"] = np.zeros((3, 3, 1, 1), np.float32)
  sd["decoder.dim_map_layers.0.weight"] = np.zeros((5, 64, 1, 1), np.float32)
  with pytest.raises(ConversionError) as e:
    convert.torch_to_variables(sd, cfg)
  msg = str(e.value)
  assert "missing (1)" in msg and "encoder.encoder.blocks.1.mlp.fc1.bias [256]" in msg
  assert "unexpected (1)" in msg and "decoder.decoder4.first_block.layer.0.weight [3, 3, 1, 1]" in msg
  assert "wrong shape (1)" in msg
  assert "decoder.dim_map_layers.0.weight: got [5, 64, 1, 1], expected [16, 64, 1, 1]" in msg
  variables, _ = convert.torch_to_variables(_random_state_dict(cfg), cfg)
  del variables["batch_stats"]["decoder"]["decoder1"]["first_block"]["bn"]["mean"]
  variables["params"]["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
  with pytest.raises(ConversionError,
                     match=r"(?s)missing \(1\).*decoder1/first_block/bn/mean.*unexpected \(1\).*extra"):
    convert.variables_to_torch(variables, cfg)


def test_position_embedding_resize():
  cfg = get_config("tiny")  # stored for 224 px: 14 x 14 grid
  sd = _random_state_dict(cfg)
  pos = sd[convert.POS_EMBED_KEY]
  exact, info = convert.torch_to_variables(sd, cfg, pos_embed_resize="exact")
  np.testing.assert_array_equal(exact["params"]["encoder"]["pos_embed"], pos)
  official, info = convert.torch_to_variables(sd, cfg)
  got = official["params"]["encoder"]["pos_embed"]
  assert info["pos_embed"] == "14x14 -> 14x14 (official)"
  np.testing.assert_array_equal(got[:, 0], pos[:, 0])
  assert 0 < np.abs(got - pos).mean() < 0.2  # near-identity bicubic, as the official loader does
  cfg_512 = get_config("tiny")
  cfg_512.img_size = 512
  big, info = convert.torch_to_variables(sd, cfg_512)
  assert big["params"]["encoder"]["pos_embed"].shape == (1, 1 + 32 * 32, 64)
  assert info["pos_embed"] == "14x14 -> 32x32 (official)"
  backbone_io.check_variables(cfg_512, big)
  with pytest.raises(ConversionError, match="position embedding"):
    convert.resize_pos_embed_official(pos[:, :-1], 4)


def test_extract_state_dict_and_infer_variant():
  sd = _random_state_dict(get_config("tiny"))
  ckpt = {"teacher": {**{"module.backbone." + k: v for k, v in sd.items()}, "module.head.mlp.0.weight": np.zeros(2)},
          "epoch": 3, "args": None}
  got, info = convert.extract_state_dict(ckpt)
  assert list(got) == list(sd) and info == {"key": "teacher", "prefix": "module.backbone.", "skipped": 1}
  got, info = convert.extract_state_dict(sd)
  assert list(got) == list(sd) and info["prefix"] == "" and info["key"] is None
  assert convert.infer_variant(got) == "tiny"
  assert convert.infer_variant(_random_state_dict(get_config("tiny_r50"))) == "tiny_r50"
  with pytest.raises(ConversionError, match="no dict entry 'student'"):
    convert.extract_state_dict(ckpt, key="student")
  with pytest.raises(ConversionError, match="expected a dict"):
    convert.extract_state_dict([1, 2])
  with pytest.raises(ConversionError, match="cannot tell the architecture"):
    convert.infer_variant({"x": np.zeros(1)})


def test_import_then_export_cli_round_trip(tmp_path, capsys):
  cfg = get_config("tiny")
  sd = _random_state_dict(cfg, count=7)
  ckpt = tmp_path / "muse-tiny-224.pth"
  torch_format.save(ckpt, {"teacher": collections.OrderedDict(
      [("module.backbone." + k, v) for k, v in sd.items()] + [("module.head.last_layer.weight", np.ones((2, 3)))]),
      "epoch": 100})
  out = tmp_path / "backbone"
  import_torch.main(["--checkpoint", str(ckpt), "--arch", "tiny", "--out", str(out), "--pos_embed_resize", "exact"])
  assert "wrote" in capsys.readouterr().out
  model_cfg, variables = backbone_io.load_backbone(out)
  assert model_cfg.name == "tiny" and model_cfg.img_size == 224
  info = json.loads((out / backbone_io.INFO_FILE).read_text())
  assert info["num_batches_tracked"] == 7 and info["skipped_tensors"] == 1
  pth = tmp_path / "exported.pth"
  export_torch.main(["--backbone", str(out), "--out", str(pth)])
  back = torch_format.load(pth)["teacher"]
  assert list(back) == ["module.backbone." + k for k in sd]
  for k, v in sd.items():
    np.testing.assert_array_equal(back["module.backbone." + k], v, err_msg=k)
  plain = export_torch.export_backbone(out, tmp_path / "plain.pth", layout="state_dict")
  assert list(torch_format.load(plain)) == list(sd)
  with pytest.raises(ConversionError, match="tensors are those of tiny"):
    import_torch.import_checkpoint(ckpt, tmp_path / "b2", arch="vit_s16")
  with pytest.raises(ValueError, match="multiple of 16"):
    import_torch.import_checkpoint(ckpt, tmp_path / "b3", img_size=100)


def test_core_does_not_import_torch():
  code = (
    "import importlib, pkgutil, sys\n"
    "import muse_jax\n"
    "failed = []\n"
    "for m in pkgutil.walk_packages(muse_jax.__path__, 'muse_jax.'):\n"
    "  try:\n"
    "    importlib.import_module(m.name)\n"
    "  except Exception as e:\n"
    "    failed.append(m.name)\n"
    "  if 'torch' in sys.modules:\n"
    "    print('TORCH', m.name); sys.exit(1)\n"
    "for name in ('muse_jax.tools.torch_format', 'muse_jax.tools.convert', 'muse_jax.tools.import_torch',\n"
    "             'muse_jax.tools.export_torch', 'muse_jax.models', 'muse_jax.ops', 'muse_jax.backbone_io'):\n"
    "  assert name in sys.modules, (name, failed)\n"
    "print('OK', failed)\n"
  )
  root = pathlib.Path(__file__).resolve().parents[1]
  res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


def test_cls_proj_mode_round_trip():
  cfg = get_config("tiny")
  cfg.cls_mode = "proj"
  table = convert.official_key_table(cfg)
  proj = [(k, s) for k, s, _ in table if "cls_token_layers" in k]
  assert proj == [(f"encoder.cls_token_layers.{i}.mlp.{n}", s) for i in range(4)
                  for n, s in (("weight", (64, 128)), ("bias", (64,)))]
  keys = [k for k, _, _ in table]
  assert keys.index("encoder.encoder.norm.bias") < keys.index("encoder.cls_token_layers.0.mlp.weight") < keys.index(
      "decoder.dim_map_layers.0.weight")
  sd = _random_state_dict(cfg)
  variables, _ = convert.torch_to_variables(sd, cfg, pos_embed_resize="exact")
  back = convert.variables_to_torch(variables, cfg, num_batches_tracked=3)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
