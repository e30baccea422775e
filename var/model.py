"""The VAR next-scale transformer (FoundationVision/VAR `models/var.py`, `models/basic_var.py`) in Flax NNX.

Numerically the official model (specs/VAR.md section 2); structurally a JAX model:
* the `depth` AdaLN self-attention blocks are ONE stacked module (every parameter has a leading "layers" axis,
  built with `nnx.vmap`) applied with `lax.scan`, so compile time does not grow with depth;
* parameters carry logical axis names (`nnx.with_partitioning`); construct under `nnx.use_eager_sharding(False)`
  when no mesh is active, or under `jax.set_mesh` + `nnx.logical_axis_rules` for eager sharding;
* activations run in `config.dtype` (float32 for parity, bfloat16 for speed) with float32 parameters; the input
  embeddings, LayerNorm statistics, softmax and the head stay in float32 like the official autocast code.

Parameter names mirror the official state dict (`blocks.attn.mat_qkv` for `blocks.{i}.attn.mat_qkv.weight`, ...);
`var/official.py` converts in both directions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
MAX_LOG_SCALE_MUL = math.log(100.0)  # the learned per-head attention temperature is clamped at 100

# Per-model init_adaln_gamma (train arg --alng) of the official README recipes (VAR.md section 3).
_RECIPE_ALNG = {16: 1e-3, 20: 1e-3, 24: 1e-4, 30: 1e-5, 36: 5e-6}


@dataclasses.dataclass(frozen=True)
class VARConfig:
  """Hyper-parameters of a VAR transformer. `from_depth` reproduces the official `build_vae_var`."""
  depth: int = 16
  width: int = 1024  # C (= D, the condition width)
  num_heads: int = 16
  mlp_ratio: float = 4.0
  vocab_size: int = 4096  # V, the VQVAE codebook size
  z_channels: int = 32  # Cvae
  patch_nums: tuple[int, ...] = PATCH_NUMS_256
  num_classes: int = 1000
  shared_aln: bool = False
  attn_l2_norm: bool = True
  drop_path_rate: float = 0.1 * 16 / 24
  norm_eps: float = 1e-6
  cond_drop_rate: float = 0.1  # used by the trainer; the forward only drops classes when asked explicitly
  init_adaln: float = 0.5
  init_adaln_gamma: float = 1e-5
  init_head: float = 0.02
  init_std: float = -1.0  # < 0: sqrt(1 / (3 C))
  dtype: str = "float32"  # activation dtype ("float32" or "bfloat16"); parameters are always float32

  def __post_init__(self):
    object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype {self.dtype!r} must be 'float32' or 'bfloat16'")

  @classmethod
  def from_depth(cls, depth: int, **overrides) -> VARConfig:
    """The official builder: width 64*depth, depth heads (head_dim 64), MLP 4x, drop_path 0.1*depth/24."""
    kw = dict(depth=depth, width=64 * depth, num_heads=depth, mlp_ratio=4.0, drop_path_rate=0.1 * depth / 24)
    kw.update(overrides)
    return cls(**kw)

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def mlp_hidden(self) -> int:
    return round(self.width * self.mlp_ratio)

  @property
  def first_l(self) -> int:
    return self.patch_nums[0] ** 2

  @property
  def seq_len(self) -> int:
    """L = sum of pn^2 over the scales."""
    return sum(p * p for p in self.patch_nums)

  @property
  def begin_ends(self) -> tuple[tuple[int, int], ...]:
    """[begin, end) token range of every scale."""
    out, cur = [], 0
    for p in self.patch_nums:
      out.append((cur, cur + p * p))
      cur += p * p
    return tuple(out)

  @property
  def std(self) -> float:
    """The effective init std of Linear / Embedding weights."""
    return self.init_std if self.init_std > 0 else math.sqrt(1 / self.width / 3)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["patch_nums"] = list(self.patch_nums)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> VARConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown VARConfig fields {unknown}; known: {sorted(names)}")
    return cls(**d)


def preset(name: str, **overrides) -> VARConfig:
  """Released models: 'd16', 'd20', 'd24', 'd30' (256px) and 'd36' (512px, shared AdaLN); 'tiny' = fixture T1.

  Presets use the README recipe's init_adaln_gamma (only relevant when training from scratch)."""
  if name == "tiny":
    kw = dict(depth=2, width=64, num_heads=4, vocab_size=64, z_channels=8, patch_nums=(1, 2, 3, 4), num_classes=10,
              drop_path_rate=0.1 * 2 / 24)
    kw.update(overrides)
    return VARConfig(**kw)
  depths = {"d16": 16, "d20": 20, "d24": 24, "d30": 30, "d36": 36}
  if name not in depths:
    raise ValueError(f"unknown VAR preset {name!r}; choose one of {sorted(depths) + ['tiny']}")
  depth = depths[name]
  kw = dict(init_adaln_gamma=_RECIPE_ALNG[depth])
  if depth == 36:
    kw.update(shared_aln=True, patch_nums=PATCH_NUMS_512)
  kw.update(overrides)
  return VARConfig.from_depth(depth, **kw)


# ----------------------------------------------------------------------------------------------------------------
# Initialisers (VAR.md 2.9). torch's trunc_normal_(std=s) truncates at the ABSOLUTE bounds +-2, i.e. at +-2/s
# standard deviations: effectively a plain normal for the small stds used here, but we keep the exact bounds.

def trunc_normal(std: float, scale: float = 1.0) -> Callable:
  def init(key, shape, dtype=jnp.float32):
    return (jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, jnp.float32) * (std * scale)).astype(dtype)
  return init


def adaln_kernel_init(std: float, width: int, init_adaln: float, init_adaln_gamma: float) -> Callable:
  """(D, 6C) kernel: output columns [0, 2C) (gamma1, gamma2) scaled by init_adaln_gamma, the rest by init_adaln."""
  def init(key, shape, dtype=jnp.float32):
    w = jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, jnp.float32) * std
    col_scale = jnp.where(jnp.arange(shape[-1]) < 2 * width, init_adaln_gamma, init_adaln)
    return (w * col_scale).astype(dtype)
  return init


def _part(init: Callable, names: Sequence[str | None]) -> Callable:
  return nnx.with_partitioning(init, tuple(names))


def _zeros(names):
  return _part(nnx.initializers.zeros_init(), names)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm without affine parameters, two-pass statistics in float32 (torch's formula)."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def drop_path(x: jax.Array, rate, rng: jax.Array | None) -> jax.Array:
  """Per-sample stochastic depth scaled by 1/keep (timm `drop_path`); identity when rng is None."""
  if rng is None:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


# A function that receives this call's keys and values (B, n, H, hd) and returns the keys and values to attend to:
# identity for the teacher-forced forward, "write into the KV cache and read the cached prefix" in the sampler.
KVFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
# A function that observes one attention call (for KV-cache compression and its calibration): called with keyword
# arrays q (B, n, H, hd) as attention uses them, q_raw (B, n, H, hd) = x W_q without bias / norm / temperature,
# k, v (B, n_kv, H, hd) as attended to (after kv_fn), and the python float logit_scale (logits = q.k * scale).
Probe = Callable[..., None]


class SelfAttention(nnx.Module):
  """Multi-head self-attention with q/v biases (no k bias) and optional L2-normalised q/k (VAR.md 2.5)."""

  def __init__(self, config: VARConfig, *, rngs: nnx.Rngs):
    c, std, dt = config.width, config.std, config.compute_dtype
    self.num_heads, self.head_dim, self.l2_norm = config.num_heads, config.head_dim, config.attn_l2_norm
    self.mat_qkv = nnx.Linear(c, 3 * c, use_bias=False, dtype=dt,
                              kernel_init=_part(trunc_normal(std), ("embed", "heads")), rngs=rngs)
    self.q_bias = nnx.Param(_zeros(("heads",))(rngs.params(), (c,)))
    self.v_bias = nnx.Param(_zeros(("heads",))(rngs.params(), (c,)))
    if self.l2_norm:
      # log of the per-head temperature, initialised at ln 4 (official shape (1, H, 1, 1))
      self.scale_mul_1H11 = nnx.Param(
        _part(nnx.initializers.constant(math.log(4.0)), (None, None, None, None))(rngs.params(),
                                                                                (1, config.num_heads, 1, 1)))
    proj_std = trunc_normal(std, 1 / math.sqrt(2 * config.depth))
    self.proj = nnx.Linear(c, c, dtype=dt, kernel_init=_part(proj_std, ("heads", "embed")),
                           bias_init=_zeros(("embed",)), rngs=rngs)

  def __call__(self, x: jax.Array, attn_bias: jax.Array | None = None, kv_fn: KVFn | None = None,
               probe: Probe | None = None) -> jax.Array:
    b, n, c = x.shape
    h, hd = self.num_heads, self.head_dim
    zero = jnp.zeros_like(self.q_bias[...])
    bias = jnp.concatenate([self.q_bias[...], zero, self.v_bias[...]]).astype(x.dtype)
    qkv_raw = self.mat_qkv(x)
    qkv = (qkv_raw + bias).reshape(b, n, 3, h, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, n, H, hd)
    if self.l2_norm:
      scale_mul = jnp.exp(jnp.minimum(self.scale_mul_1H11[...], MAX_LOG_SCALE_MUL)).reshape(1, 1, h, 1)
      q = (_l2_normalize(q) * scale_mul).astype(x.dtype)
      k = _l2_normalize(k).astype(x.dtype)
      scale = 1.0
    else:
      scale = 0.25 / math.sqrt(hd)  # official: 4x smaller than the usual 1/sqrt(hd)
    if kv_fn is not None:
      k, v = kv_fn(k, v)  # (B, n_kv, H, hd)
    if probe is not None:
      probe(q=q, q_raw=qkv_raw.reshape(b, n, 3, h, hd)[:, :, 0], k=k, v=v, logit_scale=scale)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if attn_bias is not None:
      logits = logits + attn_bias
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, c)
    return self.proj(out)


def _l2_normalize(x: jax.Array) -> jax.Array:
  """torch F.normalize: x / max(||x||, 1e-12) over the last axis, in float32."""
  x32 = x.astype(jnp.float32)
  return x32 / jnp.maximum(jnp.linalg.norm(x32, axis=-1, keepdims=True), 1e-12)


class FFN(nnx.Module):
  """fc1 -> GELU (tanh approximation) -> fc2."""

  def __init__(self, config: VARConfig, *, rngs: nnx.Rngs):
    c, hidden, std, dt = config.width, config.mlp_hidden, config.std, config.compute_dtype
    self.fc1 = nnx.Linear(c, hidden, dtype=dt, kernel_init=_part(trunc_normal(std), ("embed", "mlp")),
                          bias_init=_zeros(("mlp",)), rngs=rngs)
    fc2_init = trunc_normal(std, 1 / math.sqrt(2 * config.depth))
    self.fc2 = nnx.Linear(hidden, c, dtype=dt, kernel_init=_part(fc2_init, ("mlp", "embed")),
                          bias_init=_zeros(("embed",)), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class AdaLNSelfAttn(nnx.Module):
  """One transformer block: AdaLN-modulated attention and FFN with gated residuals (VAR.md 2.4).

  Built once per layer inside `nnx.vmap`, so in `VAR.blocks` every parameter is stacked along "layers"."""

  def __init__(self, config: VARConfig, *, rngs: nnx.Rngs):
    c = config.width
    self.eps, self.width, self.shared_aln = config.norm_eps, c, config.shared_aln
    if config.shared_aln:
      # per-block offsets added to the shared modulation; gammas (first two rows) start tiny
      gss_scale = jnp.array([config.init_adaln_gamma] * 2 + [config.init_adaln] * 4).reshape(1, 1, 6, 1)
      gss_init = lambda key, shape, dtype=jnp.float32: jax.random.normal(key, shape, dtype) / math.sqrt(c) * gss_scale
      self.ada_gss = nnx.Param(_part(gss_init, (None, None, None, "embed"))(rngs.params(), (1, 1, 6, c)))
    else:
      kinit = adaln_kernel_init(config.std, c, config.init_adaln, config.init_adaln_gamma)
      self.ada_lin = nnx.Linear(c, 6 * c, dtype=config.compute_dtype, kernel_init=_part(kinit, ("embed", "adaln")),
                                bias_init=_zeros(("adaln",)), rngs=rngs)
    self.attn = SelfAttention(config, rngs=rngs)
    self.ffn = FFN(config, rngs=rngs)

  def modulation(self, cond: jax.Array) -> jax.Array:
    """(B, 6, C) = (gamma1, gamma2, scale1, scale2, shift1, shift2) from SiLU(cond) (B, D) or, with shared AdaLN,
    from the shared modulation (B, 6, C)."""
    if self.shared_aln:
      return (self.ada_gss[...][0] + cond).astype(cond.dtype)
    return self.ada_lin(cond).reshape(-1, 6, self.width)

  def attn_branch(self, x: jax.Array, mod: jax.Array, *, attn_bias: jax.Array | None = None,
                  kv_fn: KVFn | None = None, probe: Probe | None = None) -> jax.Array:
    """What the attention sub-layer adds to the residual stream x (B, n, C): gamma1 * attn(AdaLN(x)).
    mod (B, 1, 6, C) = modulation(cond)[:, None]."""
    h = layer_norm(x, self.eps) * (1 + mod[:, :, 2]) + mod[:, :, 4]
    return self.attn(h, attn_bias, kv_fn, probe) * mod[:, :, 0]

  def ffn_branch(self, x: jax.Array, mod: jax.Array) -> jax.Array:
    """What the FFN sub-layer adds to the residual stream x (B, n, C): gamma2 * ffn(AdaLN(x))."""
    h = layer_norm(x, self.eps) * (1 + mod[:, :, 3]) + mod[:, :, 5]
    return self.ffn(h) * mod[:, :, 1]

  def __call__(self, x: jax.Array, cond: jax.Array, *, attn_bias: jax.Array | None = None,
               drop_rate=0.0, rng: jax.Array | None = None, kv_fn: KVFn | None = None,
               probe: Probe | None = None) -> jax.Array:
    """x (B, n, C); cond as in `modulation`; rng (per layer) enables drop path; kv_fn / probe see
    SelfAttention. The sampler calls the two branches itself (token pruning runs them on a subset)."""
    mod = self.modulation(cond)[:, None]  # (B, 1, 6, C) = gamma1, gamma2, scale1, scale2, shift1, shift2
    rng_attn, rng_ffn = (None, None) if rng is None else tuple(jax.random.split(rng))
    x = x + drop_path(self.attn_branch(x, mod, attn_bias=attn_bias, kv_fn=kv_fn, probe=probe), drop_rate, rng_attn)
    x = x + drop_path(self.ffn_branch(x, mod), drop_rate, rng_ffn)
    return x


class AdaLNBeforeHead(nnx.Module):
  """LayerNorm modulated by (scale, shift) = Linear(SiLU(cond)) before the logits head."""

  def __init__(self, config: VARConfig, *, rngs: nnx.Rngs):
    c = config.width
    self.eps, self.width = config.norm_eps, c
    self.ada_lin = nnx.Linear(c, 2 * c, kernel_init=_part(trunc_normal(config.std, config.init_adaln),
                                                          ("embed", "adaln")),
                              bias_init=_zeros(("adaln",)), rngs=rngs)

  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    scale, shift = jnp.split(self.ada_lin(jax.nn.silu(cond)).reshape(-1, 1, 2, self.width), 2, axis=2)
    return layer_norm(x, self.eps) * (1 + scale[:, :, 0]) + shift[:, :, 0]


def level_index(patch_nums: Sequence[int]) -> np.ndarray:
  """(L,) scale index of every token (the official `lvl_1L` buffer without its leading axis)."""
  return np.concatenate([np.full(p * p, i, np.int32) for i, p in enumerate(patch_nums)])


def block_causal_bias(patch_nums: Sequence[int]) -> np.ndarray:
  """(L, L) float32 attention bias: 0 where lvl(query) >= lvl(key), -inf elsewhere."""
  lvl = level_index(patch_nums)
  return np.where(lvl[:, None] >= lvl[None, :], 0.0, -np.inf).astype(np.float32)


class VAR(nnx.Module):
  """Class-conditional next-scale prediction transformer.

  `model(labels, x_BLCv_wo_first_l)` is the teacher-forced training forward; the pieces (`condition`,
  `embed_inputs`, `run_blocks`, `logits`) are also used by the KV-cached sampler in var/sampler.py."""

  def __init__(self, config: VARConfig, *, rngs: nnx.Rngs):
    self.config = config
    c, std, s = config.width, config.std, len(config.patch_nums)
    pos_std = math.sqrt(1 / c / 3)  # constructor init, independent of init_std
    self.word_embed = nnx.Linear(config.z_channels, c, kernel_init=_part(trunc_normal(std), ("latent", "embed")),
                                 bias_init=_zeros(("embed",)), rngs=rngs)
    # row num_classes is the null (unconditional) class
    self.class_emb = nnx.Embed(config.num_classes + 1, c, embedding_init=_part(trunc_normal(std), ("classes", "embed")),
                               rngs=rngs)
    pos_init = _part(trunc_normal(pos_std), (None, None, "embed"))
    self.pos_start = nnx.Param(pos_init(rngs.params(), (1, config.first_l, c)))
    self.pos_1LC = nnx.Param(pos_init(rngs.params(), (1, config.seq_len, c)))
    self.lvl_embed = nnx.Embed(s, c, embedding_init=_part(trunc_normal(std), (None, "embed")), rngs=rngs)
    if config.shared_aln:
      self.shared_ada_lin = nnx.Linear(c, 6 * c, dtype=config.compute_dtype,
                                       kernel_init=_part(trunc_normal(std), ("embed", "adaln")),
                                       bias_init=_zeros(("adaln",)), rngs=rngs)

    @nnx.split_rngs(splits=config.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return AdaLNSelfAttn(config, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.head_nm = AdaLNBeforeHead(config, rngs=rngs)
    self.head = nnx.Linear(c, config.vocab_size, kernel_init=_part(trunc_normal(std, config.init_head),
                                                                   ("embed", "vocab")),
                           bias_init=_zeros(("vocab",)), rngs=rngs)

  # -- pieces shared by the training forward and the sampler ---------------------------------------------------

  def condition(self, labels: jax.Array) -> jax.Array:
    """(B,) int labels (num_classes = null class) -> cond_BD (B, C) float32."""
    return self.class_emb(labels)

  def block_condition(self, cond_BD: jax.Array) -> jax.Array:
    """What every block's AdaLN consumes: SiLU(cond) (B, C), or the shared modulation (B, 6, C)."""
    c = jax.nn.silu(cond_BD).astype(self.config.compute_dtype)
    if self.config.shared_aln:
      return self.shared_ada_lin(c).reshape(-1, 6, self.config.width)
    return c

  def level_pos(self) -> jax.Array:
    """(1, L, C) lvl_embed(lvl_1L) + pos_1LC."""
    lvl = jnp.asarray(level_index(self.config.patch_nums))
    return self.lvl_embed(lvl)[None] + self.pos_1LC[...]

  def first_tokens(self, cond_BD: jax.Array) -> jax.Array:
    """(B, first_l, C) float32: the start token map (condition + pos_start + level/position embedding)."""
    first_l = self.config.first_l
    sos = cond_BD[:, None, :] + self.pos_start[...]
    return sos + self.level_pos()[:, :first_l]

  def embed_scale(self, x_BlCv: jax.Array, begin: int) -> jax.Array:
    """Next-scale input (B, l, Cvae) of the scale starting at token `begin` -> (B, l, C) float32."""
    x = self.word_embed(x_BlCv.astype(jnp.float32))
    return x + self.level_pos()[:, begin:begin + x.shape[1]]

  def embed_inputs(self, cond_BD: jax.Array, x_BLCv_wo_first_l: jax.Array) -> jax.Array:
    """Teacher-forcing input (B, L - first_l, Cvae) -> block input (B, L, C) float32 (= fixture h_embed)."""
    sos = jnp.broadcast_to(cond_BD[:, None, :] + self.pos_start[...],
                           (cond_BD.shape[0], self.config.first_l, self.config.width))
    x = jnp.concatenate([sos, self.word_embed(x_BLCv_wo_first_l.astype(jnp.float32))], axis=1)
    return x + self.level_pos()[:, :x.shape[1]]

  def layer_modulations(self, block_cond: jax.Array) -> jax.Array:
    """Every block's AdaLN modulation of `block_condition`'s output -> (depth, B, 1, 6, C). The sampler computes
    it once per call instead of inside every scale's layer scan: the condition does not change across scales,
    and at small scales re-reading each layer's 6C x C AdaLN kernel costs more than the scale's own work."""
    graphdef, state = nnx.split(self.blocks)
    return jax.lax.map(lambda layer_state: nnx.merge(graphdef, layer_state).modulation(block_cond)[:, None], state)

  def run_blocks(self, x: jax.Array, block_cond: jax.Array, *, attn_bias: jax.Array | None = None,
                 rng: jax.Array | None = None) -> jax.Array:
    """All blocks via lax.scan over the stacked layers; rng enables drop path (per-layer linspace rates)."""
    graphdef, state = nnx.split(self.blocks)
    cfg = self.config
    rates = jnp.asarray(np.linspace(0.0, cfg.drop_path_rate, cfg.depth), jnp.float32)
    keys = None if rng is None else jax.random.split(rng, cfg.depth)

    def body(h, xs):
      layer_state, rate, key = xs
      block = nnx.merge(graphdef, layer_state)
      return block(h, block_cond, attn_bias=attn_bias, drop_rate=rate, rng=key), None

    x, _ = jax.lax.scan(body, x.astype(cfg.compute_dtype), (state, rates, keys))
    return x

  def logits(self, h: jax.Array, cond_BD: jax.Array) -> jax.Array:
    """Block output (B, n, C) -> logits (B, n, V) float32 (head in float32 like `get_logits`)."""
    return self.head(self.head_nm(h.astype(jnp.float32), cond_BD.astype(jnp.float32))).astype(jnp.float32)

  # -- the teacher-forced forward -------------------------------------------------------------------------------

  def __call__(self, labels: jax.Array, x_BLCv_wo_first_l: jax.Array, *, cond_drop_rate: float = 0.0,
               rng: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    """Teacher-forced forward: labels (B,), x (B, L - first_l, Cvae) -> logits (B, L', V) float32.

    x may stop early at a scale boundary (progressive training): L' = first_l + x.shape[1].
    Class dropout (labels -> null class with probability cond_drop_rate) only happens when a rate > 0 AND an rng
    are given. (The official forward applies its cond_drop_rate even in eval mode; here eval is clean by default.)
    Drop path only when deterministic=False (needs rng)."""
    if (cond_drop_rate > 0 or not deterministic) and rng is None:
      raise ValueError("class dropout (cond_drop_rate > 0) and drop path (deterministic=False) need an explicit rng")
    rng_cls, rng_drop = (None, None) if rng is None else tuple(jax.random.split(rng))
    if cond_drop_rate > 0:
      drop = jax.random.uniform(rng_cls, labels.shape) < cond_drop_rate
      labels = jnp.where(drop, self.config.num_classes, labels)
    cond_BD = self.condition(labels)
    x = self.embed_inputs(cond_BD, x_BLCv_wo_first_l)
    n = x.shape[1]
    bias = jnp.asarray(block_causal_bias(self.config.patch_nums)[:n, :n])
    x = self.run_blocks(x, self.block_condition(cond_BD), attn_bias=bias,
                        rng=None if deterministic else rng_drop)
    return self.logits(x, cond_BD)


def cross_entropy_loss(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0,
                       weights: jax.Array | None = None) -> jax.Array:
  """The official training loss: per-token CE (torch label smoothing: (1-eps)*NLL + eps*mean_v(-log p_v)),
  weighted by `weights` (B, L) (default uniform 1/L), summed over tokens, averaged over the batch.

  logits (B, L, V) float32, targets (B, L) int -> scalar."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  loss = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1) if label_smoothing else nll
  if weights is None:
    weights = jnp.full(loss.shape, 1.0 / loss.shape[1], jnp.float32)
  return (loss * weights).sum(-1).mean()


def build(config: VARConfig, seed: int = 0) -> VAR:
  """Builds a VAR without a mesh (parameters keep their logical-axis metadata for later sharding)."""
  with nnx.use_eager_sharding(False):
    return VAR(config, rngs=nnx.Rngs(seed))


def abstract(config: VARConfig) -> VAR:
  """The model with ShapeDtypeStruct leaves: shapes and parameter counts without allocating."""
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: VAR(config, rngs=nnx.Rngs(0)))


def param_count(model: VAR) -> int:
  """Number of parameters (works on abstract models)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
