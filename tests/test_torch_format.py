"""Tests of muse_jax.tools.torch_format: torch-free, code-free reading and writing of torch.save checkpoints."""

import argparse
import collections
import io
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from muse_jax.tools import torch_format
from muse_jax.tools.torch_format import TorchFormatError, UnsafeCheckpointError


def _zip_with_pickle(path, pkl: bytes, extra: dict[str, bytes] | None = None) -> None:
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pkl)
    zf.writestr("archive/byteorder", b"little")
    for name, data in (extra or {}).items():
      zf.writestr(f"archive/{name}", data)
    zf.writestr("archive/version", b"3\n")


class _RunsCode:
  """Unpickling this calls os.system (what a malicious checkpoint does)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _sample_tree():
  return {
    "teacher": collections.OrderedDict(
      w=np.arange(24, dtype=np.float32).reshape(2, 3, 4),
      n=np.array(7, np.int64),
      h=np.linspace(-1, 1, 5).astype(np.float16),
      bf=np.array([1.5, -2.25], ml_dtypes.bfloat16),
      b=np.array([True, False]),
      i8=np.arange(-3, 3, dtype=np.int8),
      empty=np.zeros((0, 3), np.float32),
    ),
    "epoch": 12,
    "lr": 2.5e-4,
    "big": -(2**70),
    "mid": 70000,
    "neg": -3,
    "name": "muse ✓",
    "flags": [True, False, None],
    "shape": (1, 2, 3, 4, 5),
    "one": (1,),
  }


def _assert_tree_equal(a, b):
  assert type(a) is type(b), (type(a), type(b))
  if isinstance(a, dict):
    assert list(a) == list(b)
    for k in a:
      _assert_tree_equal(a[k], b[k])
  elif isinstance(a, (list, tuple)):
    assert len(a) == len(b)
    for x, y in zip(a, b):
      _assert_tree_equal(x, y)
  elif isinstance(a, np.ndarray):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
  else:
    assert a == b


def test_save_load_round_trip(tmp_path):
  tree = _sample_tree()
  path = tmp_path / "ckpt.pth"
  torch_format.save(path, tree)
  back = torch_format.load(path)
  _assert_tree_equal(tree, back)
  with zipfile.ZipFile(path) as zf:  # storages are 64-byte aligned, like torch.save (needed for mmap loading).
    for info in zf.infolist():
      if "/data/" in info.filename:
        assert (info.header_offset + 30 + len(info.filename) + len(info.extra)) % 64 == 0
        assert info.compress_type == zipfile.ZIP_STORED


def test_save_rejects_unsupported_objects(tmp_path):
  with pytest.raises(TypeError, match="cannot save"):
    torch_format.save(tmp_path / "x.pth", {"f": lambda: 0})
  with pytest.raises(TypeError, match="dtype"):
    torch_format.save(tmp_path / "x.pth", {"u": np.zeros(2, np.uint32)})
  assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_code_in_pickle_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  _zip_with_pickle(path, pickle.dumps({"teacher": _RunsCode(marker)}, protocol=2))
  with pytest.raises(UnsafeCheckpointError, match=r"'(posix|os)\.system'"):
    torch_format.load(path)
  assert not marker.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("subprocess", "Popen"), ("torch", "load"),
                                         ("torch._utils", "_rebuild_qtensor"), ("numpy", "load")])
def test_globals_outside_allow_list_are_refused(tmp_path, module, name):
  pkl = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nX\x01\x00\x00\x001\x85R."
  path = tmp_path / "evil.pth"
  _zip_with_pickle(path, pkl)
  with pytest.raises(UnsafeCheckpointError, match=rf"'{module}\.{name}'"):
    torch_format.load(path)


def test_truncated_and_corrupt_files(tmp_path):
  path = tmp_path / "good.pth"
  torch_format.save(path, {"w": np.ones((64, 64), np.float32)})
  data = path.read_bytes()
  for cut in (len(data) // 2, len(data) - 30, 40):
    bad = tmp_path / f"cut{cut}.pth"
    bad.write_bytes(data[:cut])
    with pytest.raises(TorchFormatError, match="truncated or corrupt"):
      torch_format.load(bad)
  corrupt = bytearray(data)
  start = data.index(b"\x00\x00\x80\x3f")  # first float 1.0 of the storage
  corrupt[start + 3] = 0x40
  bad = tmp_path / "flipped.pth"
  bad.write_bytes(bytes(corrupt))
  with pytest.raises(TorchFormatError, match="truncated or corrupt"):
    torch_format.load(bad)


def test_files_that_are_not_checkpoints(tmp_path):
  cases = {
    "empty.pth": (b"", "empty"),
    "text.pth": (b"hello, not a checkpoint\n", "not a PyTorch checkpoint"),
    "legacy.pth": (pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2), "legacy"),
    "x.safetensors": (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}      ", "safetensors"),
  }
  npy = io.BytesIO()
  np.save(npy, np.zeros(3))
  cases["array.npy"] = (npy.getvalue(), "not a PyTorch checkpoint")
  for name, (data, message) in cases.items():
    (tmp_path / name).write_bytes(data)
    with pytest.raises(TorchFormatError, match=message):
      torch_format.load(tmp_path / name)
  with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
    zf.writestr("readme.txt", "just a zip")
  with pytest.raises(TorchFormatError, match="data.pkl"):
    torch_format.load(tmp_path / "other.zip")
  with zipfile.ZipFile(tmp_path / "script.pt", "w") as zf:
    zf.writestr("m/data.pkl", b"\x80\x02N.")
    zf.writestr("m/constants.pkl", b"\x80\x02N.")
    zf.writestr("m/code/__torch__.py", "")
  with zipfile.ZipFile(tmp_path / "deflated.pth", "w", compression=zipfile.ZIP_DEFLATED) as zf:
    zf.writestr("archive/data.pkl", b"\x80\x02N." + b" " * 1000)
  with pytest.raises(TorchFormatError, match="compressed"):
    torch_format.load(tmp_path / "deflated.pth")
  with pytest.raises(TorchFormatError, match="TorchScript"):
    torch_format.load(tmp_path / "script.pt")
  with pytest.raises(TorchFormatError, match="cannot read"):
    torch_format.load(tmp_path / "missing.pth")


def test_storage_references_are_checked(tmp_path):
  def tensor_pkl(numel_in_pid: int, size: tuple[int, ...], offset: int = 0) -> bytes:
    w = torch_format._PickleWriter()  # pylint: disable=protected-access
    w.out.write(b"\x80\x02c" + b"torch._utils\n_rebuild_tensor_v2\n(" + b"(")
    w.dump("storage")
    w.out.write(b"ctorch\nFloatStorage\n")
    w.dump("0")
    w.dump("cpu")
    w.dump(numel_in_pid)
    w.out.write(b"tQ")
    w.dump(offset)
    w.dump(size)
    w.dump(tuple(int(np.prod(size[i + 1:])) for i in range(len(size))))
    w.out.write(b"\x89)tR.")
    return w.out.getvalue()

  storage = np.arange(6, dtype=np.float32).tobytes()
  path = tmp_path / "t.pth"
  _zip_with_pickle(path, tensor_pkl(6, (2, 3)), {"data/0": storage})
  np.testing.assert_array_equal(torch_format.load(path), np.arange(6, dtype=np.float32).reshape(2, 3))
  _zip_with_pickle(path, tensor_pkl(8, (2, 4)), {"data/0": storage})
  with pytest.raises(TorchFormatError, match="holds 24 bytes"):
    torch_format.load(path)
  _zip_with_pickle(path, tensor_pkl(6, (2, 3), offset=2), {"data/0": storage})
  with pytest.raises(TorchFormatError, match="past the end"):
    torch_format.load(path)
  _zip_with_pickle(path, tensor_pkl(6, (2, 3)))
  with pytest.raises(TorchFormatError, match="missing"):
    torch_format.load(path)


# --- against PyTorch itself -------------------------------------------------------------------------------------------


@pytest.mark.torch
def test_reads_what_torch_saves(tmp_path):
  torch = pytest.importorskip("torch")
  gen = torch.Generator().manual_seed(0)
  base = torch.arange(12.0)
  layer = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
  opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
  layer(torch.randn(2, 3, 5, 5, generator=gen)).sum().backward()
  opt.step()
  tagged = torch.randn(3, generator=gen)
  tagged.note = "python attribute"  # pickled through torch._tensor._rebuild_from_type_v2
  obj = {
    "teacher": layer.state_dict(),
    "param": torch.nn.Parameter(torch.randn(2, 2, generator=gen)),
    "tagged": tagged,
    "view": base[3:9].view(2, 3),
    "whole": base,
    "transposed": torch.randn(3, 5, generator=gen).t(),
    "bf16": torch.randn(4, generator=gen).bfloat16(),
    "half": torch.randn(4, generator=gen).half(),
    "long": torch.tensor(5),
    "args": argparse.Namespace(arch="vit_small", lr=0.1),
    "optimizer": opt.state_dict(),  # the rest of a DINO-format checkpoint
    "fp16_scaler": torch.amp.GradScaler("cpu").state_dict(),
    "set": {1, 2},
    "bytes": b"\x00\x01",
    "np_scalar": np.float64(0.5),
  }
  path = tmp_path / "torch.pth"
  torch.save(obj, path)
  got = torch_format.load(path)
  for k, v in obj.items():
    if isinstance(v, torch.Tensor):
      want = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
      have = got[k].astype(np.float32) if v.dtype == torch.bfloat16 else got[k]
      assert have.shape == tuple(v.shape), k
      np.testing.assert_array_equal(have, want, err_msg=k)
  sd = got["teacher"]
  assert isinstance(sd, collections.OrderedDict) and list(sd) == list(layer.state_dict())
  for k, v in layer.state_dict().items():
    np.testing.assert_array_equal(sd[k], v.numpy())
  assert sd["1.num_batches_tracked"].dtype == np.int64
  assert got["bf16"].dtype == ml_dtypes.bfloat16
  assert got["args"].arch == "vit_small" and got["args"].lr == 0.1
  assert got["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
  np.testing.assert_array_equal(got["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
  assert got["fp16_scaler"]["scale"] == 65536.0
  assert got["set"] == {1, 2} and got["bytes"] == b"\x00\x01" and got["np_scalar"] == 0.5


@pytest.mark.torch
def test_torch_reads_what_we_save(tmp_path):
  torch = pytest.importorskip("torch")
  tree = _sample_tree()
  path = tmp_path / "ours.pth"
  torch_format.save(path, tree)
  for kwargs in ({}, {"mmap": True}):
    got = torch.load(path, weights_only=True, **kwargs)
    assert isinstance(got["teacher"], collections.OrderedDict)
    assert list(got["teacher"]) == list(tree["teacher"])
    for k, v in tree["teacher"].items():
      t = got["teacher"][k]
      assert tuple(t.shape) == v.shape, k
      have = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
      np.testing.assert_array_equal(have, v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v, err_msg=k)
    assert got["teacher"]["bf"].dtype == torch.bfloat16 and got["teacher"]["n"].dtype == torch.int64
    for k in ("epoch", "lr", "big", "mid", "neg", "name", "flags", "shape", "one"):
      assert got[k] == tree[k], k


@pytest.mark.torch
def test_legacy_torch_files_are_refused_clearly(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "legacy.pth"
  torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
  with pytest.raises(TorchFormatError, match="legacy"):
    torch_format.load(path)
