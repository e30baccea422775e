"""Official VQVAE state dict (torch names, OIHW convs) <-> NNX `VQVAE` parameters.

The NNX module tree mirrors the torch one, so a parameter path maps to a torch key by joining it with '.' and
renaming the leaf (conv `kernel` / norm `scale` / codebook `embedding` -> `weight`); conv kernels are
transposed HWIO <-> OIHW. Loading is strict: every missing, unexpected or mis-shaped key is reported in one
ValueError.
"""

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tokenizer.vqvae import VQVAE, VQVAEConfig

# Buffers of the official module that carry no model parameters (usage statistics, shape (S, V) depends on S).
IGNORED_KEYS = frozenset({"quantize.ema_vocab_hit_SV"})
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _torch_key(path: tuple) -> str:
  leaf = path[-1]
  if leaf not in _LEAF_NAMES:
    raise ValueError(f"no official name for parameter {'.'.join(map(str, path))}")
  return ".".join(str(p) for p in path[:-1]) + "." + _LEAF_NAMES[leaf]


def _to_torch_layout(path: tuple, x):
  return np.transpose(x, (3, 2, 0, 1)) if path[-1] == "kernel" and x.ndim == 4 else x  # HWIO -> OIHW


def _from_torch_layout(path: tuple, x):
  return np.transpose(x, (2, 3, 1, 0)) if path[-1] == "kernel" and x.ndim == 4 else x  # OIHW -> HWIO


def _torch_shape(path: tuple, shape: tuple) -> tuple:
  if path[-1] == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def _param_paths(model: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
  return list(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def official_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  """The official key -> torch-layout shape that `model` expects (works on abstract models too)."""
  return {_torch_key(p): _torch_shape(p, tuple(v.get_value().shape)) for p, v in _param_paths(model)}


def check_state_dict(model: nnx.Module, state_dict: Mapping[str, object]):
  """Raises ONE ValueError listing every missing, unexpected and mis-shaped key; `IGNORED_KEYS` are skipped.

  Only shapes are read, so values may be any objects with a `.shape` (numpy arrays, ShapeDtypeStructs).
  """
  expected = official_shapes(model)
  given = {k: tuple(np.shape(v)) for k, v in state_dict.items() if k not in IGNORED_KEYS}
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(set(given) - set(expected))
  misshaped = sorted(k for k in set(expected) & set(given) if expected[k] != given[k])
  if missing or unexpected or misshaped:
    lines = [f"official VQVAE state dict does not match the model ({len(expected)} parameters expected):"]
    lines += [f"  missing key: {k} (expected shape {expected[k]})" for k in missing]
    lines += [f"  unexpected key: {k} (shape {given[k]})" for k in unexpected]
    lines += [f"  shape mismatch: {k}: checkpoint {given[k]} vs model {expected[k]}" for k in misshaped]
    lines.append(
      "check that the VQVAEConfig (ch, ch_mult, z_channels, vocab_size, share_quant_resi, ...) matches"
    )
    raise ValueError("\n".join(lines))


def load_official_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray]) -> nnx.Module:
  """Copies an official torch-layout state dict into `model` in place (strict; see `check_state_dict`).

  Values keep each parameter's dtype and, where the model's parameters are already sharded, their sharding.
  Returns the model.
  """
  check_state_dict(model, state_dict)
  for path, var in _param_paths(model):
    old = var.get_value()
    value = np.asarray(_from_torch_layout(path, np.asarray(state_dict[_torch_key(path)])), dtype=old.dtype)
    sharding = getattr(old, "sharding", None)
    new = (
      jax.device_put(value, sharding) if isinstance(sharding, jax.sharding.Sharding) else jnp.asarray(value)
    )
    var.set_value(new)
  return model


def to_official_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's parameters as an official torch-layout state dict of numpy arrays (no buffers)."""
  return {
    _torch_key(p): np.asarray(_to_torch_layout(p, np.asarray(v.get_value()))) for p, v in _param_paths(model)
  }


def load_official_vqvae(
  source: str | os.PathLike | Mapping[str, np.ndarray], config: VQVAEConfig | None = None
) -> VQVAE:
  """Builds a `VQVAE(config)` (default: the official 256px config) and loads an official state dict into it.

  `source` is a state dict or a path to an official `.pth` (read without torch). The model is built without
  eager sharding; shard it afterwards (e.g. device_put with nnx.get_named_sharding).
  """
  config = config or VQVAEConfig()
  if isinstance(source, Mapping):
    state_dict = source
  else:
    from tokenizer.torch_pth import load_pth

    state_dict = load_pth(source)
  # Build abstractly (no random init is paid) and fill every parameter from the state dict; other variables
  # (dropout RNG state when dropout > 0) need a concrete build.
  model = nnx.eval_shape(lambda: _build(config))
  check_state_dict(model, state_dict)
  if jax.tree.leaves(nnx.split(model, nnx.Param, ...)[2]):
    model = _build(config)
  return load_official_state_dict(model, state_dict)


def _build(config: VQVAEConfig) -> VQVAE:
  with nnx.use_eager_sharding(False):
    return VQVAE(config, rngs=nnx.Rngs(0))
