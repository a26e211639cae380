"""Safe reading and writing of PyTorch checkpoint files (`torch.save` zip format) without importing torch.

A PyTorch checkpoint written by `torch.save` (PyTorch >= 1.6) is an uncompressed zip archive:

- `<archive>/data.pkl`: a pickle (protocol 2) of the saved object. Each tensor appears as a call to
  `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks)`, where
  `storage` is a *persistent id* `('storage', torch.FloatStorage, key, location, numel)`;
- `<archive>/data/<key>`: the raw bytes of storage `key` (`numel` elements of the storage's dtype);
- `<archive>/byteorder` (`little` or `big`), `<archive>/version` and a few other small records.

`load` reads such a file with a restricted `pickle.Unpickler`: its `find_class` resolves only a short allow-list of
globals (tensor and parameter rebuilding, the storage types, `collections.OrderedDict`, a few plain builtins, numpy
scalars, and `argparse.Namespace`, which becomes a plain `types.SimpleNamespace`). Every other global is refused with
`UnsafeCheckpointError` naming it, so unpickling can never run code from the file. Tensors come back as numpy arrays
(bfloat16 as `ml_dtypes.bfloat16`).

`save` writes the same format from nested dicts, lists, tuples, scalars and arrays, emitting the pickle opcodes itself;
the files load with `torch.load(path, weights_only=True)`.

Legacy (pre-1.6) non-zip files and TorchScript archives are refused with a message saying what they are.
"""

from __future__ import annotations

import collections
import io
import os
import pathlib
import pickle
import struct
import tempfile
import types
import zipfile
import zlib
from typing import Any, Callable

import numpy as np

__all__ = [
  "TorchFormatError",
  "UnsafeCheckpointError",
  "load",
  "save",
]

PathLike = str | os.PathLike


class TorchFormatError(ValueError):
  """The file is not a readable PyTorch checkpoint (wrong format, truncated, corrupt, unsupported content)."""


class UnsafeCheckpointError(TorchFormatError):
  """The checkpoint's pickle asks for a global outside the allow-list (it could run code when loaded)."""


def _bfloat16() -> np.dtype:
  import ml_dtypes  # a jax dependency; imported lazily to keep this module light.

  return np.dtype(ml_dtypes.bfloat16)


# Legacy typed-storage class names (what torch 2.x pickles) -> numpy dtype names.
_STORAGE_DTYPES: dict[str, str] = {
  "DoubleStorage": "float64",
  "FloatStorage": "float32",
  "HalfStorage": "float16",
  "BFloat16Storage": "bfloat16",
  "LongStorage": "int64",
  "IntStorage": "int32",
  "ShortStorage": "int16",
  "CharStorage": "int8",
  "ByteStorage": "uint8",
  "BoolStorage": "bool",
  "ComplexFloatStorage": "complex64",
  "ComplexDoubleStorage": "complex128",
  "UntypedStorage": "uint8",
}
_NUMPY_TO_STORAGE: dict[str, str] = {v: k for k, v in _STORAGE_DTYPES.items() if k != "UntypedStorage"}


def _np_dtype(name: str) -> np.dtype:
  return _bfloat16() if name == "bfloat16" else np.dtype(name)


class _StorageType:
  """Stand-in for a `torch.<X>Storage` class named in the pickle."""

  def __init__(self, name: str):
    self.name = name
    self.dtype_name = _STORAGE_DTYPES[name]


class _Marker:
  """Stand-in for a harmless class that only tags data (`torch.Tensor`, `torch.nn.Parameter`)."""

  def __init__(self, qualname: str):
    self.qualname = qualname


class _Storage:
  """A storage referenced by the pickle: `numel` elements of `dtype`, read from `<archive>/data/<key>`."""

  def __init__(self, array: np.ndarray, key: str):
    self.array = array
    self.key = key


def _check(cond: bool, path: str, msg: str) -> None:
  if not cond:
    raise TorchFormatError(f"{path}: {msg}")


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler for `data.pkl` that resolves only allow-listed globals; tensors become numpy arrays."""

  def __init__(self, data: bytes, path: str, read_storage: Callable[[str, np.dtype, int], np.ndarray]):
    super().__init__(io.BytesIO(data))
    self._path = path
    self._read_storage = read_storage
    self._storages: dict[str, _Storage] = {}
    self._globals: dict[tuple[str, str], Any] = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
      ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter,
      ("torch._tensor", "_rebuild_from_type_v2"): self._rebuild_from_type_v2,
      ("torch", "Tensor"): _Marker("torch.Tensor"),
      ("torch.nn.parameter", "Parameter"): _Marker("torch.nn.parameter.Parameter"),
      ("argparse", "Namespace"): types.SimpleNamespace,
      ("builtins", "set"): set,
      ("builtins", "frozenset"): frozenset,
      ("builtins", "complex"): complex,
      ("_codecs", "encode"): self._codecs_encode,
      ("numpy", "dtype"): self._numpy_dtype,
      ("numpy.core.multiarray", "scalar"): self._numpy_scalar,
      ("numpy._core.multiarray", "scalar"): self._numpy_scalar,
    }
    for name in _STORAGE_DTYPES:
      self._globals[("torch", name)] = _StorageType(name)
    self._tensor_rebuilders = (self._rebuild_tensor_v2, self._rebuild_tensor, self._rebuild_parameter)

  def find_class(self, module: str, name: str) -> Any:
    if module == "__builtin__":  # protocol-2 pickles name Python 2's module for builtins.
      module = "builtins"
    try:
      return self._globals[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
        f"{self._path}: refusing to load: its pickle asks for the global '{module}.{name}', which is not on the "
        "allow-list of plain data (tensors, storages, dicts, lists, numbers, strings). Loading it could run code "
        "stored in the file. Re-save the state dict alone (torch.save(model.state_dict(), path)) from a trusted "
        "PyTorch session."
      ) from None

  def persistent_load(self, pid: Any) -> _Storage:
    _check(
      isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage",
      self._path,
      f"unsupported persistent id {pid!r:.200} in data.pkl (expected ('storage', type, key, location, numel))",
    )
    _, storage_type, key, _location, numel = pid
    _check(
      isinstance(storage_type, _StorageType) and isinstance(key, str) and isinstance(numel, int) and numel >= 0,
      self._path,
      f"malformed storage reference {pid!r:.200}",
    )
    if key not in self._storages:
      dtype = _np_dtype(storage_type.dtype_name)
      self._storages[key] = _Storage(self._read_storage(key, dtype, numel), key)
    storage = self._storages[key]
    return storage

  # --- allow-listed callables -----------------------------------------------------------------------------------

  def _rebuild_tensor_v2(
    self, storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
    backward_hooks: Any = None, metadata: Any = None,
  ) -> np.ndarray:
    del requires_grad, backward_hooks, metadata
    return self._rebuild_tensor(storage, storage_offset, size, stride)

  def _rebuild_tensor(self, storage: Any, storage_offset: Any, size: Any, stride: Any) -> np.ndarray:
    _check(isinstance(storage, _Storage), self._path, "tensor without a storage in data.pkl")
    ok = (
      isinstance(storage_offset, int) and storage_offset >= 0
      and isinstance(size, tuple) and all(isinstance(s, int) and s >= 0 for s in size)
      and isinstance(stride, tuple) and len(stride) == len(size) and all(isinstance(s, int) and s >= 0 for s in stride)
    )
    _check(ok, self._path,
           f"malformed tensor (offset={storage_offset!r:.50}, size={size!r:.80}, stride={stride!r:.80})")
    data = storage.array
    numel = int(np.prod(size, dtype=np.int64))
    if numel == 0:
      return np.zeros(size, data.dtype)
    extent = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    _check(
      extent <= data.size, self._path,
      f"tensor (offset {storage_offset}, size {list(size)}, stride {list(stride)}) reaches past the end of storage "
      f"'{storage.key}' ({data.size} elements)",
    )
    contiguous = tuple(int(s) for s in np.cumprod((1,) + size[:0:-1])[::-1]) if size else ()
    dense = all(n == 1 or s == c for n, s, c in zip(size, stride, contiguous))
    if storage_offset == 0 and numel == data.size and dense:
      return data.reshape(size)
    item = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
      data[storage_offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False)
    return np.array(view)

  def _rebuild_parameter(self, data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                         state: Any = None) -> np.ndarray:
    del requires_grad, backward_hooks, state
    _check(isinstance(data, np.ndarray), self._path, "parameter without tensor data in data.pkl")
    return data

  def _rebuild_from_type_v2(self, func: Any, new_type: Any, args: Any, state: Any) -> Any:
    del state
    _check(
      any(func == f for f in self._tensor_rebuilders) and isinstance(new_type, _Marker) and isinstance(args, tuple),
      self._path, "unsupported tensor subclass rebuild in data.pkl",
    )
    return func(*args)

  def _codecs_encode(self, obj: Any, encoding: Any = "utf-8") -> bytes:
    _check(isinstance(obj, str) and encoding in ("latin1", "latin-1"), self._path,
           "unsupported _codecs.encode call in data.pkl")
    return obj.encode("latin1")

  def _numpy_dtype(self, name: Any, align: Any = False, copy: Any = True) -> np.dtype:
    _check(isinstance(name, str), self._path, f"unsupported numpy dtype {name!r:.50} in data.pkl")
    dtype = np.dtype(name, bool(align), True)
    _check(not dtype.hasobject, self._path, "object-dtype numpy values are not supported")
    return dtype

  def _numpy_scalar(self, dtype: Any, data: Any = None) -> Any:
    _check(isinstance(dtype, np.dtype) and not dtype.hasobject and isinstance(data, bytes)
           and len(data) == dtype.itemsize, self._path, "unsupported numpy scalar in data.pkl")
    return np.frombuffer(data, dtype)[0]


def _sniff(path: str, head: bytes) -> None:
  """Raises a TorchFormatError that says what the file is when it is not a zip checkpoint."""
  if head.startswith(b"PK\x03\x04"):
    return
  if not head:
    raise TorchFormatError(f"{path}: the file is empty; expected a PyTorch checkpoint (zip archive).")
  if head.startswith(b"\x80") and len(head) > 1 and head[1] in (2, 3, 4, 5):
    raise TorchFormatError(
      f"{path}: this is a legacy (pre-1.6, non-zip) PyTorch file or a bare pickle, which is not supported. Re-save it "
      "with a recent PyTorch: torch.save(torch.load(path, weights_only=True), new_path).")
  if len(head) >= 262 and head[257:262] == b"ustar":
    raise TorchFormatError(f"{path}: this is a tar archive (the oldest PyTorch format), which is not supported.")
  if len(head) >= 10 and head[8:9] == b"{":
    raise TorchFormatError(f"{path}: this looks like a safetensors file; expected a torch.save checkpoint (zip).")
  raise TorchFormatError(
    f"{path}: not a PyTorch checkpoint: expected a torch.save zip archive (starting with b'PK\\x03\\x04'), "
    f"found {head[:8]!r}.")


def load(path: PathLike) -> Any:
  """Reads a `torch.save` checkpoint without torch and without running code from it.

  Args:
    path: a `.pth`/`.pt` file written by `torch.save` (zip format, PyTorch >= 1.6).

  Returns:
    The saved object, with every tensor as a numpy array (same shape and dtype; bfloat16 as `ml_dtypes.bfloat16`),
    dicts and `OrderedDict`s as themselves, and `argparse.Namespace` as `types.SimpleNamespace`.

  Raises:
    UnsafeCheckpointError: the pickle names a global outside the allow-list (it could run code).
    TorchFormatError: the file is not a checkpoint, is truncated or corrupt, or holds unsupported content.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      head = f.read(512)
  except OSError as e:
    raise TorchFormatError(f"{path}: cannot read the file ({e}).") from e
  _sniff(path, head)
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
    raise TorchFormatError(
      f"{path}: truncated or corrupt PyTorch checkpoint: the zip archive cannot be opened ({e}).") from e
  with zf:
    try:
      return _load_zip(zf, path)
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
      raise TorchFormatError(f"{path}: truncated or corrupt PyTorch checkpoint ({type(e).__name__}: {e}).") from e


def _load_zip(zf: zipfile.ZipFile, path: str) -> Any:
  names = zf.namelist()
  pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
  if not pkls:
    _check(not any(n.endswith("constants.pkl") for n in names), path,
           "this is a TorchScript archive (torch.jit.save), not a state-dict checkpoint.")
    raise TorchFormatError(f"{path}: zip archive without '<archive>/data.pkl': not a torch.save checkpoint.")
  _check(len(pkls) == 1, path, f"several data.pkl records ({pkls[:4]}); not a torch.save checkpoint.")
  prefix = pkls[0][: -len("data.pkl")]
  _check(not any(n.startswith(prefix + "code/") or n == prefix + "constants.pkl" for n in names), path,
         "this is a TorchScript archive (torch.jit.save), not a state-dict checkpoint.")
  byteorder = "little"
  if prefix + "byteorder" in names:
    byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
    _check(byteorder in ("little", "big"), path, f"unknown byteorder record {byteorder!r}.")
  infos = {i.filename: i for i in zf.infolist()}
  archive_size = os.path.getsize(path)

  def check_record(info: zipfile.ZipInfo) -> None:
    """torch.save stores records uncompressed; a compressed or oversized record is refused before reading it."""
    _check(info.compress_type == zipfile.ZIP_STORED, path,
           f"record '{info.filename}' is compressed; torch.save writes uncompressed records (corrupt or not a "
           "torch.save checkpoint).")
    _check(info.file_size <= archive_size, path,
           f"record '{info.filename}' claims {info.file_size} bytes in a {archive_size}-byte file (truncated or "
           "corrupt).")

  def read_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    name = f"{prefix}data/{key}"
    _check(name in infos, path, f"storage record '{name}' is missing from the archive (truncated or corrupt file).")
    info = infos[name]
    check_record(info)
    nbytes = numel * dtype.itemsize
    _check(info.file_size == nbytes, path,
           f"storage record '{name}' holds {info.file_size} bytes; the pickle expects {numel} x {dtype} = {nbytes}.")
    array = np.empty(numel, dtype)
    if nbytes:
      buf = memoryview(array.view(np.uint8).reshape(-1))
      with zf.open(info) as f:
        got = 0
        while got < nbytes:
          n = f.readinto(buf[got:])
          if not n:
            break
          got += n
      _check(got == nbytes, path, f"storage record '{name}' is truncated ({got} of {nbytes} bytes).")
    if byteorder == "big" and dtype.itemsize > 1:
      array = array.view(dtype.newbyteorder(">")).astype(dtype)
    return array

  check_record(infos[pkls[0]])
  data = zf.read(pkls[0])
  try:
    return _RestrictedUnpickler(data, path, read_storage).load()
  except TorchFormatError:
    raise
  except (pickle.UnpicklingError, EOFError, IndexError, KeyError, TypeError, ValueError, AttributeError,
          struct.error, RecursionError) as e:
    raise TorchFormatError(f"{path}: corrupt data.pkl in the checkpoint ({type(e).__name__}: {e}).") from e


# --- writing ---------------------------------------------------------------------------------------------------------


class _PickleWriter:
  """Emits protocol-2 pickle opcodes for plain data and numpy arrays (as torch tensors)."""

  def __init__(self):
    self.out = io.BytesIO()
    self.storages: list[tuple[str, np.ndarray]] = []
    self._by_id: dict[int, str] = {}

  def _global(self, module: str, name: str) -> None:
    self.out.write(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

  def _ordered_dict_new(self) -> None:
    self._global("collections", "OrderedDict")
    self.out.write(b")R")

  def _int(self, x: int) -> None:
    w = self.out.write
    if 0 <= x < 256:
      w(b"K" + bytes([x]))
    elif 0 <= x < 65536:
      w(b"M" + struct.pack("<H", x))
    elif -(2**31) <= x < 2**31:
      w(b"J" + struct.pack("<i", x))
    else:
      n = (x.bit_length() + 8) // 8
      data = x.to_bytes(n, "little", signed=True)
      w(b"\x8a" + bytes([len(data)]) + data)

  def _str(self, s: str) -> None:
    b = s.encode("utf-8")
    self.out.write(b"X" + struct.pack("<I", len(b)) + b)

  def _tuple(self, items: tuple, depth: int = 0) -> None:
    if not items:
      self.out.write(b")")
      return
    if len(items) > 3:
      self.out.write(b"(")
    for it in items:
      self.dump(it, depth)
    self.out.write({1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(items), b"t"))

  def _tensor(self, array: np.ndarray) -> None:
    dtype_name = "bfloat16" if array.dtype == _bfloat16() else array.dtype.name
    if dtype_name not in _NUMPY_TO_STORAGE:
      raise TypeError(f"cannot save an array of dtype {array.dtype} as a torch tensor "
                      f"(supported: {sorted(_NUMPY_TO_STORAGE)})")
    key = self._by_id.get(id(array))
    if key is None:
      key = str(len(self.storages))
      self._by_id[id(array)] = key
      self.storages.append((key, np.ascontiguousarray(array)))
    size = tuple(int(s) for s in array.shape)
    stride = tuple(int(s) for s in np.cumprod((1,) + size[:0:-1])[::-1]) if size else ()
    self._global("torch._utils", "_rebuild_tensor_v2")
    self.out.write(b"(")
    self.out.write(b"(")
    self._str("storage")
    self._global("torch", _NUMPY_TO_STORAGE[dtype_name])
    self._str(key)
    self._str("cpu")
    self._int(int(array.size))
    self.out.write(b"tQ")
    self._int(0)
    self._tuple(size)
    self._tuple(stride)
    self.out.write(b"\x89")
    self._ordered_dict_new()
    self.out.write(b"tR")

  def dump(self, obj: Any, depth: int = 0) -> None:
    if depth > 200:
      raise ValueError("object nested too deeply (cycle?)")
    w = self.out.write
    if obj is None:
      w(b"N")
    elif obj is True:
      w(b"\x88")
    elif obj is False:
      w(b"\x89")
    elif isinstance(obj, (np.ndarray,)) or (hasattr(obj, "__array__") and hasattr(obj, "shape")
                                             and not isinstance(obj, np.generic)):
      self._tensor(obj if isinstance(obj, np.ndarray) else np.asarray(obj))
    elif isinstance(obj, np.generic):
      self.dump(obj.item(), depth + 1)
    elif isinstance(obj, int):
      self._int(int(obj))
    elif isinstance(obj, float):
      w(b"G" + struct.pack(">d", obj))
    elif isinstance(obj, str):
      self._str(obj)
    elif isinstance(obj, tuple):
      self._tuple(obj, depth + 1)
    elif isinstance(obj, list):
      w(b"]")
      if obj:
        w(b"(")
        for it in obj:
          self.dump(it, depth + 1)
        w(b"e")
    elif isinstance(obj, dict):
      if isinstance(obj, collections.OrderedDict):
        self._ordered_dict_new()
      else:
        w(b"}")
      if obj:
        w(b"(")
        for k, v in obj.items():
          if not isinstance(k, (str, int)):
            raise TypeError(f"dict keys must be str or int to save, got {type(k).__name__}")
          self.dump(k, depth + 1)
          self.dump(v, depth + 1)
        w(b"u")
    else:
      raise TypeError(
        f"cannot save a {type(obj).__module__}.{type(obj).__name__} in a torch checkpoint: supported are dicts, "
        "lists, tuples, str, int, float, bool, None and arrays.")


_ALIGN = 64


def save(path: PathLike, obj: Any, *, archive_name: str = "archive") -> None:
  """Writes `obj` as a `torch.save`-format checkpoint that `torch.load(path, weights_only=True)` reads.

  Args:
    path: the output file (written atomically: a temporary file in the same folder, then renamed).
    obj: nested dicts (`OrderedDict` stays one), lists, tuples, str, int, float, bool, None and arrays (numpy or
      anything with `__array__`, e.g. jax arrays), which become CPU tensors of the same dtype and shape.
    archive_name: the top-level folder name inside the zip.

  Raises:
    TypeError: `obj` holds something other than the types above, or an array dtype torch has no storage for.
  """
  path = pathlib.Path(path)
  writer = _PickleWriter()
  writer.out.write(b"\x80\x02")
  writer.dump(obj)
  writer.out.write(b".")
  pkl = writer.out.getvalue()
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
  os.close(fd)
  try:
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
      def write_record(name: str, data: bytes | memoryview, align: bool = False) -> None:
        info = zipfile.ZipInfo(f"{archive_name}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = len(data) if isinstance(data, bytes) else data.nbytes
        zip64 = info.file_size > zipfile.ZIP64_LIMIT
        if align:
          start = zf.fp.tell() + 30 + len(info.filename.encode("utf-8")) + 4 + (20 if zip64 else 0)
          pad = (-start) % _ALIGN
          info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        with zf.open(info, "w", force_zip64=zip64) as f:
          step = 1 << 26
          for i in range(0, info.file_size, step):
            f.write(data[i:i + step])

      write_record("data.pkl", pkl)
      write_record(".format_version", b"1")
      write_record(".storage_alignment", str(_ALIGN).encode())
      write_record("byteorder", b"little")
      for key, array in writer.storages:
        if array.dtype.byteorder == ">":
          array = array.astype(array.dtype.newbyteorder("<"))
        write_record(f"data/{key}", memoryview(array.reshape(-1).view(np.uint8)), align=True)
      write_record("version", b"3\n")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise

