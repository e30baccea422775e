"""The jitted VAR sampler (official `VAR.autoregressive_infer_cfg`) with a ScalePlan-driven loop.

One `jax.jit` function per static sampling setup (SamplingConfig, ScalePlan, batch, edit on/off):
* a Python loop over the scales (every scale has its own static token count),
* `lax.scan` over the stacked layers inside each scale,
* a KV cache per model that follows the plan: layers of equal cached length form a run with one stacked array
  (layers, rows, T, heads, head_dim) of exactly that length, scanned together; a layer attends over its own
  cached tokens plus the current scale and nothing else (ScaleKV capacities and FastVAR's shorter appends give
  layers different lengths, and shorter arrays); CFG doubles the rows (cond rows, then uncond rows),
* CFG ramp t = cfg * si / (S - 1), logits (1 + t) cond - t uncond; top-k (ties kept) then top-p masking,
  temperature, the official `more_smooth` Gumbel-softmax option,
* next-scale input through the tokenizer's exact area/bicubic resampling, and the final decode to [0, 1] images.
No host round-trips inside. Every sample draws from its own stream `fold_in(key(seed_b), si)`, so a sample does not
depend on its batch, its position in the batch or the number of devices.

The static per-scale decisions (batch, model, cfg on/off, pruning, KV capacity, candidate selection) come from a
`var.plan.ScalePlan`; techniques plug in through `SamplerHooks` (see var/plan.py for the contract).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from var import editing, kvcompress, pruning
from var.model import VAR, block_causal_bias
from var.plan import ScalePlan


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Token sampling options. Official defaults for FID: cfg=1.5, top_k=900, top_p=0.96, more_smooth=False.

  temperature divides the top-k/top-p-masked logits before the draw (the official sampler has none, i.e. 1.0;
  CoDe masks first and divides afterwards the same way)."""
  cfg: float = 1.5
  top_k: int = 0
  top_p: float = 0.0
  temperature: float = 1.0
  more_smooth: bool = False

  def __post_init__(self):
    if self.top_k < 0 or not 0.0 <= self.top_p < 1.0 or self.temperature <= 0:
      raise ValueError(f"invalid sampling options {self}: need top_k >= 0, 0 <= top_p < 1, temperature > 0")


@dataclasses.dataclass(frozen=True)
class SamplerHooks:
  """Data-dependent parts contributed by inference techniques (pure functions called inside the jitted loop).

  select[kind](ctx, key) -> (keep,) int32 row indices, or (indices, carry); ctx is a dict with 'si', 'f_hat'
    (B, P, P, Cvae), 'tokens' (list of (B, pn^2)), 'labels' (B,), 'decode' (f_hat -> images (B, H, W, 3) in
    [0, 1]) and 'carry' (the per-candidate pytree the previous select returned, gathered to the kept rows; None
    before the first select).
  compress_kv(q, k, v, cap, positions, query_rows, *, logit_scale, q_raw) -> (k, v, index): one layer's cache
    cut to `cap` tokens per row and head after its attention (default: var.kvcompress.select_kv with the plan's
    KVOptions).
  pruned_block(block, x, mod, keep, restore_attn, restore_ffn, *, kv_fn, probe) -> x: one block at a pruned
    scale (default: var.pruning.pruned_block).
  """
  select: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
  compress_kv: Callable | None = None
  pruned_block: Callable | None = None


# ----------------------------------------------------------------------------------------------------------------
# Token sampling

def mask_top_k_top_p(logits: jax.Array, top_k: int = 0, top_p: float = 0.0) -> jax.Array:
  """Official `sample_with_top_k_top_p_` masking on (..., V) logits: -inf below the k-th largest value (ties with
  it are kept), then -inf on the ascending-sorted entries whose cumulative softmax is <= 1 - top_p (the largest
  entry is always kept). The ascending order is a stable sort (ties in vocabulary order), which decides which of
  several tied entries at the nucleus boundary go.

  With top_k > 0 the nucleus step never sorts the vocabulary: see `_top_p_after_top_k`."""
  v = logits.shape[-1]
  if top_k > v:
    raise ValueError(f"top_k={top_k} exceeds the vocabulary size {v}")
  if top_k > 0 and top_p > 0:
    return _top_p_after_top_k(logits, top_k, top_p)
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p > 0:
    order = jnp.argsort(logits, axis=-1)  # ascending, stable
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    remove = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1) <= 1 - top_p
    remove = remove.at[..., -1].set(False)
    remove = jnp.take_along_axis(remove, jnp.argsort(order, axis=-1), axis=-1)  # back to vocabulary order
    logits = jnp.where(remove, -jnp.inf, logits)
  return logits


def _top_p_after_top_k(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Top-k then top-p, bit for bit what the sort-based path of `mask_top_k_top_p` gives, without sorting V.

  After top-k the stable ascending sort of the masked row is known from `lax.top_k` alone:
  [-inf] * (V - k'), [kth] * (k' - k), the k top values reversed, where k' >= k counts the entries >= kth (ties
  with the k-th value beyond the k returned). The cumulative softmax runs over exactly that (V,) row, so every
  float op matches the sorted path; only the positions of the kept entries in that order are computed instead of
  sorted for: lax.top_k lists ties lower index first, so within a group of equal values (a stretch [a, b] of the
  top-k list) the ascending sort holds the same indices in the same order, at V - (b + 1) + (j - a); the tied
  k-th values beyond the top k follow their group's top-k members in index order."""
  shape, v = logits.shape, logits.shape[-1]
  x = logits.reshape(-1, v)  # (R, V)
  # one materialised copy for every read below: XLA may otherwise recompute the producer (the CFG mix) inside
  # several consumer fusions, with and without FMA contraction, so top_k and the comparisons would see values an
  # ulp apart (the batch-layout-dependent CoDe sample of test_sample_cli_code_flags)
  x = jax.lax.optimization_barrier(x)
  # -0.0 == 0.0 for the comparisons and the sort, but lax.top_k orders -0.0 below 0.0: canonical zeros for it
  vals, idx = jax.lax.top_k(jnp.where(x == 0, 0.0, x), top_k)  # (R, k) descending; ties lower index first
  # XLA:CPU turns top_k into its TopK kernel only while the sort it lowers to is read by leading slices; the
  # reversed and shifted reads below would make it a full sort of V again
  vals, idx = jax.lax.optimization_barrier((vals, idx))
  kth = vals[:, -1:]
  kept = ~(x < kth)  # the top-k mask (entries >= kth)
  n_kept = jnp.sum(kept, axis=-1, keepdims=True, dtype=jnp.int32)  # k'
  # the masked row in stable ascending order (V,): what argsort + take_along_axis gives
  head = jnp.where(jnp.arange(v - top_k) < v - n_kept, -jnp.inf, kth)  # (R, V - k)
  sorted_logits = jnp.concatenate([head, vals[:, ::-1]], axis=-1)
  remove_sorted = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1) <= 1 - top_p
  remove_sorted = remove_sorted.at[:, -1].set(False)

  # ascending positions of the top-k entries: group [a, b] of equal values in the descending list
  j = jnp.arange(top_k)
  change = vals[:, 1:] != vals[:, :-1]
  edge = jnp.ones((x.shape[0], 1), bool)
  first = jax.lax.cummax(jnp.where(jnp.concatenate([edge, change], 1), j, 0), axis=1)  # a
  after = jax.lax.cummin(jnp.where(jnp.concatenate([change, edge], 1), j + 1, top_k), axis=1, reverse=True)  # b + 1
  pos_top = v - jnp.where(vals == kth, n_kept, after) + (j - first)  # (R, k)
  # the k-th value's group in index order; its top-k members are its lowest indices, so this agrees with pos_top
  tied = x == kth
  pos = jnp.where(tied, v - n_kept + jnp.cumsum(tied, axis=-1, dtype=jnp.int32) - 1, 0)
  pos = jnp.put_along_axis(pos, idx, pos_top, axis=-1, inplace=False)  # (R, V)
  remove = jnp.take_along_axis(remove_sorted, pos, axis=-1)
  return jnp.where(kept & ~remove, x, -jnp.inf).reshape(shape)


def sample_tokens(logits: jax.Array, keys: jax.Array, sampling: SamplingConfig, ratio: float,
                  codebook: jax.Array, temperature: float | None = None) -> tuple[jax.Array, jax.Array]:
  """logits (B, n, V) float32, keys (B,) per-sample -> (tokens (B, n) int32, h (B, n, Cvae) embeddings).

  more_smooth: the token is still drawn, but h = softmax((masked * (1 + ratio) + Gumbel) / tau) @ codebook with
  tau = max(0.27 (1 - 0.95 ratio), 0.005), the official visualisation trick."""
  masked = mask_top_k_top_p(logits, sampling.top_k, sampling.top_p)
  temperature = sampling.temperature if temperature is None else temperature
  scaled = masked / temperature if temperature != 1.0 else masked

  def one(key, row):  # row (n, V)
    k_tok, k_gumbel = jax.random.split(key)
    return jax.random.categorical(k_tok, row, axis=-1), k_gumbel

  tokens, gumbel_keys = jax.vmap(one)(keys, scaled)
  tokens = tokens.astype(jnp.int32)
  if not sampling.more_smooth:
    return tokens, jnp.take(codebook, tokens, axis=0)
  tau = max(0.27 * (1 - ratio * 0.95), 0.005)
  gumbels = jax.vmap(lambda k: jax.random.gumbel(k, masked.shape[1:], jnp.float32))(gumbel_keys)
  soft = jax.nn.softmax((masked * (1 + ratio) + gumbels) / tau, axis=-1)
  return tokens, jnp.einsum("bnv,vc->bnc", soft, codebook.astype(jnp.float32))


# ----------------------------------------------------------------------------------------------------------------
# The KV cache: runs of layers of equal length, each an array of exactly its own size

@struct.dataclass
class CacheRun:
  """The cached keys/values of the layers [start, stop) of one model: k, v (stop - start, R, H, hd, size), layer
  i's valid tokens in [0, lengths[i]). R = rows (2B with CFG: cond rows, then uncond rows). `size` is planned
  (`planned_buffer_sizes`): the longest the layers grow while they are written in place, scale after scale.

  The token axis is stored last (`to_cache` / `from_cache`): the attention kernel XLA:CPU fuses (YNNPACK: both
  einsums and the softmax in one call) takes keys and values as (R, H, hd, L) operands, so a (R, L, H, hd) cache
  cost a transposed copy of every layer's whole cache at every scale; with this order the two transposes around
  the read cancel. Measured on the d16 last scale (16 rows, 256 queries over 680 keys): attention 90 ms instead
  of 143 ms per layer, the same float32 values."""
  k: jax.Array
  v: jax.Array
  start: int = struct.field(pytree_node=False)
  stop: int = struct.field(pytree_node=False)
  lengths: tuple[int, ...] = struct.field(pytree_node=False)

  @property
  def size(self) -> int:
    return self.k.shape[-1]


def to_cache(a: jax.Array) -> jax.Array:
  """Keys or values as attention sees them (..., R, n, H, hd) -> the cache's order (..., R, H, hd, n)."""
  return jnp.moveaxis(a, -3, -1)


def from_cache(a: jax.Array) -> jax.Array:
  """The cache's order (..., R, H, hd, n) -> (..., R, n, H, hd)."""
  return jnp.moveaxis(a, -1, -3)


@struct.dataclass
class ModelState:
  """What the loop carries for one model between scales: its KV cache (runs covering every layer, or None
  before the first scale) and, for FastVAR, the branch outputs recorded at the cache scale for the pruned layers
  ({'attn', 'ffn'}: (last - first, R, n*, C)). Every array has the layer axis first and the row axis second."""
  runs: tuple[CacheRun, ...] | None = None
  restore: dict | None = None


def held_lengths(state: ModelState, depth: int) -> tuple[int, ...]:
  """Tokens every layer holds before the next scale."""
  if state.runs is None:
    return (0,) * depth
  return tuple(n for run in state.runs for n in run.lengths)


def kv_layout(state: ModelState) -> list[tuple[int, int, tuple[int, ...], str]]:
  """(start, stop, k shape, dtype) of every cache run: what is allocated between two scales. The shape is given
  as (layers, R, size, H, hd) whatever the storage order (`CacheRun`)."""
  out = []
  for r in state.runs or ():
    layers, rows, heads, hd, size = r.k.shape
    out.append((r.start, r.stop, (layers, rows, size, heads, hd), str(r.k.dtype)))
  return out


def kv_bytes(state: ModelState) -> int:
  """Bytes of the keys and values the cache holds."""
  return sum(2 * r.k.size * r.k.dtype.itemsize for r in (state.runs or ()))


def _runs(keys: Sequence) -> list[tuple[int, int]]:
  """Contiguous [start, stop) runs of equal keys."""
  out, start = [], 0
  for i in range(1, len(keys) + 1):
    if i == len(keys) or keys[i] != keys[start]:
      out.append((start, i))
      start = i
  return out


@dataclasses.dataclass(frozen=True)
class ScaleForward:
  """The static description of one scale's transformer pass for one model (built by the loop from the plan).

  n: tokens of the scale (pn^2; x may be longer for a model's prefill: the scale's tokens are x's last n);
  side: pn; emit: keep a cache for the next scale; prune: the PruneStep or None; capacity: per-layer tokens kept
  after the scale (None = all); record: (first, last) layers whose branch outputs are recorded (FastVAR cache
  scale) or None; sizes: per layer, the size of a cache buffer made at this scale (`planned_buffer_sizes`)."""
  n: int
  side: int
  emit: bool
  prune: Any = None
  capacity: tuple[int, ...] | None = None
  record: tuple[int, int] | None = None
  sizes: tuple[int, ...] | None = None


# How a layer's cache changes at a scale: written in place into its buffer (which has room), into a new zero
# buffer (nothing cached yet), cut to its capacity (a new array), grown into a new array (no room left), or only
# read (no later scale of this model reads it).
_INPLACE, _FRESH, _COMPRESS, _GROW, _READ = "inplace", "fresh", "compress", "grow", "read"


def forward_scale(model: VAR, x: jax.Array, mods: jax.Array, state: ModelState, spec: ScaleForward, *,
                  hooks: SamplerHooks, kv_options, kv_dtype, attn_bias: jax.Array | None = None,
                  kv_index: list | None = None) -> tuple[jax.Array, ModelState]:
  """Runs all blocks on x (R, m, C) over the model's cache -> (h (R, m, C), the state for the next scale).
  mods (depth, R, 1, 6, C): the blocks' AdaLN modulations, `model.layer_modulations(block_cond)`.

  Layers are grouped into runs of equal (cached length, pruned or not, capacity, recorded or not, cache buffer,
  what happens to it); each run is one `lax.scan` over its layers (weights indexed inside the body, so compile
  time does not grow with depth) that only reads its cache buffer and returns the new keys/values. A layer
  attends over [its cached tokens ; this call's tokens] and no more; a layer that keeps everything has its new
  keys/values written in place after the scan, all layers at once (the plain plan holds one buffer for the whole
  loop, like a preallocated cache, sized to what is re-read); with a capacity the layer keeps that many tokens
  (ScaleKV) right after its attention, in an array of that size; a pruned layer forwards and appends only the
  kept tokens (FastVAR)."""
  graphdef, params = nnx.split(model.blocks)
  depth, dtype = model.config.depth, model.config.compute_dtype
  runs = state.runs or ()
  held = held_lengths(state, depth)
  owner = [next((i for i, r in enumerate(runs) if r.start <= layer < r.stop), -1) for layer in range(depth)]
  m = x.shape[1]
  prune = spec.prune
  pruned = [prune is not None and prune.first <= layer < prune.last for layer in range(depth)]
  modes, caps = [], []
  for layer in range(depth):
    total = held[layer] + (prune.keep if pruned[layer] else m)
    cap = spec.capacity[layer] if spec.capacity is not None else None
    cap = cap if spec.emit and cap is not None and cap < total else None
    caps.append(cap)
    if not spec.emit:
      modes.append(_READ)
    elif cap is not None:
      modes.append(_COMPRESS)
    elif owner[layer] < 0:
      modes.append(_FRESH)
    else:
      modes.append(_INPLACE if runs[owner[layer]].size >= total else _GROW)
  rec = [spec.record is not None and spec.record[0] <= layer < spec.record[1] for layer in range(depth)]
  keys = list(zip(held, pruned, caps, rec, modes, owner, strict=True))
  compress = hooks.compress_kv
  if compress is None and any(c is not None for c in caps):
    compress = functools.partial(kvcompress.select_kv, scorer=kv_options.scorer, pooling=kv_options.pooling,
                                 kernel=kv_options.kernel)
  prune_fn = hooks.pruned_block or pruning.pruned_block

  h = x.astype(dtype)
  buffers = {i: (r.k, r.v) for i, r in enumerate(runs)}  # the buffers of `runs`, updated in place run by run
  lengths = list(held)
  new_runs, recorded = [], {"attn": [], "ffn": []}
  for start, stop in _runs(keys):
    held_t, is_pruned, cap, is_rec, mode, own, = keys[start]
    appended = prune.keep if is_pruned else m
    if mode == _FRESH:
      buf, offset = None, start
    elif own >= 0:
      buf, offset = buffers[own], runs[own].start
    else:
      buf, offset = None, start
    restore, window = None, None
    if is_pruned:
      restore = jax.tree.map(lambda a, lo=start - prune.first, hi=stop - prune.first: a[lo:hi], state.restore)
    if cap is not None:
      if is_pruned:  # the kept tokens come in PTS order: the most pivotal ones are the observation window
        w = min(kvcompress.WINDOW_SIZE, prune.keep)
        window = (np.arange(held_t, held_t + w), np.arange(w))
      else:
        positions, query_rows = kvcompress.window_positions(spec.side, spec.side, held_t + m - spec.n)
        window = (positions, query_rows + (m - spec.n))
    run = _LayerRun(graphdef=graphdef, params=params, spec=spec, pruned=is_pruned, capacity=cap, record=is_rec,
                    window=window, compress=compress, prune_fn=prune_fn, kv_dtype=kv_dtype, mode=mode, held=held_t,
                    offset=offset)
    # The scan only reads the cache buffer (a loop invariant) and returns the new keys/values; they are written
    # after it, all layers at once. Carrying the buffer through the scan and writing it inside made XLA:CPU copy
    # the whole buffer at every layer (2.2 s a scale for the d16 batch-8 cache, whatever the scale's size).
    h, ys = jax.lax.scan(functools.partial(run.body, buf=buf, attn_bias=attn_bias, m=m),
                         h, (jnp.arange(start, stop), mods[start:stop], restore))
    if mode == _FRESH:
      size = max(spec.sizes[start:stop])
      shape = (stop - start, x.shape[0], model.config.num_heads, model.config.head_dim, size)
      k, v = (jax.lax.dynamic_update_slice(jnp.zeros(shape, kv_dtype), ys[name], (0, 0, 0, 0, 0))
              for name in ("k_new", "v_new"))
      new_runs.append(CacheRun(k, v, start, stop, (held_t + appended,) * (stop - start)))
    elif mode == _INPLACE:
      at = (start - offset, 0, 0, 0, held_t)
      buffers[own] = tuple(jax.lax.dynamic_update_slice(b, ys[name], at)
                           for b, name in zip(buf, ("k_new", "v_new"), strict=True))
      lengths[start:stop] = [held_t + appended] * (stop - start)
    elif mode in (_COMPRESS, _GROW):
      length = cap if mode == _COMPRESS else held_t + appended
      size = max(length, max(spec.sizes[start:stop]))
      k, v = (jnp.pad(a, ((0, 0),) * 4 + ((0, size - length),)) if size > length else a for a in (ys["k"], ys["v"]))
      new_runs.append(CacheRun(k, v, start, stop, (length,) * (stop - start)))
    if kv_index is not None and "index" in ys:
      kv_index.append((start, stop, ys["index"]))
    if is_rec:
      recorded["attn"].append(ys["attn"])
      recorded["ffn"].append(ys["ffn"])
  if spec.emit:
    for i, r in enumerate(runs):  # what stays in the old buffers: the layers written in place
      stay = [modes[layer] == _INPLACE for layer in range(r.start, r.stop)]
      for lo, hi in _runs(stay):
        if stay[lo]:
          k, v = buffers[i]
          if (lo, hi) != (0, r.stop - r.start):  # some layers moved out: keep only the others' rows
            k, v = k[lo:hi], v[lo:hi]
          new_runs.append(CacheRun(k, v, r.start + lo, r.start + hi, tuple(lengths[r.start + lo:r.start + hi])))
  new_state = ModelState(runs=tuple(sorted(new_runs, key=lambda r: r.start)) if spec.emit else None,
                         restore=state.restore)
  if spec.record is not None:
    new_state = new_state.replace(restore={k: jnp.concatenate(v) for k, v in recorded.items()})
  return h, new_state


@dataclasses.dataclass(frozen=True)
class _LayerRun:
  """One run of layers inside `forward_scale`: `body` is the lax.scan body over its layers, carrying h and
  reading the run's cache buffer (never writing it: what it keeps comes out as the scan's outputs)."""
  graphdef: Any
  params: Any
  spec: ScaleForward
  pruned: bool
  capacity: int | None
  record: bool
  window: tuple | None  # (positions, query_rows) of the ScaleKV observation window
  compress: Callable | None
  prune_fn: Callable
  kv_dtype: Any
  mode: str
  held: int  # cached tokens of every layer of the run
  offset: int  # the first layer of the run's cache buffer

  def body(self, h, xs, *, buf, attn_bias, m):
    # buf: the run's cache buffer (k, v) (layers, R, H, hd, size), read only; None when nothing is cached yet
    # mod (R, 1, 6, C): the layer's AdaLN modulation; restore: its recorded {'attn', 'ffn'} (R, n*, C) on pruned runs
    layer, mod, restore = xs
    block = nnx.merge(self.graphdef, jax.tree.map(lambda a: a[layer], self.params))  # the AdaLN kernel: unread
    li = layer - self.offset
    box, ys = {}, {}

    def kv_fn(k, v):  # this call's keys/values (R, n', H, hd) -> what the layer attends over
      rows, n_new, heads, hd = k.shape
      new = (to_cache(k), to_cache(v))  # (R, H, hd, n')
      if self.mode in (_INPLACE, _FRESH):  # kept: written after the scan; read back as the cache holds them
        ys["k_new"], ys["v_new"] = (a.astype(self.kv_dtype) for a in new)
        new = tuple(a.astype(k.dtype) for a in (ys["k_new"], ys["v_new"]))
      if self.held:  # [cached ; new], joined in the cache's order (what attention reads)
        size = (1, rows, heads, hd, self.held)
        new = tuple(jnp.concatenate([jax.lax.dynamic_slice(b, (li, 0, 0, 0, 0), size)[0].astype(k.dtype), a], -1)
                    for b, a in zip(buf, new, strict=True))
      box["k"], box["v"] = (from_cache(a) for a in new)
      return box["k"], box["v"]

    probe = (lambda **kw: box.update(kw)) if self.capacity is not None else None
    spec = self.spec
    if self.pruned:
      up = {name: pruning.upsample_branch(a, spec.side) for name, a in restore.items()}
      h = self.prune_fn(block, h, mod, spec.prune.keep, up["attn"], up["ffn"], kv_fn=kv_fn, probe=probe)
    else:
      attn = block.attn_branch(h, mod, attn_bias=attn_bias, kv_fn=kv_fn, probe=probe)
      h = h + attn
      ffn = block.ffn_branch(h, mod)
      h = h + ffn
      if self.record:
        ys["attn"], ys["ffn"] = attn[:, m - spec.n:], ffn[:, m - spec.n:]
    if self.mode == _COMPRESS:
      positions, query_rows = self.window
      k, v, ys["index"] = self.compress(box["q"], box["k"], box["v"], self.capacity, positions, query_rows,
                                        logit_scale=box["logit_scale"], q_raw=box["q_raw"])
      ys["k"], ys["v"] = to_cache(k).astype(self.kv_dtype), to_cache(v).astype(self.kv_dtype)
    elif self.mode == _GROW:
      ys["k"], ys["v"] = to_cache(box["k"]).astype(self.kv_dtype), to_cache(box["v"]).astype(self.kv_dtype)
    return h, ys


def planned_held_lengths(plan: ScalePlan, patch_nums: Sequence[int], depth) -> list[tuple[int, ...]]:
  """Per scale, the tokens every layer of the scale's model holds BEFORE it (what `forward_scale` finds), from
  the plan alone. depth: an int, or {model name: depth}. A model switch starts from an empty cache (its prefill
  covers every earlier token)."""
  depths = depth if isinstance(depth, Mapping) else {name: depth for name in plan.models}
  out, held, prev = [], None, None
  ends = np.cumsum([p * p for p in patch_nums])
  for si, step in enumerate(plan.steps):
    n = patch_nums[si] ** 2
    if step.model != prev:
      held, n = (0,) * depths[step.model], int(ends[si])
    out.append(held)
    prev = step.model
    if step.skip:
      continue
    p = step.prune
    total = [h + (p.keep if p is not None and p.first <= layer < p.last else n) for layer, h in enumerate(held)]
    if step.kv_capacity is not None:
      total = [min(t, c) for t, c in zip(total, step.kv_capacity, strict=True)]
    held = tuple(total)
  out.append(held)  # after the last scale
  return out


def planned_buffer_sizes(plan: ScalePlan, patch_nums: Sequence[int], depth) -> list[tuple[int, ...]]:
  """Per scale and layer, the size of a cache buffer made at that scale (fresh, cut to a capacity, or grown): the
  longest the layer gets while the following scales write it in place (they keep all its tokens), so in-place
  writes never run out of room. The plain plan makes one buffer at scale 0 of the longest re-read prefix."""
  held = planned_held_lengths(plan, patch_nums, depth)
  s = len(plan.steps)

  def continues(si):  # scale si keeps a cache for scale si + 1
    return si + 1 < s and not plan[si + 1].skip and plan[si + 1].model == plan[si].model

  def cuts(si, layer):  # scale si cuts the layer's cache to a capacity
    step = plan[si]
    if step.kv_capacity is None:
      return False
    n = step.prune.keep if step.prune and step.prune.first <= layer < step.prune.last else patch_nums[si] ** 2
    return step.kv_capacity[layer] < held[si][layer] + n

  out = []
  for si in range(s):
    sizes = []
    for layer in range(len(held[si])):
      size, sj = (held[si + 1][layer] if continues(si) else 0), si + 1
      while sj < s and continues(sj) and not cuts(sj, layer) and plan[sj].model == plan[si].model:
        size = max(size, held[sj + 1][layer])
        sj += 1
      sizes.append(size)
    out.append(tuple(sizes))
  return out


def _rows(tree, idx: jax.Array):
  """Keeps the given rows (axis 1: layer axis first) of every array of a ModelState."""
  return jax.tree.map(lambda a: jnp.take(a, idx, axis=1), tree)


def _take_rows(tree, idx):
  return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), tree)


def sample_loop(models: Mapping[str, VAR], vae, labels: jax.Array, seeds: jax.Array, *, sampling: SamplingConfig,
                plan: ScalePlan, hooks: SamplerHooks | None = None, edit: Mapping[str, jax.Array] | None = None,
                cfg: jax.Array | float | None = None, return_logits: bool = False, kv_dtype=None,
                layout: list | None = None, decode_vae=None) -> dict[str, Any]:
  """The traced sampler body (call it inside jit). labels (B,) int (num_classes = unconditional), seeds (B,)
  uint32; edit = {'tokens': (B, L) int, 'mask': (B, P, P) float, 1 = keep the given tokens}; cfg (a traced scalar
  is fine) overrides sampling.cfg, so one executable serves every guidance scale. kv_dtype: the cache's dtype
  (default: each model's activation dtype). `layout`, if given, receives per scale the model's cache runs
  (kv_layout) held after it: the allocated cache, known at trace time. decode_vae: the VQVAE that decodes f_hat
  to images (default: vae; e.g. the same weights with bfloat16 activations), after the last token is drawn.

  Returns {'images': (B', H, W, 3) in [0, 1], 'tokens': (B', L) int32 (-1 on skipped scales), 'f_hat':
  (B', P, P, Cvae)} (B' = the plan's output batch); with return_logits also 'logits' (B', L, V), the CFG-mixed
  logits the tokens were drawn from (zeros on skipped scales), 'cond_logits', the conditional rows' raw logits,
  and 'kv_index': {si: {"first:last": (layers, R, cap, H) int32}}, the positions every compressed run kept
  (indices into the layer's cache [held ; this scale])."""
  hooks = hooks or SamplerHooks()
  decoder = vae if decode_vae is None else decode_vae
  guidance = sampling.cfg if cfg is None else cfg
  mcfg = models[plan[0].model].config
  patch_nums, s = mcfg.patch_nums, len(mcfg.patch_nums)
  begin_ends = mcfg.begin_ends
  b = labels.shape[0]
  null = jnp.full_like(labels, mcfg.num_classes)
  codebook = vae.quantize.codebook()
  cvae, p = mcfg.z_channels, patch_nums[-1]

  states = {name: ModelState() for name in plan.models}
  sizes = planned_buffer_sizes(plan, patch_nums, {name: models[name].config.depth for name in plan.models})
  f_hat = jnp.zeros((b, p, p, cvae), jnp.float32)
  x_hist: list[jax.Array] = []  # next-scale inputs (B, pn^2, Cvae) of scales 1.. (a new model's prefill)
  tokens: list[jax.Array] = []
  logits_out: list[jax.Array] = []
  cond_logits_out: list[jax.Array] = []
  kv_index_out: dict[int, list] = {}
  base_keys = jax.vmap(jax.random.key)(seeds.astype(jnp.uint32))
  edit_tokens = None if edit is None else _split_tokens(edit["tokens"], patch_nums)
  prev_model = None
  select_carry = None  # per-candidate state a select hook hands to the next one (e.g. a reward history)
  modulations = {}  # (model, cfg rows on) -> its blocks' AdaLN modulations of the current rows; see below

  for si, (step, pn) in enumerate(zip(plan.steps, patch_nums, strict=True)):
    beg, end = begin_ends[si]
    if step.skip:  # FastVAR ratio 1: nothing runs, nothing is drawn
      tokens.append(jnp.full((b, pn * pn), -1, jnp.int32))
      if return_logits:
        zeros = jnp.zeros((b, pn * pn, mcfg.vocab_size), jnp.float32)
        logits_out.append(zeros)
        cond_logits_out.append(zeros)
      if layout is not None:
        layout.append({})
      continue
    ratio = si / (s - 1) if s > 1 else 0.0
    model = models[step.model]
    all_labels = jnp.concatenate([labels, null]) if step.cfg_on else labels
    cond = model.condition(all_labels)
    # the modulations depend only on the rows' classes: computed once per model and row set, not per scale
    mods_key = (step.model, step.cfg_on)
    if mods_key not in modulations:
      modulations[mods_key] = model.layer_modulations(model.block_condition(cond))
    mods = modulations[mods_key]
    nxt_step = plan[si + 1] if si < s - 1 else None
    later = [plan[j] for j in range(si + 1, s)]
    record = None
    for ls in later:  # the FastVAR cache scale: record the branch outputs a later pruned scale restores from
      if ls.model != step.model:
        break
      if ls.prune is not None and ls.prune.cache_scale == si:
        record = (ls.prune.first, ls.prune.last)
    spec = ScaleForward(n=pn * pn, side=pn, prune=step.prune, capacity=step.kv_capacity, record=record,
                        emit=nxt_step is not None and not nxt_step.skip and nxt_step.model == step.model,
                        sizes=sizes[si])
    kv_index = [] if return_logits else None
    kw = dict(hooks=hooks, kv_options=plan.kv, kv_index=kv_index,
              kv_dtype=jnp.dtype(kv_dtype) if kv_dtype is not None else model.config.compute_dtype)

    if step.model != prev_model and si > 0:
      # hand-over to another model: one block-causal pass over every token so far builds its own cache; the
      # previous model's cache is not carried further (its buffers die here)
      for name in states:
        if name != step.model:
          states[name] = ModelState()
      parts = [model.first_tokens(cond)] + [
        model.embed_scale(_dup(xh, step.cfg_on), begin_ends[j + 1][0]) for j, xh in enumerate(x_hist)]
      x = jnp.concatenate(parts, axis=1)  # (R, end, C)
      bias = jnp.asarray(block_causal_bias(patch_nums)[:end, :end])
      h, states[step.model] = forward_scale(model, x, mods, ModelState(), spec, attn_bias=bias, **kw)
      h = h[:, beg:]
    else:
      x = model.first_tokens(cond) if si == 0 else model.embed_scale(_dup(x_hist[-1], step.cfg_on), beg)
      h, states[step.model] = forward_scale(model, x, mods, states[step.model], spec, **kw)
    prev_model = step.model
    if kv_index:
      kv_index_out[si] = {f"{a}:{z}": idx for a, z, idx in kv_index}

    logits = model.logits(h, cond)  # (R, pn^2, V)
    if return_logits:
      cond_logits_out.append(logits[:b])
    if step.cfg_on:
      t = guidance * ratio
      logits = (1 + t) * logits[:b] - t * logits[b:]
    if return_logits:
      logits_out.append(logits)
    keys = jax.vmap(lambda k, si=si: jax.random.fold_in(k, si))(base_keys)
    idx, h_emb = sample_tokens(logits, keys, sampling, ratio, codebook, step.temperature)
    h_emb = h_emb.reshape(b, pn, pn, cvae)
    if edit is not None:
      keep = editing.scale_keep_mask(edit["mask"], pn)  # (B, pn, pn) bool
      gt = edit_tokens[si]
      idx = jnp.where(keep.reshape(b, -1), gt, idx)
      h_emb = jnp.where(keep[..., None], jnp.take(codebook, gt, axis=0).reshape(b, pn, pn, cvae), h_emb)
    tokens.append(idx)
    f_hat, nxt = vae.next_autoregressive_input(si, f_hat, h_emb)
    if si < s - 1:
      x_hist.append(nxt.reshape(b, -1, cvae))

    # drop the uncond rows of every model's state when CFG switches off from the next scale on
    if nxt_step is not None and step.cfg_on and not nxt_step.cfg_on:
      states = {k: _rows(st, jnp.arange(b)) for k, st in states.items()}

    if step.select is not None:
      ctx = dict(si=si, f_hat=f_hat, tokens=list(tokens), labels=labels,
                 decode=lambda fh: (decoder.fhat_to_img(fh) + 1) / 2, carry=select_carry)
      # the selection key follows the first candidate's seed (selection is a batch-level decision)
      picked = hooks.select[step.select.kind](ctx, jax.random.fold_in(base_keys[0], 10_000 + si))
      keep_idx, select_carry = picked if isinstance(picked, tuple) else (picked, None)
      keep_idx = keep_idx.astype(jnp.int32)
      if select_carry is not None:
        select_carry = _take_rows(select_carry, keep_idx)
      cfg_rows = step.cfg_on if nxt_step is None else nxt_step.cfg_on
      row_idx = jnp.concatenate([keep_idx, keep_idx + b]) if cfg_rows else keep_idx
      states = {k: _rows(st, row_idx) for k, st in states.items()}
      f_hat, labels, base_keys = _take_rows((f_hat, labels, base_keys), keep_idx)
      modulations.clear()  # other rows (and classes) from here on
      base_keys = _rekey_copies(base_keys, keep_idx, si)
      tokens, x_hist, logits_out, cond_logits_out = (
        _take_rows(lst, keep_idx) for lst in (tokens, x_hist, logits_out, cond_logits_out))
      if edit is not None:
        edit = _take_rows(edit, keep_idx)
        edit_tokens = _take_rows(edit_tokens, keep_idx)
      b = step.select.keep
      null = null[:b]
    if layout is not None:
      layout.append({name: kv_layout(st) for name, st in states.items() if st.runs is not None})

  images = (decoder.fhat_to_img(f_hat) + 1) / 2
  out = {"images": images, "tokens": jnp.concatenate(tokens, axis=1), "f_hat": f_hat}
  if return_logits:
    out["logits"] = jnp.concatenate(logits_out, axis=1)
    out["cond_logits"] = jnp.concatenate(cond_logits_out, axis=1)
    out["kv_index"] = kv_index_out
  return out


def _rekey_copies(keys: jax.Array, keep_idx: jax.Array, si: int) -> jax.Array:
  """Gives every repeated survivor of a selection (a with-replacement draw kept row r twice) its own random
  stream from the next scale on: a row's draws are its key's, so an unchanged copy would repeat its original
  token for token. The first copy of each row keeps its key (it stays the sample of its seed)."""
  n = keep_idx.shape[0]
  earlier = jnp.arange(n)[:, None] > jnp.arange(n)[None, :]
  copy = jnp.sum((keep_idx[:, None] == keep_idx[None, :]) & earlier, axis=1)  # (n,) 0 for a row's first copy
  fresh = jax.vmap(lambda k, c: jax.random.fold_in(jax.random.fold_in(k, 20_000 + si), c))(keys, copy)
  data = jnp.where((copy > 0)[:, None], jax.random.key_data(fresh), jax.random.key_data(keys))
  return jax.random.wrap_key_data(data, impl=jax.random.key_impl(keys))


def _dup(x: jax.Array, cfg_on: bool) -> jax.Array:
  """Both CFG halves receive the same (guided) next-scale input."""
  return jnp.concatenate([x, x]) if cfg_on else x


def _split_tokens(tokens_bl: jax.Array, patch_nums) -> list[jax.Array]:
  bounds = np.cumsum([p * p for p in patch_nums])[:-1].tolist()
  return list(jnp.split(tokens_bl.astype(jnp.int32), bounds, axis=1))


# ----------------------------------------------------------------------------------------------------------------
# The user-facing sampler: compiled once per static setup

class Sampler:
  """Jitted sampler for a VAR (or several, for plans that switch models) and a VQVAE.

  sampler = Sampler(var, vae, SamplingConfig(cfg=1.5, top_k=900, top_p=0.96))
  out = sampler(labels, seeds)            # {'images': (B, H, W, 3) in [0, 1], 'tokens': (B, L), 'f_hat': ...}

  The plan defaults to `ScalePlan.plain` for the batch size of each call. With a mesh, inputs and outputs are split
  over its batch axes (var.sharding rules) and the parameters are placed by their logical names (replicated or
  FSDP-sharded per the rules); results do not depend on the device count. kv_dtype: the KV cache's dtype (None:
  the activation dtype); decode_dtype: the activation dtype of the final VQVAE decode (None: the VQVAE's own;
  'bfloat16' decodes the same weights in bfloat16: pixels change slightly, tokens never).
  """

  def __init__(self, var: VAR | Mapping[str, VAR], vae, sampling: SamplingConfig = SamplingConfig(), *,
               plan: ScalePlan | None = None, hooks: SamplerHooks | None = None, mesh=None,
               return_logits: bool = False, kv_dtype: str | None = None, decode_dtype: str | None = None):
    self.models = {"main": var} if isinstance(var, VAR) else dict(var)
    main = self.models.get("main", next(iter(self.models.values())))
    self.config = main.config
    for name, m in self.models.items():
      c = m.config
      fields = ("patch_nums", "vocab_size", "z_channels", "num_classes")
      if any(getattr(c, f) != getattr(self.config, f) for f in fields):
        raise ValueError(f"model {name!r} has {fields} = {tuple(getattr(c, f) for f in fields)}, unlike "
                         f"{tuple(getattr(self.config, f) for f in fields)}: every model of a plan must read and write "
                         "the same token maps and classes")
    vc = vae.config
    if (vc.patch_nums, vc.vocab_size, vc.z_channels) != (self.config.patch_nums, self.config.vocab_size,
                                                           self.config.z_channels):
      raise ValueError(f"VQVAE (patch_nums {vc.patch_nums}, vocab {vc.vocab_size}, z {vc.z_channels}) does not "
                       f"match the VAR (patch_nums {self.config.patch_nums}, vocab {self.config.vocab_size}, "
                       f"z {self.config.z_channels}); load the VQVAE the model was trained with")
    if sampling.top_k > self.config.vocab_size:
      raise ValueError(f"top_k={sampling.top_k} exceeds the vocabulary size {self.config.vocab_size}")
    self.sampling, self.plan, self.hooks, self.mesh = sampling, plan, hooks or SamplerHooks(), mesh
    self.return_logits = return_logits
    if kv_dtype not in (None, "float32", "bfloat16"):
      raise ValueError(f"kv_dtype {kv_dtype!r}: use 'float32' or 'bfloat16' (None: the model's activation dtype)")
    self.kv_dtype = kv_dtype
    if decode_dtype not in (None, "float32", "bfloat16"):
      raise ValueError(f"decode_dtype {decode_dtype!r}: use 'float32' or 'bfloat16' (None: the VQVAE's own dtype)")
    self.decode_dtype = decode_dtype
    # per batch size: per scale, {model: [(first layer, last layer, k shape, dtype)]} of the cache held after it
    self.kv_layouts: dict[int, list[dict]] = {}
    if plan is None and "main" not in self.models:
      raise ValueError(f"models {sorted(self.models)}: without a plan one of them must be named 'main'")
    if plan is not None:
      plan.validate(self.config.patch_nums, {k: m.config.depth for k, m in self.models.items()}, self.hooks)
    self.trace_count = 0
    self._compiled: dict = {}
    graphdefs, states = {}, {}
    for name, m in self.models.items():
      graphdefs[name], states[name] = nnx.split(m)
    self._vae_graphdef, vae_state = nnx.split(vae)
    self._decode_graphdef = None  # the VQVAE with the decode dtype, over the same parameters
    if decode_dtype is not None and decode_dtype != vc.dtype:
      decode_config = dataclasses.replace(vc, dtype=decode_dtype)
      with nnx.use_eager_sharding(False):
        self._decode_graphdef = nnx.graphdef(nnx.eval_shape(lambda: type(vae)(decode_config, rngs=nnx.Rngs(0))))
    self._graphdefs = graphdefs
    if mesh is not None:
      from var import sharding

      self._batch_sharding = sharding.batch_sharding(mesh)
      self._batch_ways = int(np.prod([mesh.shape[a] for a in sharding.batch_axes(mesh)]))
    self._place(states, vae_state)
    self._jit = jax.jit(self._run)

  def _place(self, states, vae_state):
    self._states = (states, vae_state)
    if self.mesh is not None:
      from var import sharding

      self._states = jax.device_put(self._states, sharding.state_shardings(self._states, self.mesh))

  def update(self, var: VAR | Mapping[str, VAR], vae) -> None:
    """Swaps in new weights of the same architecture (e.g. during training) without recompiling."""
    models = {"main": var} if isinstance(var, VAR) else dict(var)
    states = {}
    for name, m in models.items():
      graphdef, states[name] = nnx.split(m)
      if graphdef != self._graphdefs.get(name):
        raise ValueError(f"model {name!r} has another architecture than the one this sampler was built for")
    vae_graphdef, vae_state = nnx.split(vae)
    if vae_graphdef != self._vae_graphdef:
      raise ValueError("the VQVAE has another architecture than the one this sampler was built for")
    self._place(states, vae_state)

  def plan_for(self, batch: int) -> ScalePlan:
    if self.plan is not None:
      if batch != self.plan.batch:
        raise ValueError(f"the sampler's plan is for batch {self.plan.batch}, got {batch} labels")
      return self.plan
    return ScalePlan.plain(len(self.config.patch_nums), batch, self.sampling.cfg)

  def _run(self, states, labels, seeds, edit, cfg):
    self.trace_count += 1  # runs only while tracing: counts compilations
    var_states, vae_state = states
    models = {k: nnx.merge(self._graphdefs[k], var_states[k]) for k in self._graphdefs}
    vae = nnx.merge(self._vae_graphdef, vae_state)
    decode_vae = None if self._decode_graphdef is None else nnx.merge(self._decode_graphdef, vae_state)
    layout = self.kv_layouts[labels.shape[0]] = []
    return sample_loop(models, vae, labels, seeds, sampling=self.sampling, plan=self.plan_for(labels.shape[0]),
                       hooks=self.hooks, edit=edit, cfg=cfg, return_logits=self.return_logits,
                       kv_dtype=self.kv_dtype, layout=layout, decode_vae=decode_vae)

  def kv_bytes_per_scale(self, batch: int) -> list[int]:
    """Bytes of the KV cache held after every scale (all models), from the traced program's arrays; compile or
    call the sampler for this batch size first."""
    if batch not in self.kv_layouts:
      raise ValueError(f"the sampler has not been compiled for batch {batch}; call compile({batch}) first")
    out = []
    for per_model in self.kv_layouts[batch]:
      total = 0
      for runs in per_model.values():
        for _, _, shape, dtype in runs:
          total += 2 * int(np.prod(shape)) * jnp.dtype(dtype).itemsize
      out.append(total)
    return out

  def _inputs(self, labels, seeds, edit, cfg=None):
    labels = np.asarray(labels, np.int32).reshape(-1)
    seeds = np.asarray(seeds, np.uint32).reshape(-1)
    b = labels.shape[0]
    if seeds.shape[0] != b:
      raise ValueError(f"got {b} labels but {seeds.shape[0]} seeds; give one seed per sample")
    bad = labels[(labels < 0) | (labels > self.config.num_classes)]
    if bad.size:
      raise ValueError(f"class ids {sorted(set(bad.tolist()))} out of range: use 0..{self.config.num_classes - 1}, "
                       f"or {self.config.num_classes} for unconditional samples")
    if edit is not None:
      edit = {"tokens": np.asarray(edit["tokens"], np.int32), "mask": np.asarray(edit["mask"], np.float32)}
      p, length = self.config.patch_nums[-1], self.config.seq_len
      if edit["tokens"].shape != (b, length) or edit["mask"].shape != (b, p, p):
        raise ValueError(f"edit tokens must be (B, L) = {(b, length)} and mask (B, P, P) = {(b, p, p)}, got "
                         f"{edit['tokens'].shape} and {edit['mask'].shape}")
    cfg = np.float32(self.sampling.cfg if cfg is None else cfg)
    if (cfg != 0) != (self.sampling.cfg != 0):
      raise ValueError(f"cfg={cfg}: this sampler was built for cfg {'!=' if self.sampling.cfg else '=='} 0 (CFG rows "
                       "on/off is static); build another Sampler")
    args = (labels, seeds, edit)
    if self.mesh is not None:
      if b % self._batch_ways:
        raise ValueError(f"batch {b} is not divisible by the {self._batch_ways} data-parallel devices of the mesh; "
                         f"use a multiple of {self._batch_ways}")
      args = jax.device_put(args, self._batch_sharding)
    return (*args, cfg)

  def compile(self, batch: int, edit: bool = False) -> float:
    """Ahead-of-time compiles the sampler for a batch size (and editing on/off); returns the seconds it took."""
    t0 = time.perf_counter()
    p, length = self.config.patch_nums[-1], self.config.seq_len
    edit_args = {"tokens": np.zeros((batch, length), np.int32), "mask": np.zeros((batch, p, p), np.float32)}
    args = self._inputs(np.zeros(batch, np.int32), np.zeros(batch, np.uint32), edit_args if edit else None)
    self._compiled[(batch, edit)] = self._jit.lower(self._states, *args).compile()
    return time.perf_counter() - t0

  def __call__(self, labels, seeds, edit: Mapping[str, Any] | None = None,
               cfg: float | None = None) -> dict[str, jax.Array]:
    """labels (B,) class ids (num_classes = unconditional), seeds (B,) one per sample, optional edit inputs
    (var.editing.edit_inputs), cfg overriding the SamplingConfig's guidance scale without recompiling."""
    args = self._inputs(labels, seeds, edit, cfg)
    fn = self._compiled.get((args[0].shape[0], edit is not None), self._jit)
    return fn(self._states, *args)


_SAMPLERS: dict = {}  # sample_images' compiled samplers, keyed by everything static


def sample_images(model: VAR, vae, classes, *, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
                  temperature: float = 1.0, more_smooth: bool = False, seed: int = 0, num_per_class: int = 1,
                  batch_size: int | None = None, mesh=None, progress: bool = False) -> np.ndarray:
  """Samples `num_per_class` images of every class id in `classes` (class-major order) -> (N, H, W, 3) float32
  numpy in [0, 1]. Sample i uses seed `seed + i`, so results do not depend on batch_size or the mesh.

  Batches of `batch_size` (default: all at once, rounded up to the mesh's data-parallel size); the last batch is
  padded (padding samples are dropped). The compiled sampler is cached across calls with the same setup. With a
  mesh over several processes (jax.distributed), every process calls this with the same arguments, computes
  its share of each batch and gets all N images back, in order."""
  labels = np.repeat(np.asarray(list(classes), np.int32), num_per_class)
  n = labels.shape[0]
  if n == 0:
    raise ValueError("no classes given")
  ways = 1
  if mesh is not None:
    from var import sharding

    ways = int(np.prod([mesh.shape[a] for a in sharding.batch_axes(mesh)]))
  batch = batch_size or -(-n // ways) * ways
  # cfg is a runtime argument: only whether it is 0 (no uncond rows) is part of the compiled setup
  sampling = SamplingConfig(cfg=float(cfg != 0), top_k=top_k, top_p=top_p, temperature=temperature,
                            more_smooth=more_smooth)
  if mesh is not None and jax.process_count() > 1:
    # jax cannot device_put an array committed to one local device onto a mesh spanning other processes, but
    # places host values (the same on every process) anywhere; arrays already spread over the processes (a
    # training state) stay as they are.
    def host_values(module):
      graphdef, state = nnx.split(module)
      local = lambda x: np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable else x
      return nnx.merge(graphdef, jax.tree.map(local, state))

    model, vae = host_values(model), host_values(vae)
  key = (nnx.graphdef(model), nnx.graphdef(vae), sampling, mesh)
  sampler = _SAMPLERS.get(key)
  if sampler is None:
    sampler = _SAMPLERS[key] = Sampler(model, vae, sampling, mesh=mesh)
  else:
    sampler.update(model, vae)
  seeds = (seed + np.arange(n)).astype(np.uint32)
  out = []
  starts = range(0, n, batch)
  if progress:
    from tqdm import tqdm

    starts = tqdm(starts, desc="sampling", unit="batch")
  for start in starts:
    lab, sd = labels[start:start + batch], seeds[start:start + batch]
    pad = batch - lab.shape[0]
    if pad:
      lab, sd = np.concatenate([lab, np.repeat(lab[-1:], pad)]), np.concatenate([sd, np.repeat(sd[-1:], pad)])
    images = sampler(lab, sd, cfg=cfg)["images"]
    if jax.process_count() > 1:  # a mesh over several processes: every process gets the whole batch
      from jax.experimental import multihost_utils

      images = multihost_utils.process_allgather(images, tiled=True)
    out.append(np.asarray(jax.device_get(images))[:batch - pad])
  return np.concatenate(out)
