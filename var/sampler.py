"""The jitted VAR sampler (official `VAR.autoregressive_infer_cfg`) with a ScalePlan-driven loop.

One `jax.jit` function per static sampling setup (SamplingConfig, ScalePlan, batch, edit on/off):
* a Python loop over the scales (every scale has its own static token count),
* `lax.scan` over the stacked layers inside each scale,
* a preallocated KV cache per model, (depth, rows, L, heads, head_dim), written in place with
  `dynamic_update_slice` and read back as a static prefix; CFG doubles the rows (cond rows, then uncond rows),
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
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var import editing
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

  select[kind](ctx, key) -> (keep,) int32 row indices; ctx is a dict with 'si', 'f_hat' (B, P, P, Cvae),
    'tokens' (list of (B, pn^2)), 'labels' (B,), 'decode' (f_hat -> images in [0, 1]).
  scale_forward(model, x, block_cond, cache, lens, si, step) -> (h (R, n, C), cache, lens): replaces the plain
    cached forward on steps with `prune` set.
  compress_kv(cache, lens, si, step) -> cache: compacts every layer l to step.kv_capacity[l] tokens (kept tokens
    first); the loop then treats only those as valid.
  """
  select: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
  scale_forward: Callable | None = None
  compress_kv: Callable | None = None


# ----------------------------------------------------------------------------------------------------------------
# Token sampling

def mask_top_k_top_p(logits: jax.Array, top_k: int = 0, top_p: float = 0.0) -> jax.Array:
  """Official `sample_with_top_k_top_p_` masking on (..., V) logits: -inf below the k-th largest value (ties with
  it are kept), then -inf on the ascending-sorted entries whose cumulative softmax is <= 1 - top_p (the largest
  entry is always kept)."""
  v = logits.shape[-1]
  if top_k > v:
    raise ValueError(f"top_k={top_k} exceeds the vocabulary size {v}")
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p > 0:
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    remove = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1) <= 1 - top_p
    remove = remove.at[..., -1].set(False)
    remove = jnp.take_along_axis(remove, jnp.argsort(order, axis=-1), axis=-1)  # back to vocabulary order
    logits = jnp.where(remove, -jnp.inf, logits)
  return logits


def sample_tokens(logits: jax.Array, keys: jax.Array, sampling: SamplingConfig, ratio: float,
                  codebook: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits (B, n, V) float32, keys (B,) per-sample -> (tokens (B, n) int32, h (B, n, Cvae) embeddings).

  more_smooth: the token is still drawn, but h = softmax((masked * (1 + ratio) + Gumbel) / tau) @ codebook with
  tau = max(0.27 (1 - 0.95 ratio), 0.005), the official visualisation trick."""
  masked = mask_top_k_top_p(logits, sampling.top_k, sampling.top_p)
  scaled = masked / sampling.temperature if sampling.temperature != 1.0 else masked

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
# The cached transformer forward of one scale

def new_cache(model: VAR, rows: int) -> dict[str, jax.Array]:
  """Zero KV cache (depth, rows, L, heads, head_dim) in the model's activation dtype."""
  c = model.config
  shape = (c.depth, rows, c.seq_len, c.num_heads, c.head_dim)
  return {"k": jnp.zeros(shape, c.compute_dtype), "v": jnp.zeros(shape, c.compute_dtype)}


def cached_forward(model: VAR, x: jax.Array, block_cond: jax.Array, cache: dict[str, jax.Array],
                   lens: tuple[int, ...], attn_bias: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Runs all blocks on x (R, n, C) for the first R cache rows: layer l writes its keys/values at its valid length
  lens[l] (dynamic_update_slice) and attends to the static prefix [0, max(lens) + n) read back from the updated
  cache (positions past its own lens[l] + n are masked).

  attn_bias (n, max(lens) + n) is only needed for a multi-scale prefill (block-causal); a single scale attends to
  everything cached plus itself, like the official KV-cached inference."""
  graphdef, state = nnx.split(model.blocks)
  r, n, _ = x.shape
  depth, _, _, heads, hd = cache["k"].shape
  read = max(lens) + n
  if len(set(lens)) > 1:  # per-layer capacities (ScaleKV): mask each layer's unused slots
    pos = jnp.arange(read)
    valid = pos[None, :] < (jnp.asarray(lens)[:, None] + n)  # (depth, read)
    layer_bias = jnp.where(valid, 0.0, -jnp.inf)[:, None, :]  # (depth, 1, read)
  else:
    layer_bias = jnp.zeros((depth, 1, 0))

  def body(carry, xs):
    h, k_all, v_all = carry
    layer_state, layer, offset, lbias = xs
    block = nnx.merge(graphdef, layer_state)
    box = {}

    def kv_fn(k, v):  # (R, n, H, hd)
      box["k"] = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), (layer, 0, offset, 0, 0))
      box["v"] = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), (layer, 0, offset, 0, 0))
      if read == n:  # nothing cached yet: attend to this call's keys (reading them back made XLA copy the cache)
        return k, v
      size = (1, r, read, heads, hd)
      k_read = jax.lax.dynamic_slice(box["k"], (layer, 0, 0, 0, 0), size)[0].astype(k.dtype)
      v_read = jax.lax.dynamic_slice(box["v"], (layer, 0, 0, 0, 0), size)[0].astype(v.dtype)
      return k_read, v_read

    bias = attn_bias
    if lbias.shape[-1]:
      bias = lbias if bias is None else bias + lbias
    h = block(h, block_cond, attn_bias=bias, kv_fn=kv_fn)
    return (h, box["k"], box["v"]), None

  xs = (state, jnp.arange(depth), jnp.asarray(lens, jnp.int32), layer_bias)
  (h, k_all, v_all), _ = jax.lax.scan(body, (x.astype(model.config.compute_dtype), cache["k"], cache["v"]), xs)
  return h, {"k": k_all, "v": v_all}


# ----------------------------------------------------------------------------------------------------------------
# The sampling loop

def _take_rows(tree, idx):
  return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), tree)


def sample_loop(models: Mapping[str, VAR], vae, labels: jax.Array, seeds: jax.Array, *, sampling: SamplingConfig,
                plan: ScalePlan, hooks: SamplerHooks | None = None, edit: Mapping[str, jax.Array] | None = None,
                cfg: jax.Array | float | None = None, return_logits: bool = False) -> dict[str, Any]:
  """The traced sampler body (call it inside jit). labels (B,) int (num_classes = unconditional), seeds (B,)
  uint32; edit = {'tokens': (B, L) int, 'mask': (B, P, P) float, 1 = keep the given tokens}; cfg (a traced scalar
  is fine) overrides sampling.cfg, so one executable serves every guidance scale.

  Returns {'images': (B', H, W, 3) in [0, 1], 'tokens': (B', L) int32, 'f_hat': (B', P, P, Cvae)} (B' = the plan's
  output batch); with return_logits also 'logits' (B', L, V), the CFG-mixed logits the tokens were drawn from,
  and 'cond_logits', the conditional rows' raw logits."""
  hooks = hooks or SamplerHooks()
  guidance = sampling.cfg if cfg is None else cfg
  mcfg = models[plan[0].model].config
  patch_nums, s = mcfg.patch_nums, len(mcfg.patch_nums)
  begin_ends = mcfg.begin_ends
  b = labels.shape[0]
  null = jnp.full_like(labels, mcfg.num_classes)
  codebook = vae.quantize.codebook()
  cvae, p = mcfg.z_channels, patch_nums[-1]

  caches = {name: new_cache(m, 2 * b if plan[0].cfg_on else b) for name, m in models.items()
            if name in plan.models}
  lens = {name: (0,) * models[name].config.depth for name in caches}  # static valid length per layer
  f_hat = jnp.zeros((b, p, p, cvae), jnp.float32)
  x_hist: list[jax.Array] = []  # next-scale inputs (B, pn^2, Cvae) of scales 1.. (a new model's prefill)
  tokens: list[jax.Array] = []
  logits_out: list[jax.Array] = []
  cond_logits_out: list[jax.Array] = []
  base_keys = jax.vmap(jax.random.key)(seeds.astype(jnp.uint32))
  edit_tokens = None if edit is None else _split_tokens(edit["tokens"], patch_nums)
  prev_model = None

  for si, (step, pn) in enumerate(zip(plan.steps, patch_nums, strict=True)):
    beg, end = begin_ends[si]
    ratio = si / (s - 1) if s > 1 else 0.0
    model = models[step.model]
    all_labels = jnp.concatenate([labels, null]) if step.cfg_on else labels
    cond = model.condition(all_labels)
    block_cond = model.block_condition(cond)
    cache, mlens = caches[step.model], lens[step.model]

    if step.model != prev_model and si > 0:
      # hand-over to another model: prefill its cache over every token so far with the block-causal mask
      parts = [model.first_tokens(cond)] + [
        model.embed_scale(_dup(xh, step.cfg_on), begin_ends[j + 1][0]) for j, xh in enumerate(x_hist)]
      x = jnp.concatenate(parts, axis=1)  # (R, end, C)
      bias = jnp.asarray(block_causal_bias(patch_nums)[:end, :end])
      h, cache = cached_forward(model, x, block_cond, cache, (0,) * model.config.depth, attn_bias=bias)
      h = h[:, beg:]
      mlens = (end,) * model.config.depth
    else:
      x = model.first_tokens(cond) if si == 0 else model.embed_scale(_dup(x_hist[-1], step.cfg_on), beg)
      if step.prune is not None:
        h, cache, mlens = hooks.scale_forward(model, x, block_cond, cache, mlens, si, step)
      else:
        h, cache = cached_forward(model, x, block_cond, cache, mlens)
        mlens = tuple(length + (end - beg) for length in mlens)
    if step.kv_capacity is not None:
      cache = hooks.compress_kv(cache, mlens, si, step)
      mlens = tuple(min(length, c) for length, c in zip(mlens, step.kv_capacity, strict=True))
    prev_model = step.model

    logits = model.logits(h, cond)  # (R, pn^2, V)
    if return_logits:
      cond_logits_out.append(logits[:b])
    if step.cfg_on:
      t = guidance * ratio
      logits = (1 + t) * logits[:b] - t * logits[b:]
    if return_logits:
      logits_out.append(logits)
    keys = jax.vmap(lambda k, si=si: jax.random.fold_in(k, si))(base_keys)
    idx, h_emb = sample_tokens(logits, keys, sampling, ratio, codebook)
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

    # drop the uncond rows of every cache when CFG switches off from the next scale on
    caches[step.model], lens[step.model] = cache, mlens
    if si < s - 1 and step.cfg_on and not plan[si + 1].cfg_on:
      caches = {k: _cache_rows(c, jnp.arange(b)) for k, c in caches.items()}

    if step.select is not None:
      ctx = dict(si=si, f_hat=f_hat, tokens=list(tokens), labels=labels,
                 decode=lambda fh: (vae.fhat_to_img(fh) + 1) / 2)
      # the selection key follows the first candidate's seed (selection is a batch-level decision)
      keep_idx = hooks.select[step.select.kind](ctx, jax.random.fold_in(base_keys[0], 10_000 + si))
      keep_idx = keep_idx.astype(jnp.int32)
      cfg_rows = step.cfg_on if si == s - 1 else plan[si + 1].cfg_on
      row_idx = jnp.concatenate([keep_idx, keep_idx + b]) if cfg_rows else keep_idx
      caches = {k: _cache_rows(c, row_idx) for k, c in caches.items()}
      f_hat, labels, base_keys = _take_rows((f_hat, labels, base_keys), keep_idx)
      tokens, x_hist, logits_out, cond_logits_out = (
        _take_rows(lst, keep_idx) for lst in (tokens, x_hist, logits_out, cond_logits_out))
      if edit is not None:
        edit = _take_rows(edit, keep_idx)
        edit_tokens = _take_rows(edit_tokens, keep_idx)
      b = step.select.keep
      null = null[:b]

  images = (vae.fhat_to_img(f_hat) + 1) / 2
  out = {"images": images, "tokens": jnp.concatenate(tokens, axis=1), "f_hat": f_hat}
  if return_logits:
    out["logits"] = jnp.concatenate(logits_out, axis=1)
    out["cond_logits"] = jnp.concatenate(cond_logits_out, axis=1)
  return out


def _cache_rows(cache: dict[str, jax.Array], rows: jax.Array) -> dict[str, jax.Array]:
  """Keeps the given rows (axis 1) of a (depth, rows, L, H, hd) cache."""
  return {k: jnp.take(a, rows, axis=1) for k, a in cache.items()}


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
  FSDP-sharded per the rules); results do not depend on the device count.
  """

  def __init__(self, var: VAR | Mapping[str, VAR], vae, sampling: SamplingConfig = SamplingConfig(), *,
               plan: ScalePlan | None = None, hooks: SamplerHooks | None = None, mesh=None,
               return_logits: bool = False):
    self.models = {"main": var} if isinstance(var, VAR) else dict(var)
    main = self.models.get("main", next(iter(self.models.values())))
    self.config = main.config
    for name, m in self.models.items():
      c = m.config
      if (c.patch_nums, c.vocab_size, c.z_channels) != (self.config.patch_nums, self.config.vocab_size,
                                                          self.config.z_channels):
        raise ValueError(f"model {name!r} has patch_nums/vocab/z_channels {c.patch_nums, c.vocab_size, c.z_channels}"
                         f", unlike {self.config.patch_nums, self.config.vocab_size, self.config.z_channels}")
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
    return sample_loop(models, vae, labels, seeds, sampling=self.sampling, plan=self.plan_for(labels.shape[0]),
                       hooks=self.hooks, edit=edit, cfg=cfg, return_logits=self.return_logits)

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
