"""tokenizer/losses.py: LPIPS from .pth files in the torchvision / lpips layouts against a numpy LPIPS, the
PatchGAN discriminator and the hinge / adaptive-weight formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testlib as tl
from flax import nnx

from tokenizer import losses
from tokenizer.torch_pth import load_pth


def _random_lpips_weights(seed=0):
  rng = np.random.default_rng(seed)
  vgg = {"classifier.0.weight": rng.normal(size=(4, 3)).astype(np.float32)}  # ignored, like the real file
  cin = 3
  for idx, cout in zip(losses.VGG16_CONVS, losses.VGG16_CHANNELS, strict=True):
    he = np.sqrt(2 / (9 * cin))
    vgg[f"features.{idx}.weight"] = (rng.normal(size=(cout, cin, 3, 3)) * he).astype(np.float32)
    vgg[f"features.{idx}.bias"] = (rng.normal(size=(cout,)) * 0.1).astype(np.float32)
    cin = cout
  lin = {f"lin{k}.model.1.weight": rng.uniform(0, 1, (1, losses.VGG16_CHANNELS[t], 1, 1)).astype(np.float32)
         for k, t in enumerate(losses.LPIPS_TAPS)}
  return vgg, lin


def _np_lpips(x, y, vgg, lin):
  """LPIPS v0.1 (vgg) in float64 numpy from the torch-layout tensors (NCHW reasoning on NHWC arrays)."""
  shift = np.array([-0.030, -0.088, -0.188])
  scale = np.array([0.458, 0.448, 0.450])

  def conv(h, w, b):  # h (B, H, W, I), w (O, I, 3, 3) torch layout, padding 1
    hp = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros(h.shape[:3] + (w.shape[0],))
    for dy in range(3):
      for dx in range(3):
        out += hp[:, dy:dy + h.shape[1], dx:dx + h.shape[2]] @ w[:, :, dy, dx].T.astype(np.float64)
    return out + b

  def feats(img):
    h = (img - shift) / scale
    taps = []
    for i, idx in enumerate(losses.VGG16_CONVS):
      h = np.maximum(conv(h, vgg[f"features.{idx}.weight"], vgg[f"features.{idx}.bias"]), 0)
      if i in losses.LPIPS_TAPS:
        taps.append(h / (np.sqrt((h * h).sum(-1, keepdims=True)) + 1e-10))
      if i in losses.POOL_AFTER:
        b, hh, ww, c = h.shape
        h = h.reshape(b, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
    return taps

  total = 0
  for k, (a, b) in enumerate(zip(feats(x), feats(y), strict=True)):
    w = lin[f"lin{k}.model.1.weight"].reshape(-1)
    total = total + (((a - b) ** 2) * w).sum(-1).mean(axis=(1, 2))
  return total


def test_lpips_loads_pth_files_and_matches_numpy(tmp_path):
  vgg, lin = _random_lpips_weights()
  vgg_path = tl.write_torch_zip(tmp_path / "vgg16-397923af.pth", vgg)
  lin_path = tl.write_torch_zip(tmp_path / "vgg.pth", lin)
  assert set(load_pth(lin_path)) == set(lin)  # real torch checkpoints, as the project reader sees them
  with nnx.use_eager_sharding(False):
    model = losses.load_lpips(vgg_path, lin_path)
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
  jax.config.update("jax_disable_most_optimizations", True)  # compile time; the numerics are unchanged
  try:
    got = np.asarray(jax.jit(lambda a, b: model(a, b))(np.concatenate([x, x]), np.concatenate([y, x])))
  finally:
    jax.config.update("jax_disable_most_optimizations", False)
  got, same = got[:2], got[2:]
  want = _np_lpips(x.astype(np.float64), y.astype(np.float64), vgg, lin)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert got.shape == (2,) and np.all(got > 0)
  np.testing.assert_allclose(same, 0.0, atol=1e-7)


def test_lpips_weight_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="VGG16 weights not found.*nothing is downloaded"):
    losses.load_lpips(tmp_path / "missing.pth", tmp_path / "missing_lin.pth")
  vgg, lin = _random_lpips_weights()
  del vgg["features.28.bias"]
  lin["lin2.model.1.weight"] = lin["lin2.model.1.weight"][:, :10]
  np.savez(tmp_path / "vgg.npz", **vgg)
  np.savez(tmp_path / "lin.npz", **lin)
  with pytest.raises(ValueError) as e:
    losses.load_lpips(tmp_path / "vgg.npz", tmp_path / "lin.npz")
  assert "missing features.28.bias" in str(e.value)
  assert "lin2.model.1.weight has shape (1, 10, 1, 1), expected (1, 256, 1, 1)" in str(e.value)


def test_patch_discriminator_geometry():
  """pix2pix geometry (abstractly, no compile): three stride-2 4x4 convs (32 -> 16 -> 8 -> 4), then two
  stride-1 4x4 convs (4 -> 3 -> 2); channels double up to 8x; BatchNorm on all but the first and last conv.
  (Training behaviour, incl. BatchNorm statistics, is in test_tokenizer_step_with_lpips_and_gan.)"""
  with nnx.use_eager_sharding(False):
    disc = nnx.eval_shape(lambda: losses.PatchDiscriminator(3, 8, 3, rngs=nnx.Rngs(0)))
  out = nnx.eval_shape(lambda d, v: d(v), disc, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert out.shape == (2, 2, 2, 1)
  params = nnx.to_pure_dict(nnx.state(disc, nnx.Param))
  kernels = [v.shape for p, v in jax.tree_util.tree_leaves_with_path(params)
             if "kernel" in jax.tree_util.keystr(p)]
  expected = [(4, 4, 3, 8), (4, 4, 8, 16), (4, 4, 16, 32), (4, 4, 32, 64), (4, 4, 64, 1)]
  assert sorted(kernels) == sorted(expected)
  assert len(jax.tree.leaves(nnx.state(disc, nnx.BatchStat))) == 2 * 3  # mean + var of the 3 BatchNorms


def test_hinge_and_adaptive_weight_formulas():
  real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.0, 1.0])
  # 0.5 * (mean relu(1 - real) + mean relu(1 + fake)) = 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
  assert float(losses.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (2.5 / 3 + 3 / 3))
  assert float(losses.generator_adv_loss(fake)) == pytest.approx(1 / 3)  # -mean(fake) = -(-2 + 0 + 1) / 3
  nll_grad = {"k": jnp.array([3.0, 4.0])}  # norm 5
  g_grad = {"k": jnp.array([0.0, 2.0])}  # norm 2
  assert float(losses.adaptive_weight(nll_grad, g_grad, 0.8)) == pytest.approx(0.8 * 5 / (2 + 1e-4))
  assert float(losses.adaptive_weight(nll_grad, {"k": jnp.zeros(2)}, 1.0)) == pytest.approx(1e4)  # clipped


def test_tokenizer_step_with_lpips_and_gan(tmp_path):
  """The full tokenizer objective in one step: L1 + L2 + LPIPS (weights from local files) + VQ terms + hinge
  PatchGAN with taming's adaptive weight (gradients of the reconstruction and GAN terms at the decoder's last
  conv). The discriminator and its BatchNorm statistics update, the generator moves, LPIPS stays frozen."""
  from var import train_lib

  vgg, lin = _random_lpips_weights()
  np.savez(tmp_path / "vgg.npz", **vgg)
  np.savez(tmp_path / "lin.npz", **lin)
  config = tl.tokenizer_config(tmp_path, **{
      "input.resolution": 16, "tokenizer.ch_mult": (1, 1, 1), "loss.lpips_weight": 0.5,
      "loss.gan_weight": 0.8, "loss.gan_start_step": 0, "loss.disc_base_channels": 8, "loss.disc_layers": 1,
      "loss.lpips_vgg_weights": str(tmp_path / "vgg.npz"),
      "loss.lpips_lin_weights": str(tmp_path / "lin.npz")})
  train_lib.validate_config(config)
  with nnx.use_eager_sharding(False):
    trainer = train_lib.TokenizerTrainer(config, global_batch=2, rngs=nnx.Rngs(0))
  lp = losses.load_lpips(tmp_path / "vgg.npz", tmp_path / "lin.npz")
  nnx.update(trainer.lpips, nnx.state(lp, nnx.Param))
  graphdef, state = nnx.split(trainer)
  before = jax.tree.map(np.array, nnx.to_pure_dict(state))
  img = jnp.asarray(tl.synthetic_batch(2, 16)["image"])

  def expected_rec_loss(state, img):
    rec, _, _ = nnx.merge(graphdef, state).model(img)
    return jnp.mean(jnp.abs(rec - img)) + jnp.mean(jnp.square(rec - img)) + 0.5 * jnp.mean(lp(rec, img))

  jax.config.update("jax_disable_most_optimizations", True)
  try:
    expected = float(jax.jit(expected_rec_loss)(state, img))
    new_state, m = jax.jit(lambda s, b: train_lib.tokenizer_train_step(graphdef, s, b, config=config))(
        state, {"image": img})
  finally:
    jax.config.update("jax_disable_most_optimizations", False)
  after = nnx.to_pure_dict(new_state)
  assert all(np.isfinite(float(v)) for v in jax.tree.leaves(m))
  assert float(m["rec_loss"]) == pytest.approx(expected, rel=1e-4)
  assert float(m["d_weight"]) > 0 and float(m["d_loss"]) > 0
  assert tl.max_abs_diff(before["disc"]["norms"][0]["mean"], after["disc"]["norms"][0]["mean"]) > 0
  assert tl.max_abs_diff(before["disc"], after["disc"]) > 0
  assert tl.max_abs_diff(before["model"], after["model"]) > 0
  assert tl.max_abs_diff(before["lpips"], after["lpips"]) == 0.0
