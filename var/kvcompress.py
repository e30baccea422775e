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

Calibration defaults
--------------------
* delta (refiner decay per compressed scale) = 70 * cum[S-2] / 6425 tokens (4.6 for the 256px schedule): the
  paper swept delta from 0 to 70 for Infinity's 6425-token re-read prefix and FID improved monotonically up to 70;
  budgets scale with the prefix, so the same relative decay is used.
* drafter_fraction = 1/16 of the (layer, compressed scale) pairs: Infinity-2B's released 10% table has 2 of 32
  layers as drafters (9 of 160 pairs, 5.6%), Infinity-8B 3 of 40 (7.5%).
* k_prime = 32 (the spec's suggestion; the paper gives no value); asi = "product".
* calibration samples: 10 classes spread over the label range, one sample each (the paper used 10 prompts and saw
  the same FID with 1 to 128), sampled with the official FID setting (cfg 1.5, top_k 900, top_p 0.96); both the
  conditional and the unconditional rows are measured, since the sampler compresses both.

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

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
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
  if query_rows.size and (query_rows.min() < 0 or query_rows.max() >= q.shape[1]):
    raise ValueError(f"query rows {query_rows.tolist()} must index this scale's {q.shape[1]} queries")
  if cap == t:
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :, None], (r, t, heads))
    return k, v, idx

  is_window = np.zeros(t, bool)
  is_window[positions] = True
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
    score = jnp.where(is_window, -jnp.inf, score)
  score = _pool(score, pooling, kernel)  # (R, H, T)

  # The window is added back explicitly, so it never competes; non-window -inf scores (only possible with
  # 'reference' + 'avg') become the lowest finite value so that top_k can never pick a window position twice.
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
  # 1e-9: 0.07 * 100 is 7.000000000000001 in floats, which must not round up to 8
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


def resolve_capacities(budget, patch_nums: Sequence[int], depth: int) -> dict[int, tuple[int, ...]]:
  """A budget JSON path -> its (validated) capacities; any other budget -> `uniform_capacities`."""
  b = parse_budget(budget)
  if b.path is not None:
    return load_budgets(b.path, depth, patch_nums)
  return uniform_capacities(patch_nums, depth, b)


def apply_capacities(plan, capacities: dict[int, tuple[int, ...]]):
  """A copy of a var.plan.ScalePlan with `kv_capacity` set at every compressed scale (the sampler also needs a
  SamplerHooks.compress_kv)."""
  for si, caps in sorted(capacities.items()):
    plan = plan.replace(si, kv_capacity=tuple(int(c) for c in caps))
  return plan


# ----------------------------------------------------------------------------------------------------------------
# The budget JSON

def _check_capacities(capacities, depth: int, patch_nums: Sequence[int], where: str) -> dict[int, tuple[int, ...]]:
  cum = cumulative_lengths(patch_nums)
  out = {}
  for key, caps in capacities.items():
    try:
      si = int(key)
    except (TypeError, ValueError):
      raise ValueError(f"{where}: capacity key {key!r} is not a scale index; keys are 0-based si as strings") from None
    if not 0 <= si < len(cum) - 1:
      raise ValueError(f"{where}: scale {si} out of range; capacities apply after scales 0..{len(cum) - 2} "
                       "(never after the last)")
    if not isinstance(caps, (list, tuple)) or len(caps) != depth:
      raise ValueError(f"{where}: scale {si} needs one capacity per layer ({depth}), got {caps!r}")
    bad = [c for c in caps if isinstance(c, bool) or not isinstance(c, (int, np.integer))
           or not WINDOW_SIZE <= c <= cum[si]]
    if bad:
      raise ValueError(f"{where}: scale {si} capacities {bad} must be ints in [window {WINDOW_SIZE}, cache length "
                       f"{cum[si]}]")
    out[si] = tuple(int(c) for c in caps)
  return dict(sorted(out.items()))


def budget_record(capacities, *, depth: int, patch_nums: Sequence[int], meta: dict | None = None) -> dict:
  """The JSON-ready budget record (module docstring): the required keys plus everything in `meta`."""
  caps = _check_capacities(capacities, depth, patch_nums, "capacities")
  record = {"format": FORMAT, "version": VERSION, "depth": int(depth), "patch_nums": [int(p) for p in patch_nums],
            "window": WINDOW_SIZE}
  reserved = set(record) | {"capacities"}
  clash = sorted(reserved & set(meta or {}))
  if clash:
    raise ValueError(f"meta keys {clash} are reserved by the budget format; rename them")
  record.update(meta or {})
  record["capacities"] = {str(si): list(c) for si, c in caps.items()}
  return record


def save_budgets(path, capacities, *, depth: int, patch_nums: Sequence[int], meta: dict) -> None:
  """Writes the budget JSON atomically (a temporary sibling renamed onto `path`)."""
  record = budget_record(capacities, depth=depth, patch_nums=patch_nums, meta=meta)
  path = os.path.abspath(os.fspath(path))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(record, f, indent=1)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_budgets(path) -> dict:
  """The parsed budget JSON (format and version checked), without model checks."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"budget file {path} does not exist; write one with python -m var.kvcompress calibrate")
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot parse the budget file {path}: {e}") from e
  if not isinstance(record, dict) or record.get("format") != FORMAT:
    raise ValueError(f"{path} is not a {FORMAT} file")
  if record.get("version") != VERSION:
    raise ValueError(f"{path} has version {record.get('version')!r}; this code reads version {VERSION}")
  return record


def load_budgets(path, depth: int, patch_nums: Sequence[int]) -> dict[int, tuple[int, ...]]:
  """Per-layer capacities after each compressed scale from a budget JSON, validated against the model: same depth,
  same patch_nums, every capacity an int in [window, cum[si]]."""
  record = read_budgets(path)
  if record.get("depth") != depth:
    raise ValueError(f"{path} is for a {record.get('depth')}-layer model, not this {depth}-layer one; calibrate "
                     "budgets for this model")
  if list(record.get("patch_nums") or []) != [int(p) for p in patch_nums]:
    raise ValueError(f"{path} is for patch_nums {record.get('patch_nums')}, not {list(patch_nums)}; calibrate "
                     "budgets for this schedule")
  if not isinstance(record.get("capacities"), dict):
    raise ValueError(f"{path} has no 'capacities' mapping")
  return _check_capacities(record["capacities"], depth, patch_nums, str(path))


# ----------------------------------------------------------------------------------------------------------------
# Budget allocation (spec 2.3)

def _water_fill(offsets: np.ndarray, lo: np.ndarray, hi: np.ndarray, target: int) -> np.ndarray:
  """Integers c_i in [lo_i, hi_i] summing to `target`, c_i ~ clip(x - offset_i, lo_i, hi_i) for one level x.

  The level is found by bisection (the sum is monotone in x); the integer remainder goes one token at a time to
  the entries with the largest fractional parts (ties: the first entries), skipping those at their bound. What a
  clamped entry cannot take is spread over the others by the common level (the excess redistribution)."""
  offsets, lo, hi = (np.asarray(a, np.float64) for a in (offsets, lo, hi))
  if not lo.sum() <= target <= hi.sum():
    raise ValueError(f"cannot allocate {target} tokens within the bounds [{lo.sum():.0f}, {hi.sum():.0f}]")
  a, b = float((lo + offsets).min()), float((hi + offsets).max())
  for _ in range(200):
    x = (a + b) / 2
    if np.clip(x - offsets, lo, hi).sum() < target:
      a = x
    else:
      b = x
  vals = np.clip(b - offsets, lo, hi)
  out = np.clip(np.floor(vals + 1e-9), lo, hi).astype(np.int64)
  frac = vals - out
  order = np.argsort(-frac, kind="stable")
  while out.sum() != target:
    step = 1 if out.sum() < target else -1
    for i in (order if step > 0 else order[::-1]):
      if out.sum() == target:
        break
      if lo[i] <= out[i] + step <= hi[i]:
        out[i] += step
  return out


def allocate(patch_nums: Sequence[int], depth: int, tokens: int, drafters: dict[int, Sequence[int]], *,
             delta: float) -> dict[int, tuple[int, ...]]:
  """Drafter / refiner capacities with the uniform total (spec 2.3).

  For every compressed scale si (`compressed_scales`, counted k = 0, 1, ...): the layers in drafters[si] keep their
  whole cache (cum[si]); the refiners get B_r(k) = B_r(0) - delta * k with B_r(0) solved so that the sum over all
  (layer, compressed scale) equals tokens * depth * (number of compressed scales) exactly. Every capacity stays in
  [WINDOW_SIZE, cum[si]]. When the drafters' whole caches do not fit beside refiners at the window size, the
  refiners get the window and the drafters share the rest (one common level, clamped the same way)."""
  cum = cumulative_lengths(patch_nums)
  scales = compressed_scales(patch_nums, tokens)
  if not scales:
    return {}
  total = tokens * depth * len(scales)
  pairs = [(si, layer, k) for k, si in enumerate(scales) for layer in range(depth)]
  is_drafter = np.array([layer in set(drafters.get(si, ())) for si, layer, _ in pairs])
  full = np.array([cum[si] for si, _, _ in pairs], np.int64)
  decay = np.array([delta * k for _, _, k in pairs], np.float64)
  caps = np.zeros(len(pairs), np.int64)
  n_ref = int((~is_drafter).sum())
  if full[is_drafter].sum() + WINDOW_SIZE * n_ref <= total:
    caps[is_drafter] = full[is_drafter]
    if n_ref:
      caps[~is_drafter] = _water_fill(decay[~is_drafter], np.full(n_ref, WINDOW_SIZE), full[~is_drafter],
                                      total - full[is_drafter].sum())
  else:  # the total cannot hold every drafter's whole cache
    caps[~is_drafter] = WINDOW_SIZE
    n_d = int(is_drafter.sum())
    caps[is_drafter] = _water_fill(np.zeros(n_d), np.full(n_d, WINDOW_SIZE), full[is_drafter],
                                   total - WINDOW_SIZE * n_ref)
  assert caps.sum() == total
  out = {si: [0] * depth for si in scales}
  for (si, layer, _), c in zip(pairs, caps, strict=True):
    out[si][layer] = int(c)
  return {si: tuple(c) for si, c in out.items()}


def default_delta(patch_nums: Sequence[int]) -> float:
  """The refiner decay per compressed scale: the paper's best delta = 70 tokens for Infinity's 6425-token
  re-read prefix, scaled to this schedule's prefix (cum[S-2]): 4.62 tokens for the 256px schedule. The budgets
  scale with the prefix, so the same relative decay (1.1% of the prefix per scale) keeps the paper's shape."""
  return 70.0 * cumulative_lengths(patch_nums)[-2] / 6425


# Infinity-2B's released 10% table makes 2 of its 32 layers drafters (blocks 0 and 23; 1 at the last scale) and
# Infinity-8B 3 of 40: about 1/16 of the (layer, scale) pairs.
DEFAULT_DRAFTER_FRACTION = 1 / 16


def num_drafters(num_pairs: int, fraction: float) -> int:
  """round(fraction * pairs) (halves up), at least 1 where there is any compressed pair."""
  if not 0 <= fraction <= 1:
    raise ValueError(f"drafter_fraction {fraction} must be in [0, 1] (e.g. {DEFAULT_DRAFTER_FRACTION})")
  if num_pairs == 0:
    return 0
  return min(num_pairs, max(1, math.floor(fraction * num_pairs + 0.5)))


def pick_drafters(z: np.ndarray, scales: Sequence[int], fraction: float) -> dict[int, list[int]]:
  """The N_d (layer, si) pairs with the lowest Z globally. z (depth, S) is indexed by the scale whose queries were
  measured; the capacity after si is what scale si + 1 reads, so pair (l, si) is ranked by z[l, si + 1]. Ties go to
  the earlier scale, then the lower layer."""
  depth = z.shape[0]
  pairs = [(float(z[layer, si + 1]), si, layer) for si in scales for layer in range(depth)]
  chosen = sorted(pairs)[:num_drafters(len(pairs), fraction)]
  out = {si: [] for si in scales}
  for _, si, layer in chosen:
    out[si].append(layer)
  return {si: sorted(layers) for si, layers in out.items()}


# ----------------------------------------------------------------------------------------------------------------
# Calibration (spec 2.2)

def attention_stats_fn(model, k_prime: int):
  """A jitted function (block-causal teacher-forced forward) labels (R,), x (R, L - first_l, Cvae) -> (depth, R,
  S, 3) float32: per layer, row and scale k the means over heads and current-map queries of [mass on the current
  map C_k, sum of the K' largest history weights, history mass] of the softmax attention over all keys (scale 0:
  zeros; it has no history). The blocks run one layer at a time (lax.scan) and the probe hands each layer's
  queries and keys to the statistics, so no attention map leaves the device. Peak memory: one layer's
  (R, H, n_last, L) float32 map (the batch size bounds it)."""
  from flax import nnx

  from var.model import block_causal_bias

  cfg = model.config
  bias = jnp.asarray(block_causal_bias(cfg.patch_nums))  # (L, L)
  begin_ends = cfg.begin_ends
  graphdef, state = nnx.split(model)

  def stats(q, k, scale):  # q, k (R, L, H, hd) -> (R, S, 3)
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    out = [jnp.zeros((q.shape[0], 3))]
    for beg, end in begin_ends[1:]:
      # block-causal: scale k's queries see exactly the keys [0, end); one (n, end) map per scale, never (L, L)
      logits = jnp.einsum("rqhd,rkhd->rhqk", q[:, beg:end], k[:, :end]) * scale
      rows = jax.nn.softmax(logits, axis=-1)  # (R, H, n, end)
      hist = rows[..., :beg]
      top = jax.lax.top_k(hist, min(k_prime, beg))[0].sum(-1)
      per_query = jnp.stack([rows[..., beg:end].sum(-1), top, hist.sum(-1)], -1)  # (R, H, n, 3)
      out.append(per_query.mean((1, 2)))
    return jnp.stack(out, 1)

  @jax.jit
  def run(state, labels, x_in):
    m = nnx.merge(graphdef, state)
    cond = m.condition(labels)
    x = m.embed_inputs(cond, x_in).astype(cfg.compute_dtype)
    block_cond = m.block_condition(cond)
    blocks_graphdef, blocks_state = nnx.split(m.blocks)

    def body(h, layer_state):
      block = nnx.merge(blocks_graphdef, layer_state)
      box = {}
      h = block(h, block_cond, attn_bias=bias, probe=lambda **kw: box.update(kw))
      return h, stats(box["q"], box["k"], box["logit_scale"])

    return jax.lax.scan(body, x, blocks_state)[1]

  return lambda labels, x_in: run(state, labels, x_in)


def asi_from_stats(current, history_topk, history_mass, asi: str = "product") -> np.ndarray:
  """ASI (spec 2.2) from the mean statistics: 'product' = current * history_topk; 'ratio' = current *
  history_topk / history_mass (the top-K' share of the history mass; the garbled formula read both ways)."""
  if asi == "product":
    return current * history_topk
  if asi == "ratio":
    return current * history_topk / np.maximum(history_mass, 1e-12)
  raise ValueError(f"asi {asi!r} must be 'product' or 'ratio'")


def z_normalise(asi: np.ndarray, eps: float = 1e-6) -> np.ndarray:
  """(depth, S) -> per-scale z-scores over the layers (population std)."""
  return (asi - asi.mean(0, keepdims=True)) / (asi.std(0, keepdims=True) + eps)


def calibrate(model, vae, labels, seeds, *, budget, k_prime: int = 32, asi: str = "product",
              delta: float | None = None, drafter_fraction: float = DEFAULT_DRAFTER_FRACTION, sampling=None,
              batch_size: int = 8, progress: bool = False, tokens=None) -> dict:
  """Calibrates drafter / refiner budgets (spec 2.2-2.3) -> the JSON-ready budget record (module docstring).

  1. Samples `labels` / `seeds` with the plain sampler (full cache); `sampling` is a var.sampler.SamplingConfig,
     default the official FID setting (cfg 1.5, top_k 900 capped at the vocabulary, top_p 0.96).
  2. Teacher-forces the sampled tokens through the block-causal forward, conditional rows and (when cfg != 0) the
     unconditional rows too, since the sampler compresses both; for every layer l and scale k >= 1:
     current_ratio, history_topK (K' = k_prime) and the history mass, means over rows, heads and queries.
  3. ASI (`asi_from_stats`), z-scores per scale, drafters = the lowest-Z pairs (`pick_drafters`), capacities by
     `allocate` with the uniform budget's total. delta None = `default_delta`.

  tokens (N, L) int, optional: token maps to use instead of sampling (e.g. real images' tokens); step 1 is then
  skipped (`sampling.cfg` still decides whether unconditional rows are measured)."""
  from var import sampler as sampler_lib

  cfg = model.config
  patch_nums = cfg.patch_nums
  budget_len = budget_tokens(patch_nums, budget)
  if k_prime < 1:
    raise ValueError(f"k_prime {k_prime} must be >= 1 (e.g. 32)")
  asi_from_stats(np.ones(1), np.ones(1), np.ones(1), asi)  # validates the flag before any work
  num_drafters(0, drafter_fraction)
  delta = default_delta(patch_nums) if delta is None else float(delta)
  if delta < 0:
    raise ValueError(f"delta {delta} must be >= 0 tokens per scale")
  labels = np.asarray(labels, np.int32).reshape(-1)
  seeds = np.asarray(seeds, np.uint32).reshape(-1)
  if labels.size == 0 or labels.shape != seeds.shape:
    raise ValueError(f"need one seed per label and at least one label, got {labels.size} labels, {seeds.size} seeds")
  if sampling is None:
    sampling = sampler_lib.SamplingConfig(cfg=1.5, top_k=min(900, cfg.vocab_size), top_p=0.96)
  if tokens is not None:
    tokens = np.asarray(tokens, np.int32)
    if tokens.shape != (labels.size, cfg.seq_len):
      raise ValueError(f"tokens {tokens.shape} must be (num labels, L) = {(labels.size, cfg.seq_len)}")

  sampler = sampler_lib.Sampler(model, vae, sampling) if tokens is None else None
  stats_fn = attention_stats_fn(model, k_prime)
  batch = min(batch_size, labels.size)
  starts = range(0, labels.size, batch)
  if progress:
    from tqdm import tqdm

    starts = tqdm(starts, desc="calibration", unit="batch")
  sums, rows = 0.0, 0
  for start in starts:
    lab, sd = labels[start:start + batch], seeds[start:start + batch]
    n = lab.shape[0]
    pad = batch - n
    if pad:  # one compiled shape: pad with the last sample, drop its statistics
      lab, sd = np.concatenate([lab, np.repeat(lab[-1:], pad)]), np.concatenate([sd, np.repeat(sd[-1:], pad)])
    if tokens is None:
      tok = sampler(lab, sd)["tokens"]
    else:
      tok = tokens[start:start + batch]
      tok = jnp.asarray(np.concatenate([tok, np.repeat(tok[-1:], pad, axis=0)]) if pad else tok)
    x_in = vae.idx_to_var_input(vae.split_tokens(tok))
    all_labels, x_all, keep = jnp.asarray(lab), x_in, np.arange(n)
    if sampling.cfg != 0:
      all_labels = jnp.concatenate([all_labels, jnp.full_like(all_labels, cfg.num_classes)])
      x_all = jnp.concatenate([x_in, x_in])
      keep = np.concatenate([keep, batch + keep])
    s = np.asarray(stats_fn(all_labels, x_all), np.float64)[:, keep]  # (depth, rows, S, 3)
    sums = sums + s.sum(1)
    rows += keep.size
  mean = sums / rows  # (depth, S, 3): every row has the same number of heads and queries per scale
  current, history_topk, history_mass = mean[..., 0], mean[..., 1], mean[..., 2]
  scores = asi_from_stats(current, history_topk, history_mass, asi)
  z = np.zeros_like(scores)
  z[:, 1:] = z_normalise(scores[:, 1:])
  scales = compressed_scales(patch_nums, budget_len)
  drafters = pick_drafters(z, scales, drafter_fraction)
  capacities = allocate(patch_nums, cfg.depth, budget_len, drafters, delta=delta)

  def per_scale(a):  # (depth, S) -> {"k": [per layer]} for k >= 1
    return {str(k): [float(v) for v in a[:, k]] for k in range(1, len(patch_nums))}

  meta = {
    "budget": {"spec": budget.spec if isinstance(budget, Budget) else str(budget), "tokens": budget_len},
    "drafters": {str(si): d for si, d in drafters.items()},
    "asi": per_scale(scores), "z": per_scale(z), "current_ratio": per_scale(current),
    "history_topk": per_scale(history_topk), "history_mass": per_scale(history_mass),
    "options": {"k_prime": k_prime, "asi": asi, "delta": delta, "drafter_fraction": drafter_fraction,
                "num_samples": int(labels.size), "cfg_rows": sampling.cfg != 0, "sampled": tokens is None,
                "sampling": dataclasses.asdict(sampling)},
  }
  return budget_record(capacities, depth=cfg.depth, patch_nums=patch_nums, meta=meta)


# ----------------------------------------------------------------------------------------------------------------
# CLI

def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m var.kvcompress", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  c = sub.add_parser("calibrate", help="calibrate drafter / refiner budgets for a model directory")
  c.add_argument("--checkpoint", required=True, help="model directory (var/pretrained.py)")
  c.add_argument("--budget", required=True, help="uniform budget: '10%%', a fraction like 0.1, or a token count")
  c.add_argument("--classes", default=None, help="comma-separated class ids (default: 10 spread over the classes)")
  c.add_argument("--num_per_class", type=int, default=1, help="calibration samples per class")
  c.add_argument("--k_prime", type=int, default=32, help="K' of the history top-K' attention sum")
  c.add_argument("--asi", default="product", choices=["product", "ratio"], help="ASI formula reading")
  c.add_argument("--delta", type=float, default=None, help="refiner decay per compressed scale in tokens "
                 "(default: 70 * prefix / 6425, the paper's best scaled to this schedule)")
  c.add_argument("--drafter_fraction", type=float, default=DEFAULT_DRAFTER_FRACTION,
                 help="share of the (layer, compressed scale) pairs that are drafters")
  c.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
  c.add_argument("--batch_size", type=int, default=8, help="samples per calibration batch")
  c.add_argument("--cfg", type=float, default=1.5, help="guidance scale of the calibration samples")
  c.add_argument("--top_k", type=int, default=900, help="top-k of the calibration samples (capped at the vocabulary)")
  c.add_argument("--top_p", type=float, default=0.96, help="top-p of the calibration samples")
  c.add_argument("--out", required=True, help="budget JSON to write")
  c.add_argument("--no_progress", action="store_true", help="no progress bar")
  return p


def _parse_classes(text: str | None, num_classes: int) -> list[int]:
  if text is None:
    return sorted({int(round(c)) for c in np.linspace(0, num_classes - 1, min(10, num_classes))})
  try:
    classes = [int(c) for c in text.split(",") if c.strip()]
  except ValueError:
    raise ValueError(f"--classes {text!r} must be comma-separated integers, e.g. 207,360") from None
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad or not classes:
    raise ValueError(f"--classes {text!r}: class ids {bad} out of range; this model has classes 0..{num_classes - 1}")
  return classes


def run_calibrate(args: argparse.Namespace) -> dict:
  """The calibrate command: validates everything cheap first, then loads, calibrates and writes --out."""
  from var import pretrained
  from var.sampler import SamplingConfig

  meta = pretrained.read_config(args.checkpoint)
  if not isinstance(meta.get("var"), dict):
    raise ValueError(f"{args.checkpoint} holds no VAR transformer (tokenizer only); nothing to calibrate")
  var_meta = meta["var"]
  patch_nums = tuple(var_meta.get("patch_nums", ()))
  tokens = budget_tokens(patch_nums, args.budget)
  classes = _parse_classes(args.classes, int(var_meta.get("num_classes", 1000)))
  if args.num_per_class < 1 or args.batch_size < 1:
    raise ValueError(f"--num_per_class {args.num_per_class} and --batch_size {args.batch_size} must be >= 1")
  if not 0 <= args.drafter_fraction <= 1:
    raise ValueError(f"--drafter_fraction {args.drafter_fraction} must be in [0, 1]")
  if args.k_prime < 1 or (args.delta is not None and args.delta < 0):
    raise ValueError(f"--k_prime {args.k_prime} must be >= 1 and --delta {args.delta} >= 0")
  if os.path.isdir(args.out):
    raise ValueError(f"--out {args.out} is a directory; give the path of the JSON file to write")
  if not compressed_scales(patch_nums, tokens):
    raise ValueError(f"--budget {args.budget} = {tokens} tokens holds the whole cache of this schedule; nothing to "
                     "calibrate")
  sampling = SamplingConfig(cfg=args.cfg, top_k=min(args.top_k, int(var_meta.get("vocab_size", 4096))),
                            top_p=args.top_p)
  model, _, vae, _ = pretrained.load_pretrained(args.checkpoint)
  labels = np.repeat(np.asarray(classes, np.int32), args.num_per_class)
  seeds = args.seed + np.arange(labels.size)
  record = calibrate(model, vae, labels, seeds, budget=args.budget, k_prime=args.k_prime, asi=args.asi,
                     delta=args.delta, drafter_fraction=args.drafter_fraction, sampling=sampling,
                     batch_size=args.batch_size, progress=not args.no_progress)
  record["options"]["checkpoint"] = os.path.abspath(args.checkpoint)
  record["options"]["classes"] = classes
  record["options"]["seed"] = args.seed
  caps = {int(si): c for si, c in record.pop("capacities").items()}
  core = ("format", "version", "depth", "patch_nums", "window")
  save_budgets(args.out, caps, depth=record["depth"], patch_nums=patch_nums,
               meta={k: v for k, v in record.items() if k not in core})
  return read_budgets(args.out)


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    record = run_calibrate(args)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from e
  drafters = {si: d for si, d in record["drafters"].items() if d}
  print(f"wrote {args.out}: budget {record['budget']['tokens']} tokens, compressed after scales "
        f"{list(record['capacities'])}, drafters {drafters}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
