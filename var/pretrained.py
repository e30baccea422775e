"""The project's own model directory: parameters (orbax) + one JSON config, loaded by directory.

Layout::

  DIR/config.json     {"format": "var-jax-pretrained", "version": 1, "tokenizer": {...VQVAEConfig...},
                       "var": {...} or null}
  DIR/tokenizer/      orbax StandardCheckpointer save of the VQVAE parameters (nnx.Param state, pure dict)
  DIR/var/            the same for the VAR transformer, when one is saved

Writing is atomic: everything goes into a hidden temporary sibling directory that is renamed onto DIR at the end,
so a crash never leaves a half-written model directory behind.
"""

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from tokenizer.vqvae import VQVAE, VQVAEConfig

FORMAT = "var-jax-pretrained"
VERSION = 1
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
VAR_DIR = "var"


def _config_to_dict(config: Any) -> dict[str, Any]:
  if hasattr(config, "to_dict"):
    return dict(config.to_dict())
  if dataclasses.is_dataclass(config):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
  if isinstance(config, Mapping):
    return dict(config)
  raise TypeError(f"cannot serialise config of type {type(config).__name__}; give a dataclass or a dict")


def _this_process_only() -> ocp.StandardCheckpointer:
  """An orbax checkpointer that coordinates with no other process. Model directories are written by one
  process (process 0, after gathering) and read by each process on its own; orbax's default would wait at
  barriers for every process of a jax.distributed job."""
  me = jax.process_index()
  return ocp.StandardCheckpointer(
      multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))


def save_module_state(path: str | os.PathLike, module: nnx.Module):
  """Saves the nnx.Param state of `module` with orbax into the (new) directory `path` (this process alone)."""
  pure = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  ckptr = _this_process_only()
  ckptr.save(os.path.abspath(path), pure)
  ckptr.wait_until_finished()


def restore_module(path: str | os.PathLike, build: Callable[[], nnx.Module]) -> nnx.Module:
  """Restores the nnx.Param state saved at `path` into the module made by `build` (built abstractly first).

  `build` must construct the module (it runs under nnx.eval_shape, so no random init is paid); variables that
  are not parameters keep their freshly built values.
  """
  abstract = nnx.eval_shape(build)
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  # This process's first device: with several processes jax.devices()[0] belongs to process 0, and an orbax
  # restore onto devices another process owns fails ("the Array has no addressable shards").
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or device),
    nnx.to_pure_dict(params),
  )
  try:
    restored = _this_process_only().restore(os.path.abspath(path), target)
  except Exception as e:  # orbax raises a variety of types for missing/corrupt/mismatched items
    raise ValueError(f"could not restore parameters from {path}: {type(e).__name__}: {e}") from e
  nnx.replace_by_pure_dict(params, restored)
  if jax.tree.leaves(rest):  # non-parameter variables (none in the VQVAE): build them concretely
    _, _, rest = nnx.split(build(), nnx.Param, ...)
  return nnx.merge(graphdef, params, rest)


def save_pretrained(
  directory: str | os.PathLike,
  *,
  tokenizer: nnx.Module,
  tokenizer_config: VQVAEConfig,
  var: nnx.Module | None = None,
  var_config: Any = None,
  overwrite: bool = False,
) -> str:
  """Writes a model directory (tokenizer, and optionally a VAR transformer); returns its absolute path.

  Raises FileExistsError if `directory` exists and `overwrite` is False.
  """
  if (var is None) != (var_config is None):
    raise ValueError("give both var and var_config, or neither")
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(f"{directory} already exists; pass overwrite=True or choose another directory")
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
  try:
    save_module_state(os.path.join(tmp, TOKENIZER_DIR), tokenizer)
    if var is not None:
      save_module_state(os.path.join(tmp, VAR_DIR), var)
    meta = {
      "format": FORMAT,
      "version": VERSION,
      "tokenizer": tokenizer_config.to_dict(),
      "var": None if var_config is None else _config_to_dict(var_config),
    }
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(meta, f, indent=1)
    if os.path.exists(directory):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-", dir=parent)
      os.rename(directory, os.path.join(old, "d"))
      os.rename(tmp, directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
  """The parsed config.json of a model directory, with clear errors for a missing or corrupt directory."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"model directory {directory} does not exist (write one with save_pretrained or "
                            f"python -m var.convert)")
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"{directory} is not a model directory: {CONFIG_FILE} is missing")
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"corrupt model directory {directory}: cannot parse {CONFIG_FILE}: {e}") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ValueError(f"{path} is not a {FORMAT} config (format field: "
                     f"{meta.get('format') if isinstance(meta, dict) else None!r})")
  if meta.get("version") != VERSION:
    raise ValueError(f"{path} has format version {meta.get('version')!r}; this code reads version {VERSION}")
  return meta



def _restore_part(directory, subdir: str, module_cls, config):
  """Restores a `module_cls(config)` from the parameter folder `directory/subdir` (clear error if it is missing)."""
  path = os.path.join(os.fspath(directory), subdir)
  if not os.path.isdir(path):
    raise ValueError(f"corrupt model directory {directory}: the {subdir}/ parameter folder is missing")

  def build():
    with nnx.use_eager_sharding(False):
      return module_cls(config, rngs=nnx.Rngs(0))

  return restore_module(path, build)

def load_tokenizer(directory: str | os.PathLike) -> tuple[VQVAE, VQVAEConfig]:
  """Loads the tokenizer of a model directory -> (VQVAE with restored parameters, its VQVAEConfig).

  The model is built without eager sharding (parameters on the default device); shard it afterwards.
  """
  meta = read_config(directory)
  if not isinstance(meta.get("tokenizer"), dict):
    raise ValueError(f"model directory {directory} holds no tokenizer config")
  try:
    config = VQVAEConfig.from_dict(meta["tokenizer"])
  except (TypeError, ValueError) as e:
    raise ValueError(f"corrupt tokenizer config in {directory}: {e}") from e
  return _restore_part(directory, TOKENIZER_DIR, VQVAE, config), config


def load_var(directory: str | os.PathLike):
  """Loads the VAR transformer of a model directory -> (VAR with restored parameters, its VARConfig).

  Raises ValueError when the directory holds no VAR, or when its config does not fit the directory's tokenizer
  (patch_nums, vocabulary or latent width differ)."""
  from var.model import VAR, VARConfig

  meta = read_config(directory)
  if not isinstance(meta.get("var"), dict):
    raise ValueError(f"model directory {directory} holds only a tokenizer (no VAR transformer); convert one with "
                     f"python -m var.convert --var var_dXX.pth, or train one with train.py")
  try:
    config = VARConfig.from_dict(meta["var"])
  except (TypeError, ValueError) as e:
    raise ValueError(f"corrupt VAR config in {directory}: {e}") from e
  tok = meta.get("tokenizer") or {}
  mismatch = {k: (getattr(config, k), tok.get(k)) for k in ("patch_nums", "vocab_size", "z_channels")
              if k in tok and tuple(np.atleast_1d(getattr(config, k))) != tuple(np.atleast_1d(tok[k]))}
  if mismatch:
    raise ValueError(f"model directory {directory}: the VAR config does not match its tokenizer "
                     f"(field: (var, tokenizer)) {mismatch}; re-export the directory with matching models")
  return _restore_part(directory, VAR_DIR, VAR, config), config


def load_pretrained(directory: str | os.PathLike):
  """Loads both models of a model directory -> (VAR, VARConfig, VQVAE, VQVAEConfig)."""
  var, var_config = load_var(directory)
  vae, vae_config = load_tokenizer(directory)
  return var, var_config, vae, vae_config
