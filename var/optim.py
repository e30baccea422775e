"""The optimizer and schedules every stage trains with: VAR.md section 3 (AdamW 0.9 / 0.95 with the official
no-decay set, lr = tblr * batch / 256, warmup then `lin0`-style decay, cosine weight-decay schedule, clip 2.0)."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

# ------------------------------------------------------------------------------------------------------------
# Schedules (VAR utils/lr_control.py `lr_wd_annealing`, as pure functions of the 0-based iteration)
# ------------------------------------------------------------------------------------------------------------


def lr_factor(step, *, schedule: str, warmup_steps: int, total_steps: int, warmup_start: float = 0.005,
              end_ratio: float = 0.01):
  """Learning rate as a fraction of the peak at iteration `step` (official `lr_wd_annealing`).

  Warmup: linear from `warmup_start` (wp0) at step 0 towards 1 at `warmup_steps`. Afterwards, with
  p = (step - warmup) / (total - 1 - warmup): `lin0` keeps 1 for p < 0.05 then goes linearly to `end_ratio`
  (wpe) at p = 1; `lin` the same with a 0.15 plateau; `lin00` linear from 1; `cos` cosine to wpe; `exp`
  exponential after a 0.15 plateau; `linX` a linear ramp to a mid value over the first X then linear to wpe.
  Works on Python numbers and on traced jax scalars.
  """
  step = jnp.asarray(step, jnp.float32)
  wp, wpe = float(round(warmup_steps)), float(end_ratio)
  warm = warmup_start + (1 - warmup_start) * step / max(wp, 1.0)
  p = (step - wp) / max(total_steps - 1 - wp, 1.0)
  rest = 1 - p
  if schedule == "cos":
    after = wpe + (1 - wpe) * (0.5 + 0.5 * jnp.cos(jnp.pi * p))
  elif schedule in ("lin", "lin0"):
    t = 0.15 if schedule == "lin" else 0.05
    after = jnp.where(p < t, 1.0, wpe + (1 - wpe) * rest / (1 - t))
  elif schedule == "lin00":
    after = wpe + (1 - wpe) * rest
  elif schedule == "exp":
    t = 0.15
    after = jnp.where(p < t, 1.0, jnp.exp((p - t) / (1 - t) * math.log(wpe)))
  elif schedule.startswith("lin"):
    t = float(schedule[3:])
    mid = (1 + wpe + (1 - wpe) * (1 - t)) / 2
    after = jnp.where(p < t, 1 + (mid - 1) * p / t, wpe + (mid - wpe) * rest / (1 - t))
  else:
    raise ValueError(f"Unknown lr schedule {schedule!r}; use lin0, lin, lin00, linX (e.g. lin0.1), cos, exp")
  return jnp.where(step < wp, warm, after)


def weight_decay_at(step, *, weight_decay: float, weight_decay_end: float, total_steps: int):
  """Official weight-decay schedule: cosine from `weight_decay` (twd) at step 0 to `weight_decay_end` (twde).
  """
  p = jnp.asarray(step, jnp.float32) / max(total_steps - 1, 1)
  return weight_decay_end + (weight_decay - weight_decay_end) * (0.5 + 0.5 * jnp.cos(jnp.pi * p))


def peak_lr(optim: ml_collections.ConfigDict, global_batch: int) -> float:
  """Official lr scaling: peak = tblr * global_batch / 256."""
  return optim.tblr * global_batch / 256


# ------------------------------------------------------------------------------------------------------------
# Optimizer
# ------------------------------------------------------------------------------------------------------------

# Official no-weight-decay keywords (VAR utils/lr_control.py `filter_params`), matched against parameter
# paths.
NO_DECAY_KEYWORDS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC",
                     "pos_start", "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias",
                     "scale_mul")


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


def _logical_names(var: nnx.Variable) -> tuple:
  meta = var.get_metadata()
  names = meta.get("out_sharding", meta.get("sharding", None))
  return tuple(names) if names else ()


def decay_mask(params: nnx.State) -> nnx.State:
  """True where AdamW weight decay applies, by the official rule: no decay for 1-D params, names ending in
  `bias`, and names containing a NO_DECAY_KEYWORDS entry. Stacked layers (logical axis "layers") do not count
  as a dimension, so a scanned block's (depth, C) bias is still "1-D"."""

  def decays(path, var):
    name = _path_str(path)
    value = var.get_value() if isinstance(var, nnx.Variable) else var  # also works on abstract states
    ndim = len(value.shape) - (_logical_names(var).count("layers") if isinstance(var, nnx.Variable) else 0)
    if ndim <= 1 or name.endswith("bias") or any(k in name for k in NO_DECAY_KEYWORDS):
      return False
    return True

  return jax.tree_util.tree_map_with_path(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _path_lookup_mask(table: dict[str, bool]) -> Callable:
  """An optax mask callable that works on both Variable trees (init) and pure-array trees (update)."""

  def mask(tree):
    return jax.tree_util.tree_map_with_path(lambda p, _: table[_path_str(p)], tree,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable))

  return mask


def make_optimizer(optim: ml_collections.ConfigDict, params: nnx.State, *, global_batch: int,
                   total_steps: int,
                   frozen: Callable[[str], bool] | None = None) -> optax.GradientTransformation:
  """AdamW with the official recipe: clip(2.0) -> Adam(b1, b2, eps) -> decoupled weight decay on the decay set
  with the cosine wd schedule -> lr schedule scaled to tblr * batch / 256.

  `params` is the nnx.State of the trainable parameters (Variables, for their paths and logical names).
  `frozen(path)` marks parameters that get no optimizer update at all (e.g. an EMA-updated codebook).
  """
  table = {_path_str(p): bool(v) for p, v in jax.tree_util.tree_leaves_with_path(
      decay_mask(params), is_leaf=lambda x: isinstance(x, bool))}
  peak = peak_lr(optim, global_batch)
  kw = dict(schedule=optim.schedule, warmup_steps=optim.warmup_steps, total_steps=total_steps,
            warmup_start=optim.warmup_start, end_ratio=optim.end_ratio)
  lr = lambda count: peak * lr_factor(count, **kw)
  wd = lambda count: weight_decay_at(count, weight_decay=optim.weight_decay,
                                     weight_decay_end=optim.weight_decay_end, total_steps=total_steps)
  parts = []
  if optim.grad_clip and optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts += [optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
            optax.add_decayed_weights(wd, mask=_path_lookup_mask(table)),
            optax.scale_by_learning_rate(lr)]
  tx = optax.chain(*parts)
  if frozen is not None:
    trainable = {k: not frozen(k) for k in table}
    if not all(trainable.values()):
      tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                 lambda tree: jax.tree_util.tree_map_with_path(
                                     lambda p, _: "train" if trainable[_path_str(p)] else "frozen", tree,
                                     is_leaf=lambda x: isinstance(x, nnx.Variable)))
  return tx

