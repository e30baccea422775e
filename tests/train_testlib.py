"""Tiny training configs and helpers shared by the training tests (not a test module itself)."""

import pathlib

import jax
import numpy as np

from configs import digits_tokenizer, digits_var
from tokenizer.vqvae import VQVAE, VQVAEConfig

# 8x8 digits (their native size), downsample 2 -> a 4x4 latent, patch_nums (1, 2, 3, 4).
TINY_TOKENIZER = dict(ch=32, ch_mult=(1, 1), num_res_blocks=1, using_sa=False, using_mid_sa=False,
                      z_channels=8, vocab_size=64, patch_nums=(1, 2, 3, 4), quant_resi=0.5,
                      share_quant_resi=4, beta=0.25, dropout=0.0, in_channels=3)


def tokenizer_config(data_dir, **overrides):
  c = digits_tokenizer.get_config("runlocal")
  c.input.data_dir = str(data_dir)
  c.input.resolution = 8
  c.tokenizer.update(TINY_TOKENIZER)
  c.optim.warmup_steps = 0  # the first step already runs at the peak lr
  c.ckpt.async_save = False
  c.update_from_flattened_dict(overrides)
  return c


def var_config(data_dir, tokenizer_dir, **overrides):
  c = digits_var.get_config("runlocal")
  c.input.data_dir = str(data_dir)
  c.input.resolution = 8
  c.tokenizer_dir = str(tokenizer_dir)
  c.model.update(dict(depth=2, width=64, num_heads=4, drop_path_rate=0.1))
  c.optim.warmup_steps = 0  # the first step already runs at the peak lr
  c.ckpt.async_save = False
  c.update_from_flattened_dict(overrides)
  return c


def write_tokenizer_dir(path: pathlib.Path, seed: int = 0) -> pathlib.Path:
  """A random tiny tokenizer saved as a model directory (what the tokenizer stage exports)."""
  from flax import nnx

  from var.pretrained import save_pretrained

  cfg = VQVAEConfig(**TINY_TOKENIZER)
  with nnx.use_eager_sharding(False):
    model = VQVAE(cfg, rngs=nnx.Rngs(seed))
  save_pretrained(path, tokenizer=model, tokenizer_config=cfg)
  return path


def synthetic_batch(batch: int, resolution: int, seed: int = 0, num_classes: int = 10) -> dict:
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(-1, 1, (batch, resolution, resolution, 3)).astype(np.float32),
          "label": rng.integers(0, num_classes, (batch,)).astype(np.int32)}


def max_abs_diff(a, b) -> float:
  """Largest |a - b| over the leaves of two pytrees of arrays with the same paths. Integer and string keys
  count as the same (nnx pure dicts key list entries by int, orbax restores them as strings)."""
  fa, fb = _flat_by_name(a), _flat_by_name(b)
  if fa.keys() != fb.keys():
    raise AssertionError(f"different leaves: {sorted(fa.keys() ^ fb.keys())[:10]}")

  def diff(x, y):
    return float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) if np.size(x) else 0.0

  return max(diff(fa[k], fb[k]) for k in fa)


def _flat_by_name(tree) -> dict:
  if isinstance(tree, dict) and tree and all(isinstance(k, str) and k.startswith("[") for k in tree):
    return {k.replace("'", ""): v for k, v in tree.items()}  # already flat (flat_state / an npz of it)
  return {jax.tree_util.keystr(p).replace("'", ""): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def flat_state(tree) -> dict[str, np.ndarray]:
  """A pytree of arrays -> {jax.tree_util.keystr(path): numpy array}."""
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def write_torch_zip(path: pathlib.Path, state_dict: dict) -> pathlib.Path:
  """Writes `state_dict` (name -> float32 numpy) as a torch >= 1.6 zip checkpoint, byte-compatible with what
  `torch.save` produces for plain tensors, without torch: the pickle references
  torch._utils._rebuild_tensor_v2 and torch.FloatStorage through stand-in modules that exist only while
  pickling."""
  import collections
  import io
  import pickle
  import sys
  import types
  import zipfile

  if "torch" in sys.modules:
    raise RuntimeError("write_torch_zip needs the stand-in torch modules; a real torch is imported")
  torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):  # only referenced by name in the pickle; the reader resolves it itself
    raise RuntimeError("stand-in for torch._utils._rebuild_tensor_v2; never called")

  class FloatStorage:
    pass

  _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
  FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
  utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
  torch_mod.FloatStorage, torch_mod._utils = FloatStorage, utils_mod

  class Storage:
    def __init__(self, key, numel):
      self.key, self.numel = key, numel

  class Tensor:
    def __init__(self, storage, shape):
      self.storage, self.shape = storage, shape

    def __reduce__(self):
      stride = tuple(int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape)))
      args = (self.storage, 0, tuple(self.shape), stride, False, collections.OrderedDict())
      return _rebuild_tensor_v2, args

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, Storage):
        return ("storage", FloatStorage, obj.key, "cpu", obj.numel)
      return None

  arrays, obj = {}, collections.OrderedDict()
  for i, (name, value) in enumerate(state_dict.items()):
    value = np.ascontiguousarray(value, np.float32)
    arrays[str(i)] = value
    obj[name] = Tensor(Storage(str(i), value.size), value.shape)
  buf = io.BytesIO()
  sys.modules["torch"], sys.modules["torch._utils"] = torch_mod, utils_mod
  try:
    Pickler(buf, protocol=2).dump(obj)
  finally:
    del sys.modules["torch"], sys.modules["torch._utils"]
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
    zf.writestr("archive/byteorder", "little")
    for key, value in arrays.items():
      zf.writestr(f"archive/data/{key}", value.tobytes())
  return path


def restore_arrays(state_dir) -> dict:
  """An orbax `state` item as host numpy arrays, whatever mesh, devices or process count saved it (a target
  on this process's first device; restoring without a target needs the saving topology)."""
  import orbax.checkpoint as ocp

  ckptr = ocp.StandardCheckpointer()
  path = pathlib.Path(state_dir).absolute()
  meta = ckptr.metadata(path).item_metadata.tree
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  return jax.tree.map(np.asarray, ckptr.restore(path, target))
