"""Multi-scale residual vector quantizer (the official `VectorQuantizer2`), NHWC.

Feature maps are (B, P, P, Cvae) with P = patch_nums[-1]; tokens of scale si are (B, pn_si**2) int32,
row-major. A scale's residual is quantised at pn x pn ('area' down), its codes are brought back to P x P
('bicubic' up, except at the last scale) and refined by a 3x3-conv phi before being added to f_hat
(VAR.md 1.6).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tokenizer import layers
from tokenizer.resample import area_resize, bicubic_resize


def phi_ticks(k: int) -> np.ndarray:
  """The official phi ticks: linspace(1/3/K, 1-1/3/K, K) for K == 4, else linspace(1/2/K, 1-1/2/K, K)."""
  if k == 4:
    return np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k)
  return np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)


def phi_indices(num_scales: int, share_quant_resi: int) -> tuple[int, ...]:
  """Index of the phi conv used at each scale, exactly as the official float64 argmin.

  share_quant_resi 0: one phi per scale (K = num_scales, ticks rule applied); 1: one shared phi; K > 1: K phis
  picked by argmin |tick_k - si / (S - 1)| (first minimum; float64 rounding breaks the real-arithmetic ties).
  """
  if num_scales < 2:
    raise ValueError(f"the multi-scale quantizer needs at least 2 scales, got {num_scales}")
  if share_quant_resi == 1:
    return (0,) * num_scales
  k = num_scales if share_quant_resi == 0 else share_quant_resi
  ticks = phi_ticks(k)
  return tuple(int(np.argmin(np.abs(ticks - si / (num_scales - 1)))) for si in range(num_scales))


class Phi(nnx.Conv):
  """phi(h) = (1 - r) * h + r * conv3x3(h), r = |quant_resi| (torch `Phi`, itself a Conv2d)."""

  def __init__(self, ch: int, quant_resi: float, *, dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(
      ch,
      ch,
      kernel_size=(3, 3),
      padding="SAME",
      kernel_init=nnx.with_partitioning(layers.CONV_INIT, (None, None, "conv_in", "conv_out")),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
      dtype=dtype,
      precision=jax.lax.Precision.HIGHEST,  # the quantizer runs in exact float32, as the official one
      rngs=rngs,
    )
    self.resi_ratio = abs(float(quant_resi))

  def __call__(self, h: jax.Array) -> jax.Array:
    return h * (1.0 - self.resi_ratio) + super().__call__(h) * self.resi_ratio


class PhiShared(nnx.Module):
  """share_quant_resi == 1: a single phi (official key `quant_resi.qresi`)."""

  def __init__(self, qresi: Phi):
    self.qresi = qresi

  def __getitem__(self, k: int) -> Phi:
    return self.qresi


class PhiPartiallyShared(nnx.Module):
  """share_quant_resi == K > 1: K phis (official keys `quant_resi.qresi_ls.{k}`)."""

  def __init__(self, qresi_ls: list[Phi]):
    self.qresi_ls = nnx.List(qresi_ls)

  def __getitem__(self, k: int) -> Phi:
    return self.qresi_ls[k]


class VectorQuantizer(nnx.Module):
  """The official `VectorQuantizer2` (no z-norm unless asked), computing in float32 like the official code."""

  def __init__(
    self,
    *,
    vocab_size: int,
    z_channels: int,
    patch_nums: tuple[int, ...],
    quant_resi: float = 0.5,
    share_quant_resi: int = 4,
    beta: float = 0.25,
    using_znorm: bool = False,
    rngs: nnx.Rngs,
  ):
    self.vocab_size = vocab_size
    self.z_channels = z_channels
    self.patch_nums = tuple(int(p) for p in patch_nums)
    self.beta = float(beta)
    self.using_znorm = bool(using_znorm)
    self.phi_index = phi_indices(len(self.patch_nums), share_quant_resi)
    # Official init (eini = -1): uniform(-1/V, 1/V).
    init = nnx.initializers.uniform(scale=2.0 / vocab_size)
    self.embedding = nnx.Embed(
      vocab_size,
      z_channels,
      embedding_init=nnx.with_partitioning(
        lambda k, s, d: init(k, s, d) - 1.0 / vocab_size, ("codebook", "latent")
      ),
      rngs=rngs,
    )
    # Official: nn.Identity() instead of Phi when |quant_resi| <= 1e-6 (no parameters then).
    if abs(quant_resi) <= 1e-6:
      self.quant_resi = None
    elif share_quant_resi == 0:
      self.quant_resi = nnx.List([Phi(z_channels, quant_resi, rngs=rngs) for _ in self.patch_nums])
    elif share_quant_resi == 1:
      self.quant_resi = PhiShared(Phi(z_channels, quant_resi, rngs=rngs))
    else:
      self.quant_resi = PhiPartiallyShared(
        [Phi(z_channels, quant_resi, rngs=rngs) for _ in range(share_quant_resi)]
      )

  @property
  def num_scales(self) -> int:
    return len(self.patch_nums)

  @property
  def latent_size(self) -> int:
    return self.patch_nums[-1]

  def phi(self, si: int, h: jax.Array) -> jax.Array:
    """The residual refinement phi of scale si on a (B, P, P, Cvae) map."""
    if self.quant_resi is None:
      return h
    return self.quant_resi[self.phi_index[si]](h)

  def codebook(self) -> jax.Array:
    return self.embedding.embedding[...]  # (V, Cvae)

  def embed(self, idx: jax.Array) -> jax.Array:
    """Codebook lookup: int tokens (...,) -> (..., Cvae)."""
    return jnp.take(self.codebook(), idx, axis=0)

  def nearest(self, z: jax.Array) -> jax.Array:
    """Nearest code of each row of z (N, Cvae) -> (N,) int32, first index on ties.

    Official formula ||z||^2 + ||e||^2 - 2 z.e in float32 with a full-precision cross term (TF32/bf16 matmul
    passes would flip near-ties), or cosine similarity with `using_znorm`.
    """
    z = jax.lax.stop_gradient(z.astype(jnp.float32))
    e = jax.lax.stop_gradient(self.codebook().astype(jnp.float32))
    hi = jax.lax.Precision.HIGHEST
    if self.using_znorm:
      zn = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
      en = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
      return jnp.argmax(jnp.matmul(zn, en.T, precision=hi), axis=-1).astype(jnp.int32)
    d = jnp.sum(jnp.square(z), axis=1, keepdims=True) + jnp.sum(jnp.square(e), axis=1)  # (N, V)
    d = d - 2.0 * jnp.matmul(z, e.T, precision=hi)
    return jnp.argmin(d, axis=-1).astype(jnp.int32)

  def _check_f(self, f: jax.Array):
    p = self.latent_size
    if f.ndim != 4 or f.shape[1:] != (p, p, self.z_channels):
      raise ValueError(
        f"expected f of shape (B, {p}, {p}, {self.z_channels}) (patch_nums[-1] = {p}), got {f.shape}; "
        f"the image size must be patch_nums[-1] * downsample"
      )

  def _quantize_scale(self, si: int, f_rest: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Tokens (B, pn^2) of the residual at scale si and their phi-refined contribution h (B, P, P, Cvae)."""
    b, p = f_rest.shape[0], self.latent_size
    pn = self.patch_nums[si]
    last = si == self.num_scales - 1
    z = f_rest if last else area_resize(f_rest, pn)  # (B, pn, pn, Cvae)
    idx = self.nearest(z.reshape(-1, self.z_channels)).reshape(b, pn * pn)
    h = self.embed(idx).reshape(b, pn, pn, self.z_channels)
    if not last:
      h = bicubic_resize(h, p)
    return idx, self.phi(si, h)

  def f_to_idx_or_fhat(self, f: jax.Array, to_fhat: bool = False) -> list[jax.Array]:
    """f (B, P, P, Cvae) -> tokens [(B, pn^2) int32], or the cumulative f_hat (B, P, P, Cvae), per scale."""
    self._check_f(f)
    f = f.astype(jnp.float32)
    f_rest, f_hat = f, jnp.zeros_like(f)
    out = []
    for si in range(self.num_scales):
      idx, h = self._quantize_scale(si, f_rest)
      f_hat = f_hat + h
      f_rest = f_rest - h
      out.append(f_hat if to_fhat else idx)
    return out

  def _tokens_to_map(self, si: int, idx: jax.Array) -> jax.Array:
    pn = self.patch_nums[si]
    if idx.ndim != 2 or idx.shape[1] != pn * pn:
      raise ValueError(f"tokens of scale {si} must have shape (B, {pn * pn}) (pn = {pn}), got {idx.shape}")
    return self.embed(idx).reshape(idx.shape[0], pn, pn, self.z_channels)  # (B, pn, pn, Cvae)

  def idx_to_fhat(self, idx_list, all_scales: bool = False):
    """Tokens of the first len(idx_list) scales -> f_hat = sum_si phi(up(E[idx_si])) (B, P, P, Cvae), float32.

    Returns the final f_hat, or the list of cumulative f_hat after each scale with `all_scales`.
    """
    if not 1 <= len(idx_list) <= self.num_scales:
      raise ValueError(f"expected 1..{self.num_scales} token arrays (one per scale), got {len(idx_list)}")
    p = self.latent_size
    f_hat = None
    out = []
    for si, idx in enumerate(idx_list):
      h = self._tokens_to_map(si, idx).astype(jnp.float32)
      if si != self.num_scales - 1:
        h = bicubic_resize(h, p)
      h = self.phi(si, h)
      f_hat = h if f_hat is None else f_hat + h
      out.append(f_hat)
    return out if all_scales else f_hat

  def idx_to_var_input(self, idx_list) -> jax.Array:
    """Teacher-forcing input (official `idxBl_to_var_input`): (B, L - pn_0^2, Cvae).

    For si < S - 1: f_hat += phi(bicubic(E[idx_si])); emit area(f_hat -> pn_{si+1}) flattened row-major.
    """
    if len(idx_list) != self.num_scales:
      raise ValueError(f"expected {self.num_scales} token arrays (one per scale), got {len(idx_list)}")
    b = idx_list[0].shape[0]
    f_hat = jnp.zeros((b, self.latent_size, self.latent_size, self.z_channels), jnp.float32)
    nexts = []
    for si in range(self.num_scales - 1):
      h = self._tokens_to_map(si, idx_list[si]).astype(jnp.float32)
      f_hat, nxt = self.next_autoregressive_input(si, f_hat, h)
      nexts.append(nxt.reshape(b, -1, self.z_channels))
    return jnp.concatenate(nexts, axis=1)

  def next_autoregressive_input(self, si: int, f_hat: jax.Array, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One sampling step (official `get_next_autoregressive_input`).

    h (B, pn_si, pn_si, Cvae) are the embedded tokens of scale si; returns (f_hat, next) with next the
    cumulative f_hat area-resized to the next scale (B, pn_{si+1}, pn_{si+1}, Cvae), or (f_hat, f_hat) at
    the last scale. Computes in float32 (a bf16 h would round the bicubic resampling).
    """
    if not 0 <= si < self.num_scales:
      raise ValueError(
        f"scale index si={si} is out of range [0, {self.num_scales - 1}] for S={self.num_scales} scales "
        f"(patch_nums {self.patch_nums})"
      )
    h = h.astype(jnp.float32)
    if si != self.num_scales - 1:
      f_hat = f_hat + self.phi(si, bicubic_resize(h, self.latent_size))
      return f_hat, area_resize(f_hat, self.patch_nums[si + 1])
    f_hat = f_hat + self.phi(si, h)
    return f_hat, f_hat

  def __call__(self, f: jax.Array) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
    """Training forward (official `VectorQuantizer2.forward`), float32.

    Returns (f_hat straight-through: value f_hat, gradient to f; vq_loss = mean over scales of
    beta * MSE(sg(f_hat_si), f) + MSE(f_hat_si, sg(f)) on the cumulative f_hat; per-scale tokens).
    """
    self._check_f(f)
    f = f.astype(jnp.float32)
    f_ng = jax.lax.stop_gradient(f)
    f_rest, f_hat = f_ng, jnp.zeros_like(f_ng)
    loss = jnp.zeros((), jnp.float32)
    idx_list = []
    for si in range(self.num_scales):
      idx, h = self._quantize_scale(si, f_rest)
      f_hat = f_hat + h  # gradient reaches the codebook and phi
      f_rest = jax.lax.stop_gradient(f_rest - h)
      loss = loss + self.beta * jnp.mean(jnp.square(jax.lax.stop_gradient(f_hat) - f))
      loss = loss + jnp.mean(jnp.square(f_hat - f_ng))
      idx_list.append(idx)
    loss = loss / self.num_scales
    f_hat_st = (jax.lax.stop_gradient(f_hat) - f_ng) + f
    return f_hat_st, loss, idx_list
