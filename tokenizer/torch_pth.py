"""Torch-free reader for PyTorch checkpoints (`torch.save` files) into numpy arrays.

A `.pth` file is either a zip archive (torch >= 1.6: `<name>/data.pkl` plus one raw file per storage under
`<name>/data/`) or a legacy stream of pickles (magic number, protocol, system info, the object, the storage keys,
then every storage's raw bytes). Both pickle tensors as `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)` calls over typed storages. We rebuild them with a *restricted* unpickler: only the handful of globals
that tensor data needs resolve, everything else is refused, so no code from a checkpoint ever runs. This keeps torch
(several GB) out of the dependencies. It lives in `tokenizer` because that is the base package every other part
(VAR import, FID weights) may import from.

Public API:
  load_pth(path, allow_unknown_objects=False) -> dict[str, np.ndarray]   flat state dict ('.'-joined nested keys)
  load_pth_object(path, allow_unknown_objects=False) -> object           the unpickled structure with numpy leaves
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import io
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["CheckpointReadError", "load_pth", "load_pth_object"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch typed-storage class names -> numpy dtypes.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}


class CheckpointReadError(ValueError):
  """A checkpoint file is missing, truncated, corrupt or holds something other than tensor data."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str

  @property
  def dtype(self) -> np.dtype:
    return _STORAGE_DTYPES[self.name]


class _Storage:
  """A typed storage whose bytes are attached after unpickling (legacy files store them after the pickle)."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype = dtype
    self.numel = numel
    self.data: np.ndarray | None = None  # (numel,) of dtype


@dataclasses.dataclass
class _LazyTensor:
  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


@dataclasses.dataclass
class OpaqueObject:
  """Stand-in for a non-tensor object (e.g. an argparse Namespace in a trainer checkpoint); holds its raw state."""

  qualname: str
  args: tuple = ()
  state: Any = None

  def __setstate__(self, state):
    self.state = state


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
  return _LazyTensor(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, *_unused):
  return data


def _make_ordered_dict(*args):
  return collections.OrderedDict(*args)


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): _make_ordered_dict,
    ("torch", "Size"): tuple,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only tensor-rebuilding globals; storages come from `persistent_load`."""

  def __init__(self, file, storage_loader, allow_unknown_objects: bool):
    super().__init__(file)
    self._storage_loader = storage_loader
    self._allow_unknown = allow_unknown_objects

  def find_class(self, module, name):
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if self._allow_unknown:
      qualname = f"{module}.{name}"
      return lambda *args: OpaqueObject(qualname, args)
    raise CheckpointReadError(
        f"refusing to unpickle global {module}.{name}: only tensor data is allowed in a checkpoint "
        "(pass allow_unknown_objects=True to keep such objects as inert OpaqueObject records)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise CheckpointReadError(f"unexpected persistent id {pid!r}: not a torch storage")
    return self._storage_loader(pid)


def _materialize(obj, path: str):
  """Replaces every _LazyTensor in a nested structure by a contiguous numpy array."""
  if isinstance(obj, _LazyTensor):
    st = obj.storage
    if st.data is None:
      raise CheckpointReadError(f"{path}: storage data missing (truncated file?)")
    if any(s < 0 for s in obj.size) or any(s < 0 for s in obj.stride):
      raise CheckpointReadError(f"{path}: negative size/stride {obj.size}/{obj.stride}")
    count = int(np.prod(obj.size, dtype=np.int64))
    last = obj.offset + sum((n - 1) * s for n, s in zip(obj.size, obj.stride, strict=True)) if count else obj.offset
    if count and (obj.offset < 0 or last >= st.data.shape[0]):
      raise CheckpointReadError(
          f"{path}: tensor view (offset {obj.offset}, size {obj.size}, stride {obj.stride}) lies outside its "
          f"storage of {st.data.shape[0]} elements (corrupt file?)")
    itemsize = st.data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        st.data[obj.offset:], shape=obj.size, strides=tuple(s * itemsize for s in obj.stride), writeable=False)
    return np.array(view, copy=True, order="C")
  if isinstance(obj, dict):
    out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _materialize(v, f"{path}.{k}" if path else str(k))
    return out
  if isinstance(obj, (list, tuple)):
    items = [_materialize(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    return type(obj)(items) if isinstance(obj, list) else tuple(items)
  return obj


def _read_bytes(path: str | os.PathLike) -> bytes:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == b"\x1f\x8b":  # gzip-compressed checkpoint (e.g. foo.pth.gz)
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
      raise CheckpointReadError(f"{path}: corrupt or truncated gzip stream ({e})") from e
  return raw


def _load_zip(raw: bytes, path: str, allow_unknown: bool):
  try:
    zf = zipfile.ZipFile(io.BytesIO(raw))
    names = zf.namelist()
  except zipfile.BadZipFile as e:
    raise CheckpointReadError(f"{path}: not a readable torch zip checkpoint ({e}); the file may be truncated") from e
  pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
  if len(pkl) != 1:
    raise CheckpointReadError(f"{path}: zip archive without a unique '<name>/data.pkl' (found {pkl})")
  prefix = pkl[0][: -len("data.pkl")]
  byteorder = "little"
  if prefix + "byteorder" in names:
    byteorder = zf.read(prefix + "byteorder").decode().strip()
  storages: dict[str, _Storage] = {}

  def load_storage(pid):
    _, stype, key, _location, numel = pid[:5]
    if not isinstance(stype, _StorageType):
      raise CheckpointReadError(f"{path}: unsupported storage type {stype!r}")
    if key not in storages:
      st = _Storage(stype.dtype, int(numel))
      try:
        buf = zf.read(f"{prefix}data/{key}")
      except (KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise CheckpointReadError(f"{path}: storage {key} missing or corrupt ({e})") from e
      dtype = st.dtype.newbyteorder("<" if byteorder == "little" else ">")
      if len(buf) < st.numel * dtype.itemsize:
        raise CheckpointReadError(
            f"{path}: storage {key} holds {len(buf)} bytes, expected {st.numel * dtype.itemsize} (truncated?)")
      st.data = np.frombuffer(buf, dtype=dtype, count=st.numel).astype(st.dtype, copy=False)
      storages[key] = st
    return storages[key]

  try:
    obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), load_storage, allow_unknown).load()
  except CheckpointReadError:
    raise
  except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
    raise CheckpointReadError(f"{path}: corrupt pickle in {pkl[0]} ({type(e).__name__}: {e})") from e
  return obj


def _load_legacy(raw: bytes, path: str, allow_unknown: bool):
  f = io.BytesIO(raw)
  storages: dict[str, _Storage] = {}
  views: list[tuple[str, _Storage, int]] = []

  def load_storage(pid):
    _, stype, root_key, _location, numel = pid[:5]
    view_metadata = pid[5] if len(pid) > 5 else None
    if not isinstance(stype, _StorageType):
      raise CheckpointReadError(f"{path}: unsupported storage type {stype!r}")
    if root_key not in storages:
      storages[root_key] = _Storage(stype.dtype, int(numel))
    root = storages[root_key]
    if view_metadata is None:
      return root
    view_key, offset, view_size = view_metadata
    view = _Storage(root.dtype, int(view_size))
    views.append((root_key, view, int(offset)))
    return view

  try:
    def plain_load():
      return _RestrictedUnpickler(f, load_storage, allow_unknown).load()

    magic = plain_load()
    if magic != _LEGACY_MAGIC:
      raise CheckpointReadError(f"{path}: not a torch checkpoint (neither a zip archive nor the legacy magic number)")
    protocol = plain_load()
    if protocol != _LEGACY_PROTOCOL:
      raise CheckpointReadError(f"{path}: unsupported legacy protocol version {protocol}")
    sys_info = plain_load()
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    obj = plain_load()
    keys = plain_load()
  except CheckpointReadError:
    raise
  except Exception as e:  # noqa: BLE001 - truncated or corrupt pickle stream
    raise CheckpointReadError(f"{path}: corrupt or truncated legacy checkpoint ({type(e).__name__}: {e})") from e

  for key in keys:
    st = storages.get(key)
    if st is None:
      raise CheckpointReadError(f"{path}: storage key {key!r} listed but never referenced")
    header = f.read(8)
    if len(header) != 8:
      raise CheckpointReadError(f"{path}: truncated before the data of storage {key}")
    (numel,) = struct.unpack("<q" if little else ">q", header)
    dtype = st.dtype.newbyteorder("<" if little else ">")
    nbytes = numel * dtype.itemsize
    buf = f.read(nbytes)
    if len(buf) != nbytes or numel != st.numel:
      raise CheckpointReadError(f"{path}: storage {key} truncated or inconsistent ({len(buf)} of {nbytes} bytes)")
    st.data = np.frombuffer(buf, dtype=dtype).astype(st.dtype, copy=False)
  for root_key, view, offset in views:
    root = storages[root_key]
    if root.data is None:
      raise CheckpointReadError(f"{path}: view of storage {root_key} without data")
    view.data = root.data[offset: offset + view.numel]
  return obj


def load_pth_object(path: str | os.PathLike, allow_unknown_objects: bool = False) -> Any:
  """Reads a torch checkpoint (zip or legacy; optionally gzip-compressed) with tensors as numpy arrays.

  Args:
    path: the .pth file.
    allow_unknown_objects: if False (default) any global other than tensor/storage/OrderedDict raises; if True such
      objects come back as inert `OpaqueObject` records (nothing is executed either way).
  Returns:
    The unpickled structure (usually a dict) with every tensor replaced by a contiguous np.ndarray.
  """
  path = os.fspath(path)
  raw = _read_bytes(path)
  if raw[:4] == b"PK\x03\x04":
    obj = _load_zip(raw, path, allow_unknown_objects)
  else:
    obj = _load_legacy(raw, path, allow_unknown_objects)
  return _materialize(obj, "")


def _flatten(obj, prefix: str, out: dict[str, np.ndarray]):
  if isinstance(obj, np.ndarray):
    out[prefix] = obj
  elif isinstance(obj, dict):
    for k, v in obj.items():
      _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)


def load_pth(path: str | os.PathLike, allow_unknown_objects: bool = False) -> dict[str, np.ndarray]:
  """Reads a torch checkpoint into a flat `name -> np.ndarray` dict.

  Nested dicts (e.g. a trainer checkpoint `{'trainer': {'var_wo_ddp': state_dict}}`) are flattened with '.'-joined
  keys; non-tensor leaves (step counters, args) are dropped.
  """
  obj = load_pth_object(path, allow_unknown_objects)
  if isinstance(obj, np.ndarray):
    return {"": obj}
  if not isinstance(obj, dict):
    raise CheckpointReadError(f"{os.fspath(path)}: top-level object is a {type(obj).__name__}, not a state dict")
  out: dict[str, np.ndarray] = {}
  _flatten(obj, "", out)
  return out
