"""Official VAR state dicts (`var_d16.pth` ... `var_d36.pth`, trainer checkpoints) <-> `var.model.VAR` parameters.

Official layout (VAR.md 2.2): one key per block and tensor (`blocks.{i}.attn.mat_qkv.weight`), torch Linear weights
(out, in). Ours: blocks stacked along a leading "layers" axis, Linear kernels (in, out). The import is strict: every
missing, unexpected or mis-shaped key is collected and reported in ONE error. The buffers `lvl_1L`,
`attn_bias_for_masking` and `blocks.{i}.attn.zero_k_bias` carry no parameters; they are checked against the values
the config implies (a mismatch means the checkpoint was made for other patch_nums) and then dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from var.model import VAR, VARConfig, abstract, block_causal_bias, level_index

_BUFFERS = ("lvl_1L", "attn_bias_for_masking")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _param_paths(model: VAR) -> dict[tuple, tuple[int, ...]]:
  """Our parameter paths -> shapes (abstract or concrete model)."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {tuple(str(p) for p in path): tuple(v.get_value().shape) for path, v in flat}


def _official_name(path: tuple[str, ...]) -> tuple[str, bool]:
  """Our path (without the 'blocks' prefix for stacked params) -> (official key suffix, is a Linear weight)."""
  *mods, leaf = path
  mods = ["ada_lin.1" if m == "ada_lin" else ("shared_ada_lin.1" if m == "shared_ada_lin" else m) for m in mods]
  if leaf == "kernel":
    return ".".join(mods + ["weight"]), True
  if leaf == "embedding":
    return ".".join(mods + ["weight"]), False
  return ".".join(mods + [leaf]), False


def expected_state_dict_shapes(config: VARConfig) -> dict[str, tuple[int, ...]]:
  """Official key -> torch shape for a config (parameters and the buffers the official module registers)."""
  out = {}
  for path, shape in _param_paths(abstract(config)).items():
    if path[0] == "blocks":
      name, linear = _official_name(path[1:])
      per = shape[1:][::-1] if linear else shape[1:]
      for i in range(config.depth):
        out[f"blocks.{i}.{name}"] = per
    else:
      name, linear = _official_name(path)
      out[name] = shape[::-1] if linear else shape
  for i in range(config.depth):
    out[f"blocks.{i}.attn.zero_k_bias"] = (config.width,)
  out["lvl_1L"] = (1, config.seq_len)
  out["attn_bias_for_masking"] = (1, 1, config.seq_len, config.seq_len)
  return out


def unwrap_checkpoint(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Accepts a plain VAR state dict or a flattened trainer checkpoint (`trainer.var_wo_ddp.*`)."""
  for prefix in ("trainer.var_wo_ddp.", "var_wo_ddp.", "module."):
    if any(k.startswith(prefix) for k in state_dict):
      return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  return dict(state_dict)


def check_state_dict(config: VARConfig, state_dict: Mapping[str, np.ndarray]) -> None:
  """Raises ONE ValueError listing every missing, unexpected and mis-shaped key, and inconsistent buffers."""
  expected = expected_state_dict_shapes(config)
  missing = sorted(set(expected) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(expected))
  shaped = sorted(f"{k}: got {tuple(np.shape(state_dict[k]))}, expected {expected[k]}"
                  for k in set(expected) & set(state_dict) if tuple(np.shape(state_dict[k])) != expected[k])
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): {missing}")
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
  if shaped:
    problems.append(f"wrong shapes ({len(shaped)}): {shaped}")
  if not problems:
    problems += _buffer_problems(config, state_dict)
  if problems:
    raise ValueError(f"state dict does not match VARConfig(depth={config.depth}, width={config.width}, "
                     f"patch_nums={config.patch_nums}, shared_aln={config.shared_aln}, "
                     f"attn_l2_norm={config.attn_l2_norm}, vocab_size={config.vocab_size}, "
                     f"num_classes={config.num_classes}):\n  " + "\n  ".join(problems)
                     + "\n  fix: pick the model options (depth, patch_nums, shared_aln, ...) the checkpoint was "
                     "trained with")


def _buffer_problems(config: VARConfig, sd: Mapping[str, np.ndarray]) -> list[str]:
  problems = []
  if not np.array_equal(np.asarray(sd["lvl_1L"]).reshape(-1), level_index(config.patch_nums)):
    problems.append(f"buffer lvl_1L does not match patch_nums {config.patch_nums}")
  if not np.array_equal(np.asarray(sd["attn_bias_for_masking"], np.float32).reshape(config.seq_len, config.seq_len),
                        block_causal_bias(config.patch_nums)):
    problems.append(f"buffer attn_bias_for_masking is not the block-causal mask of patch_nums {config.patch_nums}")
  nonzero = [i for i in range(config.depth) if np.any(np.asarray(sd[f"blocks.{i}.attn.zero_k_bias"]) != 0)]
  if nonzero:
    problems.append(f"buffer zero_k_bias is not zero in blocks {nonzero} (a k bias is not part of the model)")
  return problems


def state_dict_to_params(config: VARConfig, state_dict: Mapping[str, np.ndarray]) -> dict[tuple, np.ndarray]:
  """Strictly converts an official state dict to {our param path: float32 array} (stacked, kernels transposed)."""
  sd = unwrap_checkpoint(state_dict)
  check_state_dict(config, sd)
  out = {}
  for path in _param_paths(abstract(config)):
    if path[0] == "blocks":
      name, linear = _official_name(path[1:])
      per = [np.asarray(sd[f"blocks.{i}.{name}"], np.float32) for i in range(config.depth)]
      out[path] = np.stack([w.T if linear else w for w in per])
    else:
      name, linear = _official_name(path)
      w = np.asarray(sd[name], np.float32)
      out[path] = w.T if linear else w
  return out


def load_state_dict(model: VAR, state_dict: Mapping[str, np.ndarray]) -> VAR:
  """Loads an official (or trainer) state dict into `model` in place (strict); returns the model."""
  params = state_dict_to_params(model.config, state_dict)
  state = nnx.state(model, nnx.Param)
  for path, var in nnx.to_flat_state(state):
    value = params[tuple(str(p) for p in path)]
    old = var.get_value()
    sharding = getattr(old, "sharding", None)
    var.set_value(jax.device_put(value, sharding) if sharding is not None else jax.numpy.asarray(value))
  nnx.update(model, state)
  return model


def to_state_dict(model: VAR, params: nnx.State | None = None, *, buffers: bool = True) -> dict[str, np.ndarray]:
  """Our model -> an official-layout state dict (numpy), loadable by the official `VAR.load_state_dict(strict=True)`.

  `params` (an `nnx.State` shaped like the model's parameters, e.g. gradients) replaces the model's own values;
  `buffers=False` leaves out lvl_1L / attn_bias_for_masking / zero_k_bias."""
  cfg = model.config
  params = nnx.state(model, nnx.Param) if params is None else params
  sd = {}
  for path, var in nnx.to_flat_state(params):
    path = tuple(str(p) for p in path)
    value = np.asarray(var.get_value() if hasattr(var, "get_value") else var)
    if path[0] == "blocks":
      name, linear = _official_name(path[1:])
      for i in range(cfg.depth):
        sd[f"blocks.{i}.{name}"] = value[i].T if linear else value[i]
    else:
      name, linear = _official_name(path)
      sd[name] = value.T if linear else value
  if buffers:
    for i in range(cfg.depth):
      sd[f"blocks.{i}.attn.zero_k_bias"] = np.zeros((cfg.width,), np.float32)
    sd["lvl_1L"] = level_index(cfg.patch_nums).astype(np.int64)[None]
    sd["attn_bias_for_masking"] = block_causal_bias(cfg.patch_nums)[None, None]
  return sd


def config_from_state_dict(state_dict: Mapping[str, np.ndarray], **overrides) -> VARConfig:
  """Infers the architecture of an official state dict (depth, width, heads, patch_nums from the lvl_1L buffer,
  shared AdaLN, L2 attention, vocabulary, classes); `overrides` set the rest (e.g. dtype, init options).

  The head count is stored only by L2-normalised attention (its per-head `scale_mul_1H11`). Without it the
  weights fit every head count that divides the width, so it must come from `overrides` (num_heads=...)
  or a preset / config; a ValueError says so rather than guessing.
  """
  sd = unwrap_checkpoint(state_dict)
  try:
    depth = 1 + max(int(m.group(1)) for m in map(_BLOCK_RE.match, sd) if m)
    width = int(np.shape(sd["pos_start"])[-1])
    l2 = "blocks.0.attn.scale_mul_1H11" in sd
    lvl = np.asarray(sd["lvl_1L"]).reshape(-1)
    counts = np.bincount(lvl)
    patch_nums = tuple(int(round(math.sqrt(n))) for n in counts)
    kw = dict(
      depth=depth, width=width, mlp_ratio=np.shape(sd["blocks.0.ffn.fc1.weight"])[0] / width,
      vocab_size=int(np.shape(sd["head.weight"])[0]), z_channels=int(np.shape(sd["word_embed.weight"])[1]),
      patch_nums=patch_nums, num_classes=int(np.shape(sd["class_emb.weight"])[0]) - 1,
      shared_aln="shared_ada_lin.1.weight" in sd, attn_l2_norm=l2, drop_path_rate=0.1 * depth / 24)
    if l2:
      kw["num_heads"] = int(np.shape(sd["blocks.0.attn.scale_mul_1H11"])[1])
  except (KeyError, ValueError, IndexError) as e:
    raise ValueError(f"not an official VAR state dict (could not infer the architecture: {e!r})") from e
  if any(p * p != n for p, n in zip(patch_nums, counts, strict=True)):
    raise ValueError(f"lvl_1L scale sizes {counts.tolist()} are not squares; pass patch_nums explicitly")
  kw.update(overrides)
  if "num_heads" not in kw:
    divisors = [h for h in range(1, width + 1) if width % h == 0]
    raise ValueError(
        f"the state dict does not determine the head count: without L2-normalised attention (no "
        f"blocks.0.attn.scale_mul_1H11) a width-{width} model has the same weights for num_heads in "
        f"{divisors}. Pass num_heads=... (the official presets use width / 64 = {width // 64 or '-'}), or "
        "give the preset's config (load_official(path, config=var.model.preset(...)))")
  if width % kw["num_heads"]:
    raise ValueError(f"num_heads={kw['num_heads']} does not divide the width {width} of the state dict")
  return VARConfig(**kw)


def load_official(path, config: VARConfig | None = None, **overrides) -> VAR:
  """Builds a VAR from an official `var_d*.pth` (or trainer `ar-ckpt-*.pth`) file; the config is inferred from the
  weights unless given. Raises one error listing every key problem."""
  from tokenizer.torch_pth import load_pth

  sd = unwrap_checkpoint(load_pth(path))
  config = config or config_from_state_dict(sd, **overrides)
  return load_state_dict(abstract(config), sd)  # abstract build: no random init is paid
