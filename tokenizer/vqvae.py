"""The VAR multi-scale VQVAE (official `VQVAE`) in Flax NNX, NHWC.

Public API (B batch, H = W image side, P = patch_nums[-1] latent side, pn_si scale sides, C = z_channels):
  encode(img)                         (B, H, W, 3) in [-1, 1] -> f (B, P, P, C)
  img_to_idx(img)                     -> [(B, pn_si**2) int32] per scale, row-major
  f_to_idx_or_fhat(f, to_fhat)        -> tokens per scale, or the cumulative f_hat (B, P, P, C) per scale
  embed(idx)                          (..., ) int -> (..., C) codebook vectors
  idx_to_fhat(idx_list, all_scales)   -> f_hat (B, P, P, C) (or the list of partial sums)
  fhat_to_img(f_hat)                  -> decoder(post_quant_conv(f_hat)) clamped to [-1, 1]
  idx_to_img(idx_list, all_scales)    -> image (or one image per partial sum)
  idx_to_var_input(idx_list)          -> (B, L - pn_0**2, C) teacher-forcing input of the VAR transformer
  next_autoregressive_input(si, f_hat, h) -> (f_hat, next input map) for sampling
  __call__(img, deterministic=None)   -> (unclamped reconstruction, vq_loss, tokens) training forward
All shapes are static; wrap calls in `nnx.jit` (or split/merge + `jax.jit`) as usual. Every API but `__call__` is
deterministic (no dropout) whatever the module's train/eval mode.
"""

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tokenizer import layers
from tokenizer.quantizer import VectorQuantizer

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)

# VQVAEConfig.precision -> the precision of the encoder/decoder convs, attention einsums and (post_)quant_conv.
# "default" is None: the backend default (TF32 / bf16 passes on GPU / TPU), or jax_default_matmul_precision if set.
PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "high": jax.lax.Precision.HIGH, "default": None}


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
  """Hyper-parameters of the multi-scale VQVAE (defaults: the official vae_ch160v4096z32, 256px patch_nums).

  `dtype` is the activation dtype of the encoder/decoder ("float32" or "bfloat16"); parameters stay float32
  and the quantizer always computes in float32, as the official code does.

  `precision` is the matmul/conv precision of the encoder, decoder, quant_conv and post_quant_conv ("highest",
  "high" or "default"; the quantizer always runs at HIGHEST). "highest" (the default) gives float32 parity with
  the official model on any accelerator (exact tokens from img_to_idx); "default" lets GPUs/TPUs use TF32/bf16
  passes, faster for tokenizer training but f is then only ~1e-3 accurate and tokens near a tie can flip. Configs
  saved before this field existed load as "highest".
  """

  ch: int = 160
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  using_sa: bool = True
  using_mid_sa: bool = True
  z_channels: int = 32
  vocab_size: int = 4096
  patch_nums: tuple[int, ...] = PATCH_NUMS_256
  quant_resi: float = 0.5
  share_quant_resi: int = 4
  beta: float = 0.25
  dropout: float = 0.0
  in_channels: int = 3
  using_znorm: bool = False
  dtype: str = "float32"
  precision: str = "highest"

  def __post_init__(self):
    # Lists from JSON become tuples so the config stays hashable (usable as a static jit argument).
    object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
    object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
    if not self.ch_mult or any(m < 1 for m in self.ch_mult):
      raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}")
    bad = [self.ch * m for m in (1, *self.ch_mult) if (self.ch * m) % 32]
    if bad:
      raise ValueError(f"GroupNorm(32) needs every width ch * mult divisible by 32; ch={self.ch} gives {bad}")
    if len(self.patch_nums) < 2 or any(
      b <= a for a, b in zip(self.patch_nums, self.patch_nums[1:], strict=False)
    ):
      raise ValueError(f"patch_nums must have >= 2 strictly increasing sizes, got {self.patch_nums}")
    if self.patch_nums[0] < 1:
      raise ValueError(f"patch_nums must be positive, got {self.patch_nums}")
    if self.share_quant_resi < 0:
      raise ValueError(
        f"share_quant_resi must be 0 (one phi per scale), 1 (shared) or K > 1, got {self.share_quant_resi}"
      )
    if self.vocab_size < 1 or self.z_channels < 1 or self.num_res_blocks < 1:
      raise ValueError(
        f"vocab_size, z_channels, num_res_blocks must be >= 1, got {self.vocab_size}, {self.z_channels}, "
        f"{self.num_res_blocks}"
      )
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {self.dtype!r}")
    if self.precision not in PRECISIONS:
      raise ValueError(
        f"precision must be one of {sorted(PRECISIONS)} ('highest': float32 parity with the official model, "
        f"'default': faster on GPU/TPU), got {self.precision!r}"
      )

  @property
  def downsample(self) -> int:
    """Image side / latent side = 2 ** (len(ch_mult) - 1)."""
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def image_size(self) -> int:
    """The image side these patch_nums are made for: patch_nums[-1] * downsample."""
    return self.patch_nums[-1] * self.downsample

  @property
  def num_tokens(self) -> int:
    """L = sum of pn**2 over the scales."""
    return sum(p * p for p in self.patch_nums)

  def check_image_size(self, image_size: int):
    """Raises a ValueError unless image_size / downsample == patch_nums[-1]."""
    if image_size % self.downsample or image_size // self.downsample != self.patch_nums[-1]:
      raise ValueError(
        f"image size {image_size} gives a latent of {image_size / self.downsample:g} (downsample "
        f"{self.downsample}) but patch_nums[-1] = {self.patch_nums[-1]}; use images of "
        f"{self.image_size}x{self.image_size} or patch_nums ending in {image_size // self.downsample}"
      )

  def to_dict(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "VQVAEConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown VQVAEConfig fields {unknown}; known fields: {sorted(names)}")
    return cls(**d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)

  @classmethod
  def preset(cls, name: str, **overrides) -> "VQVAEConfig":
    """Named configs: 'vqvae_256' / 'vqvae_512' (official weights; only patch_nums differ), 't1' (fixture)."""
    if name not in PRESETS:
      raise ValueError(f"unknown VQVAE preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


PRESETS = {
  "vqvae_256": VQVAEConfig(patch_nums=PATCH_NUMS_256),
  "vqvae_512": VQVAEConfig(patch_nums=PATCH_NUMS_512),
  # The golden-fixture VAE (fixtures/var/vae_shared.*): official classes with ch_mult (1, 1, 1), 16x16 images.
  "t1": VQVAEConfig(ch=32, ch_mult=(1, 1, 1), z_channels=8, vocab_size=64, patch_nums=(1, 2, 3, 4)),
}


class VQVAE(nnx.Module):
  """Multi-scale residual VQVAE; parameter names mirror the official torch state dict.

  Parameters carry logical sharding names (conv_in / conv_out / codebook / latent), so construct the model under
  `nnx.use_eager_sharding(False)` (then shard it yourself, e.g. device_put with nnx.get_named_sharding), or
  inside a mesh (`jax.set_mesh`) with `nnx.logical_axis_rules` that map those names.

  Dropout (config.dropout > 0) is applied only by the training forward `__call__`; the inference APIs (encode,
  img_to_idx, f_to_idx_or_fhat, fhat_to_img, idx_to_img, reconstruct, ...) never drop, in train or eval mode.
  """

  def __init__(self, config: VQVAEConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype = jnp.dtype(config.dtype)
    precision = PRECISIONS[config.precision]
    arch = dict(
      ch=config.ch,
      ch_mult=config.ch_mult,
      num_res_blocks=config.num_res_blocks,
      z_channels=config.z_channels,
      in_channels=config.in_channels,
      dropout=config.dropout,
      using_sa=config.using_sa,
      using_mid_sa=config.using_mid_sa,
      dtype=dtype,
      precision=precision,
    )
    self.encoder = layers.Encoder(**arch, rngs=rngs)
    self.decoder = layers.Decoder(**arch, rngs=rngs)
    self.quantize = VectorQuantizer(
      vocab_size=config.vocab_size,
      z_channels=config.z_channels,
      patch_nums=config.patch_nums,
      quant_resi=config.quant_resi,
      share_quant_resi=config.share_quant_resi,
      beta=config.beta,
      using_znorm=config.using_znorm,
      rngs=rngs,
    )
    self.quant_conv = layers.conv(config.z_channels, config.z_channels, 3, precision=precision, rngs=rngs)
    self.post_quant_conv = layers.conv(config.z_channels, config.z_channels, 3, precision=precision, rngs=rngs)

  # ----------------------------------------------------------------------------------------------- encoding
  def _check_img(self, img: jax.Array):
    c = self.config
    if img.ndim != 4 or img.shape[1] != img.shape[2] or img.shape[3] != c.in_channels:
      raise ValueError(f"expected square NHWC images (B, H, H, {c.in_channels}), got shape {img.shape}")
    c.check_image_size(img.shape[1])

  def encode(self, img: jax.Array) -> jax.Array:
    """img (B, H, W, 3) in [-1, 1] -> f = quant_conv(encoder(img)) (B, P, P, Cvae), float32, no dropout."""
    return self._encode(img, deterministic=True)

  def _encode(self, img: jax.Array, *, deterministic: bool | None) -> jax.Array:
    self._check_img(img)
    h = self.encoder(img.astype(jnp.dtype(self.config.dtype)), deterministic=deterministic)
    return self.quant_conv(h).astype(jnp.float32)

  def f_to_idx_or_fhat(self, f: jax.Array, to_fhat: bool = False) -> list[jax.Array]:
    """f (B, P, P, Cvae) -> tokens [(B, pn^2) int32] per scale, or cumulative f_hat [(B, P, P, Cvae)]."""
    return self.quantize.f_to_idx_or_fhat(f, to_fhat=to_fhat)

  def img_to_idx(self, img: jax.Array) -> list[jax.Array]:
    """img (B, H, W, 3) -> tokens [(B, pn^2) int32] per scale, row-major, no dropout.

    The exact official tokens in float32 (config.dtype='float32', precision='highest'); bfloat16 activations
    can change tokens.
    """
    return self.quantize.f_to_idx_or_fhat(self.encode(img), to_fhat=False)

  # ----------------------------------------------------------------------------------------------- decoding
  def embed(self, idx: jax.Array) -> jax.Array:
    """Codebook lookup: int tokens (...) -> (..., Cvae)."""
    return self.quantize.embed(idx)

  def idx_to_fhat(self, idx_list, all_scales: bool = False):
    """Tokens of the first scales -> f_hat (B, P, P, Cvae), or the list of partial sums with all_scales."""
    return self.quantize.idx_to_fhat(idx_list, all_scales=all_scales)

  def fhat_to_img(self, f_hat: jax.Array) -> jax.Array:
    """f_hat (B, P, P, Cvae) -> decoder(post_quant_conv(f_hat)) clamped to [-1, 1] (B, H, W, 3)."""
    return jnp.clip(self._decode(f_hat, deterministic=True), -1.0, 1.0)

  def _decode(self, f_hat: jax.Array, *, deterministic: bool | None) -> jax.Array:
    h = self.post_quant_conv(f_hat.astype(jnp.float32)).astype(jnp.dtype(self.config.dtype))
    return self.decoder(h, deterministic=deterministic).astype(jnp.float32)

  def idx_to_img(self, idx_list, all_scales: bool = False):
    """Tokens -> image (B, H, W, 3) in [-1, 1]; with all_scales one image per cumulative f_hat (a list).

    The per-scale images are decoded in one batched decoder call (GroupNorm is per sample, so this is exact).
    """
    f_hats = self.idx_to_fhat(idx_list, all_scales=True)
    if not all_scales:
      return self.fhat_to_img(f_hats[-1])
    imgs = self.fhat_to_img(jnp.concatenate(f_hats, axis=0))  # (S' * B, H, W, 3)
    return list(jnp.split(imgs, len(f_hats), axis=0))

  def reconstruct(self, img: jax.Array, all_scales: bool = False):
    """img -> tokens -> image (official `img_to_reconstructed_img`), clamped; per scale with all_scales."""
    f_hats = self.quantize.f_to_idx_or_fhat(self.encode(img), to_fhat=True)
    if not all_scales:
      return self.fhat_to_img(f_hats[-1])
    imgs = self.fhat_to_img(jnp.concatenate(f_hats, axis=0))
    return list(jnp.split(imgs, len(f_hats), axis=0))

  # ----------------------------------------------------------------------------------------------- VAR glue
  def idx_to_var_input(self, idx_list) -> jax.Array:
    """Per-scale tokens -> teacher-forcing input (B, L - pn_0^2, Cvae) (official `idxBl_to_var_input`)."""
    return self.quantize.idx_to_var_input(idx_list)

  def next_autoregressive_input(self, si: int, f_hat: jax.Array, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sampling step si: h (B, pn_si, pn_si, Cvae) -> (f_hat, next map (B, pn_{si+1}, pn_{si+1}, Cvae))."""
    return self.quantize.next_autoregressive_input(si, f_hat, h)

  def split_tokens(self, idx_bl: jax.Array) -> list[jax.Array]:
    """(B, L) tokens, scales concatenated small -> large -> [(B, pn^2)] per scale."""
    sizes = [p * p for p in self.config.patch_nums]
    if idx_bl.ndim != 2 or idx_bl.shape[1] != sum(sizes):
      raise ValueError(f"expected tokens of shape (B, {sum(sizes)}), got {idx_bl.shape}")
    bounds = [sum(sizes[:i]) for i in range(1, len(sizes))]
    return list(jnp.split(idx_bl, bounds, axis=1))

  # ----------------------------------------------------------------------------------------------- training
  def __call__(
    self, img: jax.Array, *, deterministic: bool | None = None
  ) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
    """Training forward (official `VQVAE.forward`): img -> (reconstruction, unclamped (B, H, W, 3);
    vq_loss (scalar, beta * commitment + codebook, mean over scales); tokens [(B, pn^2)] per scale).

    The quantizer output is straight-through: its value is f_hat, its gradient flows to the encoder.
    Dropout (config.dropout > 0) follows the module's train/eval mode (`model.train()` / `model.eval()`,
    train by default) unless `deterministic` is given; its masks come from the dropout RNG streams forked at
    construction (the `dropout` stream of the constructor's Rngs, else its default stream), advanced per call.
    """
    f_hat, vq_loss, idx_list = self.quantize(self._encode(img, deterministic=deterministic))
    return self._decode(f_hat, deterministic=deterministic), vq_loss, idx_list


def num_params(model: nnx.Module) -> int:
  """Total parameter count."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
