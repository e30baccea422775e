"""Encoder / Decoder building blocks of the VAR VQVAE (taming/LDM style), NHWC.

Module and attribute names mirror the official torch modules (`encoder.down.0.block.1.conv1`, `mid.attn_1`,
`up.4.upsample.conv`, ...) so that the official state dict maps onto the NNX state by name alone
(see tokenizer/official.py). Conv kernels are HWIO, annotated (None, None, "conv_in", "conv_out").

`precision` (a `jax.lax.Precision` or None = the backend default / `jax_default_matmul_precision`) goes to every
conv and attention einsum; `deterministic` (None = each Dropout's own train/eval flag) to every dropout.
"""

import jax
import jax.numpy as jnp
from flax import nnx

# torch's default Conv2d weight init (kaiming_uniform with a = sqrt(5)) = U(+-1/sqrt(fan_in)).
CONV_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv(
  in_ch: int,
  out_ch: int,
  kernel: int,
  *,
  stride: int = 1,
  padding="SAME",
  dtype=jnp.float32,
  precision: jax.lax.Precision | None = None,
  rngs: nnx.Rngs,
) -> nnx.Conv:
  """A 2-D conv with logical axis names on its kernel (H, W, I, O) and bias (O,), at the given precision."""
  return nnx.Conv(
    in_ch,
    out_ch,
    kernel_size=(kernel, kernel),
    strides=(stride, stride),
    padding=padding,
    kernel_init=nnx.with_partitioning(CONV_INIT, (None, None, "conv_in", "conv_out")),
    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
    dtype=dtype,
    precision=precision,
    rngs=rngs,
  )


def group_norm(ch: int, *, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.GroupNorm:
  """`Normalize`: GroupNorm(32 groups of contiguous channels, eps 1e-6, affine), two-pass variance."""
  if ch % 32:
    raise ValueError(f"GroupNorm(32) needs a channel count divisible by 32, got {ch}; use ch = 32 * k")
  return nnx.GroupNorm(
    ch,
    num_groups=32,
    epsilon=1e-6,
    use_fast_variance=False,
    scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("conv_out",)),
    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
    dtype=dtype,
    rngs=rngs,
  )


class ResnetBlock(nnx.Module):
  """x + conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))), with a 1x1 `nin_shortcut` when the width changes."""

  def __init__(
    self,
    in_ch: int,
    out_ch: int,
    *,
    dropout: float = 0.0,
    dtype=jnp.float32,
    precision: jax.lax.Precision | None = None,
    rngs: nnx.Rngs,
  ):
    self.norm1 = group_norm(in_ch, dtype=dtype, rngs=rngs)
    self.conv1 = conv(in_ch, out_ch, 3, dtype=dtype, precision=precision, rngs=rngs)
    self.norm2 = group_norm(out_ch, dtype=dtype, rngs=rngs)
    # Official: nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity().
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 1e-6 else None
    self.conv2 = conv(out_ch, out_ch, 3, dtype=dtype, precision=precision, rngs=rngs)
    self.nin_shortcut = (
      conv(in_ch, out_ch, 1, dtype=dtype, precision=precision, rngs=rngs) if in_ch != out_ch else None
    )

  def __call__(self, x: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
    """deterministic: True disables dropout, False applies it, None follows the module's train/eval mode."""
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = nnx.silu(self.norm2(h))
    if self.dropout is not None:
      h = self.dropout(h, deterministic=deterministic)
    h = self.conv2(h)
    shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
    return shortcut + h


class AttnBlock(nnx.Module):
  """Single-head self-attention over all pixels (row-major), residual: x + proj_out(attn(norm(x))).

  The logits and softmax are computed in float32 whatever the activation dtype (a bf16 softmax over N pixels
  loses most of its mass resolution); the weights are cast back to the activation dtype for the value product.
  """

  def __init__(self, ch: int, *, dtype=jnp.float32, precision: jax.lax.Precision | None = None, rngs: nnx.Rngs):
    self.precision = precision
    self.norm = group_norm(ch, dtype=dtype, rngs=rngs)
    self.qkv = conv(ch, 3 * ch, 1, dtype=dtype, precision=precision, rngs=rngs)
    self.proj_out = conv(ch, ch, 1, dtype=dtype, precision=precision, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    qkv = self.qkv(self.norm(x)).reshape(b, hh * ww, 3 * c)  # (B, N, 3C); channels [q | k | v] as in torch
    q, k, v = qkv[..., :c], qkv[..., c : 2 * c], qkv[..., 2 * c :]
    w = jnp.einsum("bic,bjc->bij", q, k, precision=self.precision, preferred_element_type=jnp.float32)
    w = jax.nn.softmax(w * (int(c) ** -0.5), axis=-1).astype(v.dtype)  # (B, N, N)
    out = jnp.einsum("bij,bjc->bic", w, v, precision=self.precision).reshape(b, hh, ww, c)
    return x + self.proj_out(out)


class Downsample(nnx.Module):
  """Zero-pad right and bottom by one (not symmetric, as the official code), then 3x3 conv stride 2."""

  def __init__(self, ch: int, *, dtype=jnp.float32, precision: jax.lax.Precision | None = None, rngs: nnx.Rngs):
    self.conv = conv(ch, ch, 3, stride=2, padding="VALID", dtype=dtype, precision=precision, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest-neighbour x2 (each pixel repeated 2x2), then 3x3 conv (`conv`, the official parameters).

  Computed without the x2 map: at each of the four output phases (dy, dx) the 3x3 taps over a repeated map land
  on a 2x2 window of the input, so the phase is a 2x2 conv over the input with the taps on one input pixel summed.
  One 2x2 conv with the four phases as output channels, then an interleave, equals the upsample + conv up to
  float rounding with 4/9 of the multiply-adds (and the 4x larger map never written).
  """

  def __init__(self, ch: int, *, dtype=jnp.float32, precision: jax.lax.Precision | None = None, rngs: nnx.Rngs):
    self.conv = conv(ch, ch, 3, dtype=dtype, precision=precision, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, _ = x.shape
    k = self.conv.kernel[...]  # (3, 3, I, O)
    # phase 0 reads input rows (i - 1, i) with taps (k0, k1 + k2); phase 1 rows (i, i + 1) with (k0 + k1, k2)
    rows = jnp.stack([jnp.stack([k[0], k[1] + k[2]]), jnp.stack([k[0] + k[1], k[2]])])  # (dy, 2, 3, I, O)
    cols = jnp.stack([jnp.stack([rows[:, :, 0], rows[:, :, 1] + rows[:, :, 2]]),
                      jnp.stack([rows[:, :, 0] + rows[:, :, 1], rows[:, :, 2]])])  # (dx, 2, dy, 2, I, O)
    out_ch = k.shape[-1]
    k4 = cols.transpose(3, 1, 4, 2, 0, 5).reshape(2, 2, k.shape[2], 4 * out_ch)  # (2, 2, I, (dy, dx, O))
    dtype = self.conv.dtype or x.dtype
    xp = jnp.pad(x.astype(dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = jax.lax.conv_general_dilated(xp, k4.astype(dtype), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=self.conv.precision)  # (B, h + 1, w + 1, 4 O)
    y = y.reshape(b, h + 1, w + 1, 2, 2, out_ch)
    # phase (dy, dx) of output pixel (2i + dy, 2j + dx) is y[i + dy, j + dx, dy, dx]
    out = jnp.stack([jnp.stack([y[:, dy:dy + h, dx:dx + w, dy, dx] for dx in (0, 1)], axis=3) for dy in (0, 1)],
                    axis=2)  # (B, h, dy, w, dx, O)
    return out.reshape(b, 2 * h, 2 * w, out_ch) + self.conv.bias[...].astype(dtype)


class Level(nnx.Module):
  """One resolution level: resnet blocks, optional per-block attention, optional down/upsampling."""

  def __init__(self, block: list, attn: list, *, downsample=None, upsample=None):
    self.block = nnx.List(block)
    self.attn = nnx.List(attn)
    if downsample is not None:
      self.downsample = downsample
    if upsample is not None:
      self.upsample = upsample

  def blocks(self, h: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
    for i, blk in enumerate(self.block):
      h = blk(h, deterministic=deterministic)
      if len(self.attn):
        h = self.attn[i](h)
    return h


class Mid(nnx.Module):
  """Middle: ResnetBlock -> AttnBlock (or identity) -> ResnetBlock at constant width."""

  def __init__(
    self,
    ch: int,
    *,
    using_mid_sa: bool,
    dropout: float,
    dtype=jnp.float32,
    precision: jax.lax.Precision | None = None,
    rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, precision=precision, rngs=rngs)
    self.block_1 = ResnetBlock(ch, ch, dropout=dropout, **kw)
    self.attn_1 = AttnBlock(ch, **kw) if using_mid_sa else None
    self.block_2 = ResnetBlock(ch, ch, dropout=dropout, **kw)

  def __call__(self, h: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
    h = self.block_1(h, deterministic=deterministic)
    if self.attn_1 is not None:
      h = self.attn_1(h)
    return self.block_2(h, deterministic=deterministic)


class Encoder(nnx.Module):
  """Image (B, H, W, in_channels) -> latent (B, H / 2**(levels-1), W / 2**(levels-1), z_channels)."""

  def __init__(
    self,
    *,
    ch: int,
    ch_mult: tuple[int, ...],
    num_res_blocks: int,
    z_channels: int,
    in_channels: int = 3,
    dropout: float = 0.0,
    using_sa: bool = True,
    using_mid_sa: bool = True,
    dtype=jnp.float32,
    precision: jax.lax.Precision | None = None,
    rngs: nnx.Rngs,
  ):
    n_levels = len(ch_mult)
    in_ch_mult = (1,) + tuple(ch_mult)
    kw = dict(dtype=dtype, precision=precision, rngs=rngs)
    self.conv_in = conv(in_channels, ch, 3, **kw)
    levels = []
    block_in = ch
    for i in range(n_levels):
      block_in = ch * in_ch_mult[i]
      block_out = ch * ch_mult[i]
      blocks, attns = [], []
      for _ in range(num_res_blocks):
        blocks.append(ResnetBlock(block_in, block_out, dropout=dropout, **kw))
        block_in = block_out
        if i == n_levels - 1 and using_sa:
          attns.append(AttnBlock(block_in, **kw))
      down = Downsample(block_in, **kw) if i != n_levels - 1 else None
      levels.append(Level(blocks, attns, downsample=down))
    self.down = nnx.List(levels)
    self.mid = Mid(block_in, using_mid_sa=using_mid_sa, dropout=dropout, **kw)
    self.norm_out = group_norm(block_in, dtype=dtype, rngs=rngs)
    self.conv_out = conv(block_in, z_channels, 3, **kw)

  def __call__(self, x: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
    """deterministic: True disables dropout, False applies it, None follows the module's train/eval mode."""
    h = self.conv_in(x)
    for i, level in enumerate(self.down):
      h = level.blocks(h, deterministic=deterministic)
      if i != len(self.down) - 1:
        h = level.downsample(h)
    h = self.mid(h, deterministic=deterministic)
    return self.conv_out(nnx.silu(self.norm_out(h)))


class Decoder(nnx.Module):
  """Latent (B, h, w, z_channels) -> image (B, h * 2**(levels-1), w * 2**(levels-1), in_channels), unclamped.

  `up[i]` is level i (executed from the last level down to 0), as in the official module indices.
  """

  def __init__(
    self,
    *,
    ch: int,
    ch_mult: tuple[int, ...],
    num_res_blocks: int,
    z_channels: int,
    in_channels: int = 3,
    dropout: float = 0.0,
    using_sa: bool = True,
    using_mid_sa: bool = True,
    dtype=jnp.float32,
    precision: jax.lax.Precision | None = None,
    rngs: nnx.Rngs,
  ):
    n_levels = len(ch_mult)
    block_in = ch * ch_mult[-1]
    kw = dict(dtype=dtype, precision=precision, rngs=rngs)
    self.conv_in = conv(z_channels, block_in, 3, **kw)
    self.mid = Mid(block_in, using_mid_sa=using_mid_sa, dropout=dropout, **kw)
    levels = [None] * n_levels
    for i in reversed(range(n_levels)):  # construction order = execution order (deepest level first)
      block_out = ch * ch_mult[i]
      blocks, attns = [], []
      for _ in range(num_res_blocks + 1):
        blocks.append(ResnetBlock(block_in, block_out, dropout=dropout, **kw))
        block_in = block_out
        if i == n_levels - 1 and using_sa:
          attns.append(AttnBlock(block_in, **kw))
      up = Upsample(block_in, **kw) if i != 0 else None
      levels[i] = Level(blocks, attns, upsample=up)
    self.up = nnx.List(levels)
    self.norm_out = group_norm(block_in, dtype=dtype, rngs=rngs)
    self.conv_out = conv(block_in, in_channels, 3, **kw)

  def __call__(self, z: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
    """deterministic: True disables dropout, False applies it, None follows the module's train/eval mode."""
    h = self.mid(self.conv_in(z), deterministic=deterministic)
    for i in reversed(range(len(self.up))):
      h = self.up[i].blocks(h, deterministic=deterministic)
      if i != 0:
        h = self.up[i].upsample(h)
    return self.conv_out(nnx.silu(self.norm_out(h)))
