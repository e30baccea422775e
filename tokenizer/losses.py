"""Tokenizer training losses beyond the VQ terms: LPIPS perceptual loss and a PatchGAN discriminator (hinge).

The VAR repository does not publish its VAE training losses; these follow the taming-transformers VQGAN recipe
that the VAR VQVAE descends from:
  * LPIPS (richzhang/PerceptualSimilarity v0.1, "vgg"): torchvision VGG16 features at relu1_2, relu2_2,
    relu3_3, relu4_3, relu5_3 of inputs shifted/scaled by the LPIPS ScalingLayer, unit-normalised over
    channels, squared differences weighted by learned 1x1 "lin" layers, averaged over space, summed over
    layers. Weights come from two LOCAL files in the original layouts (nothing downloads): torchvision
    `vgg16-397923af.pth` (`features.{i}.weight` (O, I, 3, 3), `features.{i}.bias`) and lpips
    `weights/v0.1/vgg.pth` (`lin{k}.model.1.weight` (1, C_k, 1, 1)).
  * PatchGAN (`NLayerDiscriminator`, pix2pix): conv 4x4/2 + LeakyReLU(0.2), (n_layers - 1) x [conv 4x4/2 +
    BatchNorm + LeakyReLU], conv 4x4/1 + BatchNorm + LeakyReLU, conv 4x4/1 -> one logit per patch; init N(0,
    0.02) for convs, N(1, 0.02) for BatchNorm scales. Hinge loss for D, -mean(D(fake)) for G, the adaptive
    weight ||grad_last nll|| / (||grad_last g|| + 1e-4) clipped to [0, 1e4], and a start step before which the
    GAN is off.
Images are NHWC in [-1, 1].
"""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# ------------------------------------------------------------------------------------------------------------
# LPIPS
# ------------------------------------------------------------------------------------------------------------

# torchvision vgg16 `features` indices of the 13 convs, and after which conv each LPIPS tap (relu output)
# sits.
VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
# positions in VGG16_CONVS after which the relu output is tapped (relu1_2 ... relu5_3)
LPIPS_TAPS = (1, 3, 6, 9, 12)
POOL_AFTER = (1, 3, 6, 9)  # max pool 2x2 follows these convs (before the next slice)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class LPIPS(nnx.Module):
  """LPIPS v0.1 with the VGG16 trunk (frozen: no optimizer). Call: (x, y) NHWC in [-1, 1] -> (B,)."""

  def __init__(self, *, rngs: nnx.Rngs):
    kernel_init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, None, "conv_in", "conv_out"))
    self.convs = nnx.List([
        nnx.Conv(cin, cout, (3, 3), padding=1, kernel_init=kernel_init, rngs=rngs)
        for cin, cout in zip((3,) + VGG16_CHANNELS[:-1], VGG16_CHANNELS, strict=True)])
    self.lins = nnx.List([
        nnx.Param(jnp.full((VGG16_CHANNELS[i],), 1.0 / VGG16_CHANNELS[i], jnp.float32), out_sharding=(None,))
        for i in LPIPS_TAPS])

  def features(self, x):
    """Unit-normalised VGG16 taps of an NHWC image in [-1, 1]."""
    x = (x - jnp.asarray(LPIPS_SHIFT, x.dtype)) / jnp.asarray(LPIPS_SCALE, x.dtype)
    feats = []
    for i, conv in enumerate(self.convs):
      x = jax.nn.relu(conv(x))
      if i in LPIPS_TAPS:
        feats.append(x / (jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)) + 1e-10))
      if i in POOL_AFTER:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    return feats

  def __call__(self, x, y):
    fx, fy = self.features(x), self.features(y)
    total = 0.0
    for a, b, w in zip(fx, fy, self.lins, strict=True):
      total = total + jnp.mean(jnp.sum((a - b) ** 2 * w[...], axis=-1), axis=(1, 2))
    return total  # (B,)


def _read_state_dict(path: str | os.PathLike, what: str) -> dict[str, np.ndarray]:
  path = pathlib.Path(path) if path else None
  if path is None or not path.is_file():
    raise FileNotFoundError(
        f"{what} weights not found at {str(path)!r}. LPIPS needs two local files (nothing is downloaded): "
        "the torchvision VGG16 state dict (vgg16-397923af.pth) and the LPIPS v0.1 'vgg.pth' linear layers. "
        "Set "
        "config.loss.lpips_vgg_weights and config.loss.lpips_lin_weights, or disable LPIPS with "
        "config.loss.lpips_weight=0.")
  if path.suffix == ".npz":
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  from tokenizer.torch_pth import load_pth
  return load_pth(path)


def lpips_from_state_dicts(model: LPIPS, vgg: dict[str, np.ndarray], lin: dict[str, np.ndarray]):
  """Copies torchvision vgg16 (`features.{i}.weight/bias`, OIHW) and lpips (`lin{k}.model.1.weight` (1, C, 1,
  1)) tensors into `model`; one ValueError lists every missing or mis-shaped key. `classifier.*` entries are
  ignored."""
  problems, updates = [], []
  cins = (3,) + VGG16_CHANNELS[:-1]
  for conv, idx, cout, cin in zip(model.convs, VGG16_CONVS, VGG16_CHANNELS, cins, strict=True):
    for name, shape in ((f"features.{idx}.weight", (cout, cin, 3, 3)), (f"features.{idx}.bias", (cout,))):
      if name not in vgg:
        problems.append(f"VGG16: missing {name} {shape}")
      elif tuple(vgg[name].shape) != shape:
        problems.append(f"VGG16: {name} has shape {tuple(vgg[name].shape)}, expected {shape}")
    if not problems:
      updates.append((conv.kernel, np.transpose(vgg[f"features.{idx}.weight"], (2, 3, 1, 0))))
      updates.append((conv.bias, vgg[f"features.{idx}.bias"]))
  for k, (w, tap) in enumerate(zip(model.lins, LPIPS_TAPS, strict=True)):
    name, shape = f"lin{k}.model.1.weight", (1, VGG16_CHANNELS[tap], 1, 1)
    if name not in lin:
      problems.append(f"LPIPS: missing {name} {shape}")
    elif tuple(lin[name].shape) != shape:
      problems.append(f"LPIPS: {name} has shape {tuple(lin[name].shape)}, expected {shape}")
    else:
      updates.append((w, lin[name].reshape(-1)))
  if problems:
    raise ValueError("LPIPS weights do not match the torchvision vgg16 / lpips v0.1 layouts:\n  " +
                     "\n  ".join(problems))
  for var, value in updates:
    var[...] = jnp.asarray(value, jnp.float32)
  return model


def load_lpips(vgg_path, lin_path, *, rngs: nnx.Rngs | None = None) -> LPIPS:
  """Builds LPIPS from local weight files (.pth in the original layouts, or .npz twins with the same keys);
  FileNotFoundError for a missing file, one ValueError listing every missing / mis-shaped tensor."""
  vgg = _read_state_dict(vgg_path, "VGG16")
  lin = _read_state_dict(lin_path, "LPIPS linear-layer")
  with nnx.use_eager_sharding(False):  # names recorded; the caller places the arrays (e.g. replicated)
    model = LPIPS(rngs=rngs or nnx.Rngs(0))
  return lpips_from_state_dicts(model, vgg, lin)


# ------------------------------------------------------------------------------------------------------------
# PatchGAN
# ------------------------------------------------------------------------------------------------------------


class PatchDiscriminator(nnx.Module):
  """pix2pix / taming `NLayerDiscriminator`: (B, H, W, 3) -> patch logits (B, H', W', 1)."""

  def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3, *, rngs: nnx.Rngs):
    conv_init = nnx.with_partitioning(nnx.initializers.normal(0.02), (None, None, "conv_in", "conv_out"))

    def conv(cin, cout, stride, bias):
      # Explicit symmetric padding 1 like torch (flax "SAME" pads stride-2 convs asymmetrically).
      return nnx.Conv(cin, cout, (4, 4), strides=stride, padding=((1, 1), (1, 1)), use_bias=bias,
                      kernel_init=conv_init, rngs=rngs)

    def norm(c):
      scale_init = lambda key, shape, dtype: 1.0 + 0.02 * jax.random.normal(key, shape, dtype)
      return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, use_running_average=False, scale_init=scale_init,
                           rngs=rngs)

    chans = [base_channels * min(2 ** i, 8) for i in range(n_layers + 1)]
    self.conv_in = conv(in_channels, chans[0], 2, True)
    self.convs = nnx.List([conv(chans[i - 1], chans[i], 2 if i < n_layers else 1, False)
                           for i in range(1, n_layers + 1)])
    self.norms = nnx.List([norm(chans[i]) for i in range(1, n_layers + 1)])
    self.conv_out = conv(chans[-1], 1, 1, True)

  def __call__(self, x):
    h = jax.nn.leaky_relu(self.conv_in(x), 0.2)
    for conv, norm in zip(self.convs, self.norms, strict=True):
      h = jax.nn.leaky_relu(norm(conv(h)), 0.2)
    return self.conv_out(h)


def hinge_d_loss(logits_real, logits_fake):
  """Discriminator hinge loss: 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(G(z))))."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_adv_loss(logits_fake):
  """Generator side of the hinge GAN: -mean D(G(z))."""
  return -jnp.mean(logits_fake)


def adaptive_weight(nll_grad, g_grad, disc_weight: float):
  """taming's `calculate_adaptive_weight`: balances the GAN gradient against the reconstruction gradient at
  the decoder's last layer: ||grad nll|| / (||grad g|| + 1e-4), clipped to [0, 1e4], times `disc_weight`, no
  gradient."""
  norm = lambda t: jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(t)))
  w = jnp.clip(norm(nll_grad) / (norm(g_grad) + 1e-4), 0.0, 1e4)
  return jax.lax.stop_gradient(w) * disc_weight
