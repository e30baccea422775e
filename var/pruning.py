"""FastVAR: cached token pruning at the large scales (spec ACCELERATION.md section 3), for VAR.

At a pruned scale, every pruned layer runs each sub-layer (attention, then FFN) on the `keep` tokens of the
scale that deviate most from the map's mean ("pivotal token selection", PTS, recomputed before each sub-layer on
the residual stream), and gives the other tokens the same layer's branch output recorded at the last unpruned
scale, area-upsampled to the current map ("cached token restoration", CTR). Pruned layers append only the kept
tokens' keys/values to their KV cache, so later scales also attend over fewer keys.

What the plan holds (var/plan.py `PruneStep`): `keep` per scale, the pruned layer range [first, last) and the
cache scale, all static. The sampling loop (var/sampler.py) records the branch outputs at the cache scale and
calls `pruned_block` for the pruned layers. Schedules are keyed on the scale index (never on the map width, the
reference code's pitfall), ratios as the fraction of the scale's tokens pruned: ratio 0 keeps all, ratio 1 skips
the scale (no transformer, no tokens drawn; only trailing scales).

Differences from the paper (Infinity / HART code): VAR has absolute positional embeddings added at the input, so
there are no per-layer positions to gather; there is no cross-attention sub-layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from tokenizer.resample import area_resize

# Default schedules by patch_nums, chosen with benchmarks/bench_techniques.py (README, "FastVAR"): prune ratio
# per scale index, the pruned layer range as fractions of the depth, and the cache scale.
DEFAULT_SCHEDULES = {
  (1, 2, 3, 4, 5, 6, 8, 10, 13, 16): dict(ratios={8: 0.5, 9: 0.75}, layers=(0.0, 1.0), cache_scale=7),
  (1, 2, 3, 4, 6, 9, 13, 18, 24, 32): dict(ratios={8: 0.5, 9: 0.75}, layers=(0.0, 1.0), cache_scale=7),
}


def keep_count(num_tokens: int, ratio: float) -> int:
  """Tokens forwarded at a scale of `num_tokens` with prune ratio `ratio` (the reference's T - floor(T ratio))."""
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"prune ratio {ratio} must be in [0, 1] (0 keeps every token, 1 skips the scale)")
  return num_tokens - math.floor(num_tokens * ratio)


def default_schedule(patch_nums: Sequence[int], depth: int) -> dict:
  """The default FastVAR schedule for a scale schedule: {'ratios': {si: ratio}, 'layers': (first, last),
  'cache_scale': si}. Schedules without a measured default prune the last two scales by 50% / 75% in every
  layer, restoring from the scale before them (HART's published setting, the milder of the two papers)."""
  patch_nums = tuple(int(p) for p in patch_nums)
  s = len(patch_nums)
  if s < 4:
    raise ValueError(f"patch_nums {patch_nums}: FastVAR needs at least 4 scales (a cache scale > 0 and two pruned "
                     "scales after it); give explicit --prune ratios")
  sched = DEFAULT_SCHEDULES.get(patch_nums, dict(ratios={s - 2: 0.5, s - 1: 0.75}, layers=(0.0, 1.0),
                                                 cache_scale=s - 3))
  lo, hi = sched["layers"]
  return dict(ratios=dict(sched["ratios"]), layers=(round(lo * depth), round(hi * depth)),
              cache_scale=sched["cache_scale"])


def parse_prune(spec: str | Mapping[int, float] | None) -> dict[int, float]:
  """'SCALE:RATIO,SCALE:RATIO' (or a mapping) -> {scale index: ratio}; clear errors on malformed input."""
  if spec is None or spec == "":
    return {}
  if isinstance(spec, Mapping):
    items = list(spec.items())
  else:
    items = []
    for part in str(spec).split(","):
      if part.count(":") != 1:
        raise ValueError(f"--prune entry {part!r}: write SCALE:RATIO, e.g. 8:0.5,9:0.75")
      a, b = part.split(":")
      try:
        items.append((int(a), float(b)))
      except ValueError:
        raise ValueError(f"--prune entry {part!r}: SCALE must be an integer and RATIO a number in [0, 1]") from None
  out = {}
  for si, ratio in items:
    if not 0.0 <= float(ratio) <= 1.0:
      raise ValueError(f"prune ratio {ratio} at scale {si} is outside [0, 1] (0 keeps every token, 1 skips the "
                       "scale)")
    out[int(si)] = float(ratio)
  return out


def parse_layers(spec: str | tuple[int, int] | None, depth: int) -> tuple[int, int]:
  """'A:B' (or a pair) -> (A, B), the pruned layer range [A, B); None = every layer."""
  if spec is None or spec == "":
    return 0, depth
  if isinstance(spec, str):
    parts = spec.split(":")
    try:
      a, b = (int(p) for p in parts)
    except ValueError:
      raise ValueError(f"--prune_layers {spec!r}: write A:B (layers A..B-1), e.g. 2:14") from None
  else:
    a, b = spec
  if not 0 <= a < b <= depth:
    raise ValueError(f"pruned layers {a}:{b} are outside the {depth}-layer model; use A:B with 0 <= A < B <= "
                     f"{depth}")
  return a, b


# ----------------------------------------------------------------------------------------------------------------
# The data-dependent part, called by the sampling loop inside its layer scan

def pivotal_indices(x: jax.Array, keep: int) -> jax.Array:
  """PTS: x (R, n, C) residual stream -> (R, keep) int32 indices of the tokens with the largest squared
  deviation from the map's mean (per row), in decreasing score order."""
  x32 = x.astype(jnp.float32)
  score = jnp.square(x32 - x32.mean(axis=1, keepdims=True)).sum(-1)  # (R, n)
  return jax.lax.top_k(score, keep)[1].astype(jnp.int32)


def upsample_branch(branch: jax.Array, side: int) -> jax.Array:
  """CTR: a branch output recorded at the cache scale, (R, n*, C) with n* = side*^2, area-upsampled (torch
  `F.interpolate(mode='area')`) to (R, side^2, C)."""
  r, n_src, c = branch.shape
  src = math.isqrt(n_src)
  up = area_resize(branch.reshape(r, src, src, c).astype(jnp.float32), side)
  return up.reshape(r, side * side, c).astype(branch.dtype)


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
  return jnp.take_along_axis(x, idx[..., None], axis=1)


def _scatter(full: jax.Array, idx: jax.Array, values: jax.Array) -> jax.Array:
  return jax.vmap(lambda f, i, v: f.at[i].set(v))(full, idx, values.astype(full.dtype))


def pruned_block(block, x: jax.Array, mod: jax.Array, keep: int, restore_attn: jax.Array,
                 restore_ffn: jax.Array, *, kv_fn=None, probe=None) -> jax.Array:
  """One AdaLN block with FastVAR pruning. x (R, n, C) residual stream; mod (R, 1, 6, C) the block modulation;
  restore_attn / restore_ffn (R, n, C) the recorded branch outputs upsampled to this scale. The attention runs on
  the `keep` pivotal tokens (their keys/values go through kv_fn, i.e. into the cache), the FFN on the `keep`
  pivotal tokens of the updated stream; every other token gets the restored branch output."""
  idx = pivotal_indices(x, keep)
  out = block.attn_branch(_gather(x, idx), mod, kv_fn=kv_fn, probe=probe)
  x = x + _scatter(restore_attn, idx, out)
  idx = pivotal_indices(x, keep)
  out = block.ffn_branch(_gather(x, idx), mod)
  return x + _scatter(restore_ffn, idx, out)
