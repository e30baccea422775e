"""ScaleKV (specs/ACCELERATION.md section 2): scale-aware KV-cache compression with drafter and refiner layers.

Three parts:
* the online selection as pure, jit-friendly functions (`window_positions`, `select_kv`): after a scale's attention
  every layer keeps `cap` of its cached tokens per (row, head): a fixed observation window, plus the tokens the
  window's queries attend to most (pooled scores, `lax.top_k`). Every shape is static: capacities, window positions
  and kernel sizes are Python ints / numpy arrays known at trace time;
* the budgets: `parse_budget`, `uniform_capacities` (every layer keeps the same number of tokens), and the budget
  JSON (`save_budgets`, `load_budgets`);
* the offline calibration the official repository never shipped (`calibrate`, and the CLI
  `python -m var.kvcompress calibrate ...`), which picks the drafters by their attention selectivity (ASI) and
  gives them a larger share of the same total.

Indexing conventions
--------------------
Scales are 0-based (`si`). `cum[si]` below is the number of tokens of scales 0..si (inclusive), i.e. the cache
length after scale si's attention: (1, 5, 14, 30, 55, 91, 155, 255, 424, 680) for the 256px schedule. A capacity
"after scale si" is the number of cached tokens each layer keeps after scale si's attention, i.e. what scale si + 1
reads as its history. Compression happens after scale si when si < S - 1 (never after the last scale: nothing reads
that cache) and cum[si] exceeds the budget (otherwise the whole cache already fits).

Budget JSON (format "var-jax-scalekv-budgets", version 1)
--------------------------------------------------------
::

  {"format": "var-jax-scalekv-budgets", "version": 1,
   "depth": 16, "patch_nums": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16], "window": 16,
   "budget": {"spec": "10%", "tokens": 43},      # the uniform budget this allocation has the same total as
   "capacities": {"4": [c_0, ..., c_{depth-1}], ..., "8": [...]},   # 0-based si -> per-layer capacity after si
   "drafters": {"4": [0, 11], ...},              # si -> the drafter layers of that compression step
   "asi": {"1": [...], ..., "9": [...]},         # 0-based scale k >= 1 -> per-layer ASI (also "current_ratio",
   "z": {...}, "current_ratio": {...}, "history_topk": {...}, "history_mass": {...},   # "z", ... likewise)
   "options": {"k_prime": 32, "asi": "product", "delta": 4.6, "drafter_fraction": 0.0625, ...}}

`save_budgets` / `load_budgets` only require format, version, depth, patch_nums and capacities; the other keys are
what `calibrate` records (`meta`). Capacities are validated on load: one int per layer, each in
[WINDOW_SIZE, cum[si]], keys si in 0..S-2.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

WINDOW_SIZE = 16
FORMAT = "var-jax-scalekv-budgets"
VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# Online selection

def window_positions(h: int, w: int, held: int, size: int = WINDOW_SIZE) -> tuple[np.ndarray, np.ndarray]:
  """Observation window of a scale whose h x w map follows `held` cached tokens in a layer's cache.

  Returns (positions, query_rows), both int32 numpy:
  * positions (W,): indices into the layer's concatenated cache [held cached ; h*w current] (length
    T = held + h*w) that are always kept;
  * query_rows (Wq,): indices into the current map (0..h*w-1) whose queries score the keys.

  For min(h, w) >= 4 (and the default size 16): the centres of a 4 x 4 grid of (h//4, w//4) patches, row
  i*(h//4) + (h//4-1)//2 and column j*(w//4) + (w//4-1)//2 (spec 2.4 step 1; any aspect ratio). Otherwise the
  spec's fallback: the last `size` tokens of the cache (all of them when T < size).

  The queries are always those of the window tokens that lie in the current map (positions >= held, shifted by
  -held): for the grid that is the 16 centroids; for the fallback the last min(size, h*w) tokens of the map (the
  whole map when it is smaller than the window, since cached tokens of earlier scales have no query here).
  """
  n = h * w
  side = math.isqrt(size)
  if side * side == size and min(h, w) >= side:
    ph, pw = h // side, w // side
    rows = np.arange(side) * ph + (ph - 1) // 2
    cols = np.arange(side) * pw + (pw - 1) // 2
    query_rows = (rows[:, None] * w + cols[None, :]).reshape(-1)
    positions = held + query_rows
  else:
    t = held + n
    positions = np.arange(max(t - size, 0), t)
    query_rows = positions[positions >= held] - held
  return positions.astype(np.int32), query_rows.astype(np.int32)


def _pool(score: jax.Array, pooling: str, kernel: int) -> jax.Array:
  """1-D pooling along the last axis, stride 1, `kernel // 2` padding on both sides (same length out).

  'avg' pads with zeros and divides by the kernel (torch avg_pool1d, count_include_pad); 'max' pads with -inf
  (torch max_pool1d)."""
  pad = [(0, 0)] * (score.ndim - 1) + [(kernel // 2, kernel // 2)]
  dims, ones = (1,) * (score.ndim - 1) + (kernel,), (1,) * score.ndim
  if pooling == "avg":
    return jax.lax.reduce_window(score, 0.0, jax.lax.add, dims, ones, pad) / kernel
  return jax.lax.reduce_window(score, -jnp.inf, jax.lax.max, dims, ones, pad)


def select_kv(q, k, v, cap: int, positions: np.ndarray, query_rows: np.ndarray, *, logit_scale: float,
              scorer: str = "paper", pooling: str = "avg", kernel: int = 5, q_raw=None):
  """Keeps `cap` tokens of a layer's cache per (row, head): the window positions always, plus the top cap - W
  by the pooled score of the window queries.

  q (R, n, H, hd): this scale's queries as attention used them; q_raw (R, n, H, hd) (= x W_q) is needed by scorer
  'reference'; k, v (R, T, H, hd): the layer's whole cache after this scale's attention ([held ; current]).
  positions / query_rows: from `window_positions` (static numpy).

  scorer 'paper': s_j = sum over window queries i of softmax_j(q_i.k_j * logit_scale) over all T keys.
  scorer 'reference' (the official ScaleKV code): raw logits q_raw_i.k_j / sqrt(hd) summed over the window
    queries, window columns set to -inf before pooling (with 'avg' pooling that also sinks their kernel
    neighbours, as torch would).
  pooling 'avg' (zero padding counted, like torch avg_pool1d) | 'max' (-inf padding), stride 1, odd kernel.

  Returns (k_kept, v_kept, idx): (R, cap, H, hd) each, in ascending position order, with k/v's dtype; idx
  (R, cap, H) int32 positions. Each row and each head selects independently. Scores are float32 whatever the cache
  dtype. cap == T returns the cache unchanged (idx = arange)."""
  r, t, heads, hd = k.shape
  positions = np.asarray(positions, np.int32)
  query_rows = np.asarray(query_rows, np.int32)
  nw = positions.shape[0]
  if not nw <= cap <= t:
    raise ValueError(f"capacity {cap} must be in [window {nw}, cache length {t}]; lower the capacity below the "
                     "cache length or raise it to at least the window size")
  if scorer not in ("paper", "reference"):
    raise ValueError(f"scorer {scorer!r} must be 'paper' or 'reference'")
  if pooling not in ("avg", "max"):
    raise ValueError(f"pooling {pooling!r} must be 'avg' or 'max'")
  if kernel < 1 or kernel % 2 == 0:
    raise ValueError(f"kernel {kernel} must be an odd positive int (same-length pooling), e.g. 5")
  if positions.size and (positions.min() < 0 or positions.max() >= t or len(set(positions.tolist())) != nw):
    raise ValueError(f"window positions {positions.tolist()} must be distinct indices into the cache of {t}")
  if cap == t:
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :, None], (r, t, heads))
    return k, v, idx

  k32 = k.astype(jnp.float32)
  if scorer == "paper":
    qw = q[:, query_rows].astype(jnp.float32)  # (R, Wq, H, hd)
    logits = jnp.einsum("rqhd,rthd->rhqt", qw, k32) * logit_scale
    score = jax.nn.softmax(logits, axis=-1).sum(axis=2)  # (R, H, T)
  else:
    if q_raw is None:
      raise ValueError("scorer 'reference' scores with the raw queries: pass q_raw (the probe's q_raw)")
    qw = q_raw[:, query_rows].astype(jnp.float32)
    score = jnp.einsum("rqhd,rthd->rht", qw, k32) / math.sqrt(hd)  # summed over the window queries
    window = np.zeros(t, bool)
    window[positions] = True
    score = jnp.where(window, -jnp.inf, score)
  score = _pool(score, pooling, kernel)  # (R, H, T)

  # The window is added back explicitly, so it never competes; non-window -inf scores (only possible with
  # 'reference' + 'avg') become the lowest finite value so that top_k can never pick a window position twice.
  is_window = np.zeros(t, bool)
  is_window[positions] = True
  score = jnp.where(score == -jnp.inf, jnp.finfo(jnp.float32).min, score)
  score = jnp.where(is_window, -jnp.inf, score)
  _, top = jax.lax.top_k(score, cap - nw)  # (R, H, cap - W)
  win = jnp.broadcast_to(jnp.asarray(positions), (r, heads, nw))
  idx = jnp.sort(jnp.concatenate([win, top.astype(jnp.int32)], axis=-1), axis=-1)  # (R, H, cap)
  idx = jnp.transpose(idx, (0, 2, 1))  # (R, cap, H)
  k_kept = jnp.take_along_axis(k, idx[..., None], axis=1)
  v_kept = jnp.take_along_axis(v, idx[..., None], axis=1)
  return k_kept, v_kept, idx


# ----------------------------------------------------------------------------------------------------------------
# Budgets

@dataclasses.dataclass(frozen=True)
class Budget:
  """A parsed budget: exactly one of `fraction` (of the longest re-read prefix), `tokens` or `path` (a budget
  JSON) is set; `spec` is what the user wrote."""
  spec: str
  fraction: float | None = None
  tokens: int | None = None
  path: str | None = None


def parse_budget(budget) -> Budget:
  """"10%" / "4%" / 0.1 (a fraction in (0, 1]) / 43 or "43" (a token count) / a path to a budget JSON -> Budget.

  Raises ValueError naming the bad value for anything else (<= 0, a percentage above 100, a non-integral count,
  a malformed string)."""
  spec = str(budget)
  if isinstance(budget, Budget):
    return budget
  if isinstance(budget, bool) or not isinstance(budget, (int, float, str, os.PathLike, np.integer, np.floating)):
    raise ValueError(f"budget {budget!r} must be a percentage like '10%', a fraction like 0.1, a token count like 43 "
                     "or a path to a budget JSON")
  if isinstance(budget, os.PathLike) or (isinstance(budget, str) and (budget.endswith(".json")
                                                                       or os.path.isfile(budget))):
    return Budget(spec, path=os.fspath(budget))
  if isinstance(budget, (int, np.integer)):
    value, is_count = int(budget), True
  elif isinstance(budget, (float, np.floating)):
    value, is_count = float(budget), False
  else:
    text = budget.strip()
    try:
      if text.endswith("%"):
        value, is_count = float(text[:-1]) / 100, False
      elif text.lstrip("+-").isdigit():
        value, is_count = int(text), True
      else:
        value, is_count = float(text), False
    except ValueError:
      raise ValueError(f"budget {budget!r} is malformed: write a percentage like '10%', a fraction like 0.1, a token "
                       "count like 43 or a path to an existing budget JSON") from None
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"budget {budget!r} must be > 0 (e.g. '10%' or 43 tokens)")
  if is_count:
    return Budget(spec, tokens=value)
  if value > 1:
    raise ValueError(f"budget {budget!r} is more than 100% of the cache; use a fraction in (0, 1] or a percentage "
                     "up to 100%, or an int for a token count")
  return Budget(spec, fraction=value)


def cumulative_lengths(patch_nums: Sequence[int]) -> tuple[int, ...]:
  """cum[si] = tokens of scales 0..si (the cache length after scale si)."""
  return tuple(int(c) for c in np.cumsum([p * p for p in patch_nums]))


def budget_tokens(patch_nums: Sequence[int], budget) -> int:
  """The uniform per-layer token budget. A percentage is of the longest prefix that is ever re-read (cum[S-2]:
  424 for the 256px schedule), rounded UP: the smallest count that is at least that share. (Infinity's released
  budgets round the same way: 650 >= 10% of 6425 = 642.5; see spec 2.3.) So 4% / 10% / 20% of 424 are 17 / 43 / 85.

  Raises ValueError for a budget below the window size or above the full re-read prefix."""
  b = parse_budget(budget)
  if b.path is not None:
    raise ValueError(f"budget {b.spec!r} is a budget file; load it with load_budgets (or resolve_capacities)")
  cum = cumulative_lengths(patch_nums)
  if len(cum) < 2:
    raise ValueError(f"patch_nums {tuple(patch_nums)} has a single scale: nothing is ever re-read from the cache")
  full = cum[-2]
  # 1e-9: 0.1 * 430 is 43.000000000000004 in floats, which must not round up to 44
  tokens = b.tokens if b.tokens is not None else math.ceil(b.fraction * full - 1e-9)
  if tokens < WINDOW_SIZE:
    raise ValueError(f"budget {b.spec!r} = {tokens} tokens is below the observation window of {WINDOW_SIZE} tokens; "
                     f"use at least {WINDOW_SIZE} tokens ({100 * WINDOW_SIZE / full:.1f}% of the {full}-token prefix)")
  if tokens > full:
    raise ValueError(f"budget {b.spec!r} = {tokens} tokens exceeds the full cache of {full} tokens (the longest "
                     f"prefix ever re-read); use at most {full} tokens or 100%")
  return tokens


def compressed_scales(patch_nums: Sequence[int], tokens: int) -> tuple[int, ...]:
  """The scales si after which a `tokens` budget compresses: si < S - 1 with cum[si] > tokens."""
  cum = cumulative_lengths(patch_nums)
  return tuple(si for si in range(len(cum) - 1) if cum[si] > tokens)


def uniform_capacities(patch_nums: Sequence[int], depth: int, budget) -> dict[int, tuple[int, ...]]:
  """Per-layer capacities AFTER scale si, for every si < S-1 whose cache (cum[si] tokens) exceeds the budget:
  every layer keeps the budget (`budget_tokens`). No compression after the last scale, nor where the cache already
  fits. E.g. the 256px schedule at 10%: 43 tokens after si = 4..8."""
  tokens = budget_tokens(patch_nums, budget)
  return {si: (tokens,) * depth for si in compressed_scales(patch_nums, tokens)}
