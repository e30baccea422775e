"""Multi-scale VQVAE parity with the official PyTorch VQVAE (fixture T1 + unit fixtures), float32.

Measured max abs errors are printed (run with -s) for the report.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from tokenizer import (
  VQVAE,
  AttnBlock,
  ResnetBlock,
  VectorQuantizer,
  VQVAEConfig,
  area_matrix,
  area_resize,
  bicubic_matrix,
  bicubic_resize,
  load_official_state_dict,
  load_official_vqvae,
  phi_indices,
)
from tokenizer.quantizer import Phi

S = 4  # T1 scales


def _nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def _report(name, got, want):
  err = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
  print(f"max abs err {name}: {err:.3g}")
  return err


@pytest.fixture(scope="module")
def t1(shared_dir):
  root = shared_dir / "fixtures" / "var"
  io = dict(np.load(root / "T1" / "io.npz"))
  sd = dict(np.load(root / "vae_shared.npz"))
  model = load_official_vqvae(sd, VQVAEConfig.preset("t1"))
  return model, io, sd


@nnx.jit
def _t1_outputs(model, img, idx, f):
  """Every inference output in one compiled call (one compile keeps the tests fast on a 2-core CPU)."""
  enc = model.encode(img)
  return dict(
    enc_f=enc,
    idx_from_img=model.img_to_idx(img),
    idx_from_f=model.f_to_idx_or_fhat(f),
    fhat_from_f=model.f_to_idx_or_fhat(f, to_fhat=True),
    fhat_from_idx=model.idx_to_fhat(idx, all_scales=True),
    fhat_final=model.idx_to_fhat(idx),
    fhat_2_scales=model.idx_to_fhat(idx[:2]),
    rec=model.idx_to_img(idx),
    rec_per_scale=model.idx_to_img(idx, all_scales=True),
    rec_from_img=model.reconstruct(img),
    var_input=model.idx_to_var_input(idx),
  )


@pytest.fixture(scope="module")
def t1_out(t1):
  model, io, _ = t1
  idx = [jnp.asarray(io[f"idx_s{si}"]) for si in range(S)]
  return _t1_outputs(model, jnp.asarray(_nhwc(io["img"])), idx, jnp.asarray(_nhwc(io["enc_f"])))


# ------------------------------------------------------------------------------------------------ resampling
def test_resample_matches_torch_interp_fixture(shared_dir):
  d = np.load(shared_dir / "fixtures" / "var" / "common" / "interp.npz")
  worst, n = 0.0, 0
  for tag in ("pn256", "pn512", "T1", "T2"):
    area_in = d[f"{tag}_area_in"][0, 0]
    p = area_in.shape[0]
    for key in d.files:
      if key.startswith(f"{tag}_area_out_"):
        pn = int(key.rsplit("_", 1)[1])
        m, x, want, size = area_matrix(p, pn), area_in, d[key][0, 0], pn
        fn = area_resize
      elif key.startswith(f"{tag}_bicubic_in_"):
        pn = int(key.rsplit("_", 1)[1])
        m, x, want, size = bicubic_matrix(pn, p), d[key][0, 0], d[f"{tag}_bicubic_out_{pn}"][0, 0], p
        fn = bicubic_resize
      else:
        continue
      # the float64 matrices applied separably; the float32 JAX path on NHWC maps for the small sets (one
      # compile per shape is slow on a shared 2-core CPU)
      err = _report(key, m @ x.astype(np.float64) @ m.T, want)
      if tag in ("T1", "T2"):
        got = fn(jnp.asarray(x[None, :, :, None]), size)
        assert got.shape == (1, size, size, 1)
        err = max(err, _report(key + " (jax, float32)", got[0, :, :, 0], want))
      assert err < 1e-6, key
      worst, n = max(worst, err), n + 1
  assert n == 2 * (9 + 9 + 3 + 4)  # every area/bicubic pair of the four patch-number sets
  print(f"interp.npz: {n} arrays, max abs err {worst:.3g}")


def test_resample_matrices_structure():
  # area rows are averaging windows (sum 1), overlapping when 16 / 13 is not an integer
  a = area_matrix(16, 13)
  np.testing.assert_allclose(a.sum(1), 1.0, rtol=0, atol=1e-15)
  np.testing.assert_array_equal(np.count_nonzero(a, axis=1), [2, 2, 2, 2, 3, 2, 2, 2, 3, 2, 2, 2, 2])
  np.testing.assert_array_equal(a[4, 4:7], 1 / 3)  # [floor(4 * 16 / 13), ceil(5 * 16 / 13)) = [4, 7)
  assert (a[:-1] * a[1:] > 0).any()  # neighbouring windows overlap
  # bicubic rows sum to 1 (clamped taps fold onto the border); a 1x1 map upsamples to a constant
  b = bicubic_matrix(5, 16)
  np.testing.assert_allclose(b.sum(1), 1.0, rtol=0, atol=1e-12)
  np.testing.assert_array_equal(bicubic_matrix(1, 16), np.ones((16, 1)))
  # A = -0.75 gives a negative lobe (A = -0.5 as in jax.image.resize would differ)
  assert b.min() < -0.05
  x = jnp.ones((2, 7, 7, 3))
  assert area_resize(x, 7) is x and bicubic_resize(x, 7) is x
  with pytest.raises(ValueError, match="square NHWC"):
    area_resize(jnp.ones((1, 4, 5, 2)), 2)


# ---------------------------------------------------------------------------------------------- config + phi
def test_phi_indices_official_tables():
  assert phi_indices(10, 4) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
  assert phi_indices(14, 4) == (0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3)
  assert phi_indices(4, 4) == (0, 1, 2, 3)
  assert phi_indices(5, 4) == (0, 1, 2, 2, 3)
  assert phi_indices(6, 1) == (0,) * 6
  assert phi_indices(4, 0) == (0, 1, 2, 3)  # one phi per scale
  # K != 4: ticks linspace(1/2K, 1-1/2K, K) = (1/6, 1/2, 5/6); si = 3 and 6 are real-arithmetic ties that
  # float64 rounding sends to the lower tick
  assert phi_indices(10, 3) == (0, 0, 0, 0, 1, 1, 1, 2, 2, 2)


def test_config_presets_and_validation():
  c256, c512 = VQVAEConfig.preset("vqvae_256"), VQVAEConfig.preset("vqvae_512")
  assert (c256.ch, c256.ch_mult, c256.z_channels, c256.vocab_size) == (160, (1, 1, 2, 2, 4), 32, 4096)
  assert c256.downsample == 16 and c256.image_size == 256 and c256.num_tokens == 680
  assert (
    c512.patch_nums == (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
    and c512.image_size == 512
    and c512.num_tokens == 2240
  )
  t1 = VQVAEConfig.preset("t1")
  assert t1.image_size == 16 and t1.num_tokens == 30
  assert VQVAEConfig.from_dict(t1.to_dict()) == t1
  c256.check_image_size(256)
  with pytest.raises(ValueError, match=r"image size 512 .* patch_nums\[-1\] = 16"):
    c256.check_image_size(512)
  with pytest.raises(ValueError, match="image size 200"):
    c256.check_image_size(200)
  with pytest.raises(ValueError, match="strictly increasing"):
    VQVAEConfig(patch_nums=(1, 3, 2))
  with pytest.raises(ValueError, match="divisible by 32"):
    VQVAEConfig(ch=48)
  with pytest.raises(ValueError, match="unknown VQVAEConfig fields"):
    VQVAEConfig.from_dict({"chh": 3})
  with pytest.raises(ValueError, match="unknown VQVAE preset"):
    VQVAEConfig.preset("nope")


def test_wrong_image_size_is_a_clear_error(t1):
  model, _, _ = t1
  with pytest.raises(ValueError, match=r"image size 32 gives a latent of 8 .* patch_nums\[-1\] = 4"):
    model.encode(jnp.zeros((1, 32, 32, 3)))


# ------------------------------------------------------------------------------------------------ T1 parity
def test_t1_encoder_and_tokens(t1, t1_out):
  model, io, _ = t1
  f = t1_out["enc_f"]
  assert f.shape == (4, 4, 4, 8) and f.dtype == jnp.float32
  assert _report("enc_f", f, _nhwc(io["enc_f"])) < 1e-5
  idx = t1_out["idx_from_img"]
  assert [i.shape for i in idx] == [(4, 1), (4, 4), (4, 9), (4, 16)]
  for si in range(S):
    assert idx[si].dtype == jnp.int32
    np.testing.assert_array_equal(idx[si], io[f"idx_s{si}"])
    np.testing.assert_array_equal(t1_out["idx_from_f"][si], io[f"idx_s{si}"])  # from the fixture's f
  np.testing.assert_array_equal(jnp.concatenate(idx, axis=1), io["idx_BL"])
  np.testing.assert_array_equal(
    jnp.concatenate(model.split_tokens(jnp.asarray(io["idx_BL"])), 1), io["idx_BL"]
  )
  print("tokens: exact on all", S, "scales")


def test_t1_fhat(t1_out, t1):
  _, io, _ = t1
  for si in range(S):
    want = _nhwc(io["fhat_per_scale"][si])
    assert _report(f"fhat_per_scale[{si}] (from f)", t1_out["fhat_from_f"][si], want) < 1e-5
    assert _report(f"fhat_per_scale[{si}] (from idx)", t1_out["fhat_from_idx"][si], want) < 1e-5
  assert _report("fhat_final", t1_out["fhat_final"], _nhwc(io["fhat_final"])) < 1e-5
  # the first two scales only: the partial sum of the full decode
  np.testing.assert_allclose(t1_out["fhat_2_scales"], t1_out["fhat_from_idx"][1], atol=1e-6, rtol=0)


def test_t1_reconstruction(t1_out, t1):
  _, io, _ = t1
  rec = t1_out["rec"]
  assert rec.shape == (4, 16, 16, 3)
  assert _report("rec_img", rec, _nhwc(io["rec_img"])) < 1e-4
  assert float(jnp.max(jnp.abs(rec))) <= 1.0
  for si in range(S):
    assert (
      _report(f"rec_img_per_scale[{si}]", t1_out["rec_per_scale"][si], _nhwc(io["rec_img_per_scale"][si]))
      < 1e-4
    )
  assert _report("reconstruct(img)", t1_out["rec_from_img"], _nhwc(io["rec_img"])) < 1e-4


def test_t1_var_input_both_paths(t1, t1_out):
  model, io, _ = t1
  idx = [jnp.asarray(io[f"idx_s{si}"]) for si in range(S)]
  x = t1_out["var_input"]
  assert x.shape == (4, 29, 8)
  assert _report("var_input", x, io["var_input"]) < 1e-5
  # the sampling path: next_autoregressive_input scale by scale reproduces var_input and f_hat
  pn = model.config.patch_nums
  f_hat = jnp.zeros((4, 4, 4, 8), jnp.float32)
  nexts = []
  for si in range(S):
    h = model.embed(idx[si]).reshape(4, pn[si], pn[si], 8)
    f_hat, nxt = model.next_autoregressive_input(si, f_hat, h)
    if si < S - 1:
      assert nxt.shape == (4, pn[si + 1], pn[si + 1], 8)
      nexts.append(nxt.reshape(4, -1, 8))
    else:
      assert nxt is f_hat
  assert _report("var_input (autoregressive path)", jnp.concatenate(nexts, 1), io["var_input"]) < 1e-5
  assert _report("fhat_final (autoregressive path)", f_hat, _nhwc(io["fhat_final"])) < 1e-5


def test_resnet_block_with_nin_shortcut(shared_dir):
  d = np.load(shared_dir / "fixtures" / "var" / "common" / "vae_units.npz")
  sd = {k.removeprefix("rb_32_64."): d[k] for k in d.files if k.startswith("rb_32_64.") and "put" not in k}
  with nnx.use_eager_sharding(False):
    block = ResnetBlock(32, 64, rngs=nnx.Rngs(0))
  load_official_state_dict(block, sd)
  assert block.nin_shortcut is not None
  out = nnx.jit(lambda b, x: b(x))(block, jnp.asarray(_nhwc(d["rb_32_64.input"])))
  assert _report("ResnetBlock(32, 64)", out, _nhwc(d["rb_32_64.output"])) < 1e-5


# ------------------------------------------------------------------------------------------------ training
@jax.jit
def _training_check(graphdef, params, img, f, cotangent):
  """Training forward + the gradients of [reconstruction loss, vq_loss] (one vmapped backward pass), and the
  pull-back of `cotangent` through the quantizer's straight-through output at f."""

  def losses(p):
    rec, vq_loss, idx = nnx.merge(graphdef, p)(img)
    return jnp.stack([jnp.mean(jnp.square(rec - img)), vq_loss]), (rec, vq_loss, idx)

  _, pullback, forward = jax.vjp(losses, params, has_aux=True)
  grads = jax.vmap(lambda ct: pullback(ct)[0])(jnp.eye(2))
  quantizer = nnx.merge(graphdef, params).quantize
  _, st_pullback = jax.vjp(lambda ff: quantizer(ff)[0], f)
  return dict(forward=forward, grads=grads, st_grad=st_pullback(cotangent)[0])


def _max_abs(tree, i) -> float:
  return max(float(jnp.max(jnp.abs(x[i]))) for x in jax.tree.leaves(tree))


def test_training_forward_loss_and_straight_through(t1):
  model, io, _ = t1
  img = jnp.asarray(_nhwc(io["img"]))
  graphdef, params = nnx.split(model, nnx.Param)
  cotangent = jax.random.normal(jax.random.key(0), (4, 4, 4, 8))
  out = _training_check(graphdef, params, img, jnp.asarray(_nhwc(io["enc_f"])), cotangent)
  rec, vq_loss, idx = out["forward"]
  for si in range(S):
    np.testing.assert_array_equal(idx[si], io[f"idx_s{si}"])
  # the forward value is f_hat: clamped, it is the official reconstruction
  assert _report("training forward rec (clamped)", jnp.clip(rec, -1, 1), _nhwc(io["rec_img"])) < 1e-4
  # vq_loss = mean_si [beta * MSE(sg(f_hat_si), f) + MSE(f_hat_si, sg(f))] = (1 + beta) * mean_si MSE
  f = io["enc_f"].astype(np.float64)
  mse = [np.mean((io["fhat_per_scale"][si].astype(np.float64) - f) ** 2) for si in range(S)]
  want = (1 + model.config.beta) * np.mean(mse)
  print(f"vq_loss {float(vq_loss):.8g} vs numpy float64 {want:.8g}")
  np.testing.assert_allclose(float(vq_loss), want, rtol=1e-5)

  g = out["grads"]  # every leaf has a leading axis [d rec_loss, d vq_loss]
  rec_i, vq_i = 0, 1
  # reconstruction gradient reaches the encoder through the straight-through estimator, not the codebook/phi
  assert _max_abs(g["encoder"]["conv_in"]["kernel"], rec_i) > 0
  assert _max_abs(g["decoder"]["conv_out"]["kernel"], rec_i) > 0
  assert _max_abs(g["quantize"], rec_i) == 0
  # vq_loss trains the codebook, phi and (commitment) the encoder, never the decoder
  assert _max_abs(g["quantize"]["embedding"]["embedding"], vq_i) > 0
  assert _max_abs(g["quantize"]["quant_resi"]["qresi_ls"][0]["kernel"], vq_i) > 0
  assert _max_abs(g["encoder"]["conv_in"]["kernel"], vq_i) > 0
  assert _max_abs(g["decoder"], vq_i) == 0
  # straight-through: d f_hat_out / d f is the identity
  np.testing.assert_array_equal(out["st_grad"], cotangent)


# ------------------------------------------------------------------------------------------------ sharding
def test_build_with_eager_sharding_under_mesh(t1):
  _, io, sd = t1
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  rules = (("codebook", "data"), ("latent", None), ("conv_in", None), ("conv_out", None))
  t1_cfg = VQVAEConfig.preset("t1")
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    # the whole model abstractly (an eager random init is slow on a shared 2-core CPU), the quantizer for real
    model = nnx.eval_shape(lambda: VQVAE(t1_cfg, rngs=nnx.Rngs(0)))
    quantizer = VectorQuantizer(vocab_size=64, z_channels=8, patch_nums=t1_cfg.patch_nums, rngs=nnx.Rngs(0))
  kernel = model.encoder.down[2].attn[1].qkv.kernel
  assert kernel.get_metadata()["out_sharding"] == (None, None, "conv_in", "conv_out")
  assert kernel.get_value().sharding.spec == jax.P(None, None, None, None)
  assert model.quantize.embedding.embedding.get_value().sharding.spec == jax.P("data", None)
  emb = quantizer.embedding.embedding
  assert emb.get_metadata()["out_sharding"] == ("codebook", "latent")
  assert emb[...].sharding.spec == jax.P("data", None)
  # the T1 quantizer, codebook split over 8 devices, gives the exact tokens; loading keeps the sharding
  q_sd = {
    k.removeprefix("quantize."): v for k, v in sd.items() if k.startswith("quantize.") and "ema" not in k
  }
  load_official_state_dict(quantizer, q_sd)
  assert quantizer.embedding.embedding[...].sharding.spec == jax.P("data", None)
  idx = nnx.jit(lambda q, f: q.f_to_idx_or_fhat(f))(quantizer, jnp.asarray(_nhwc(io["enc_f"])))
  for si in range(S):
    np.testing.assert_array_equal(idx[si], io[f"idx_s{si}"])


def test_bfloat16_activations_keep_float32_params(t1):
  _, io, sd = t1
  model = load_official_vqvae(sd, dataclasses.replace(VQVAEConfig.preset("t1"), dtype="bfloat16"))
  assert model.encoder.conv_in.kernel[...].dtype == jnp.float32
  assert model.encoder.conv_in.dtype == jnp.bfloat16
  f = nnx.jit(lambda m, x: m.encode(x))(model, jnp.asarray(_nhwc(io["img"])))
  assert f.dtype == jnp.float32
  err = _report("enc_f (bfloat16 activations)", f, _nhwc(io["enc_f"]))
  assert 0 < err < 0.1


# ------------------------------------------------------------------------------------------------ variants
@pytest.mark.parametrize("share, quant_resi, using_znorm", [(0, 0.5, False), (1, 0.5, False), (4, 0.0, True)])
def test_quantizer_variants_against_numpy(share, quant_resi, using_znorm):
  """phi sharing modes, identity phi (quant_resi 0) and z-norm on P = 5 (overlapping area windows 5 -> 3)."""
  patch_nums = (1, 2, 3, 5)
  with nnx.use_eager_sharding(False):
    q = VectorQuantizer(
      vocab_size=16,
      z_channels=8,
      patch_nums=patch_nums,
      quant_resi=quant_resi,
      share_quant_resi=share,
      using_znorm=using_znorm,
      rngs=nnx.Rngs(share),
    )
  assert q.phi_index == phi_indices(4, share)
  f = jax.random.normal(jax.random.key(1), (2, 5, 5, 8))
  idx = q.f_to_idx_or_fhat(f)
  f_hats = q.f_to_idx_or_fhat(f, to_fhat=True)
  np.testing.assert_allclose(q.idx_to_fhat(idx), f_hats[-1], atol=1e-6, rtol=0)
  if quant_resi == 0:
    # identity phi: replay the algorithm in float64 numpy with the (fixture-verified) resampling matrices
    e = np.asarray(q.codebook(), np.float64)
    rest, f_hat = np.asarray(f, np.float64), 0.0
    for si, pn in enumerate(patch_nums):
      z = np.einsum("oh,bhwc,pw->bopc", area_matrix(5, pn), rest, area_matrix(5, pn)) if pn != 5 else rest
      z = z.reshape(-1, 8)
      if using_znorm:
        unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
        want = np.argmax(unit(z) @ unit(e).T, 1)
      else:
        want = np.argmin(((z[:, None] - e[None]) ** 2).sum(-1), 1)
      np.testing.assert_array_equal(np.asarray(idx[si]).reshape(-1), want)
      h = e[want].reshape(2, pn, pn, 8)
      h = np.einsum("oh,bhwc,pw->bopc", bicubic_matrix(pn, 5), h, bicubic_matrix(pn, 5)) if pn != 5 else h
      rest, f_hat = rest - h, f_hat + h
    np.testing.assert_allclose(f_hats[-1], f_hat, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ precision
def _precisions(model) -> dict[str, set]:
  """Precision of every conv (quantizer phi apart) and attention block, grouped by module type."""
  out = {"conv": set(), "phi": set(), "attn": set()}
  for _, m in nnx.iter_graph(model):
    if isinstance(m, Phi):
      out["phi"].add(m.precision)
    elif isinstance(m, nnx.Conv):
      out["conv"].add(m.precision)
    elif isinstance(m, AttnBlock):
      out["attn"].add(m.precision)
  return out


def test_config_precision_field_round_trip_and_validation():
  t1 = VQVAEConfig.preset("t1")
  assert t1.precision == "highest"
  fast = dataclasses.replace(t1, precision="default")
  d = fast.to_dict()
  assert d["precision"] == "default"
  assert VQVAEConfig.from_dict(d) == fast
  assert VQVAEConfig.from_dict(json.loads(fast.to_json())) == fast
  # a config saved before the field existed loads at full precision
  old = {k: v for k, v in t1.to_dict().items() if k != "precision"}
  assert VQVAEConfig.from_dict(old).precision == "highest"
  with pytest.raises(ValueError, match=r"precision must be one of \['default', 'high', 'highest'\].*'fp32'"):
    VQVAEConfig.from_dict({**d, "precision": "fp32"})


@pytest.mark.parametrize("name, want", [("highest", jax.lax.Precision.HIGHEST), ("default", None)])
def test_precision_reaches_every_conv_and_attention(name, want):
  cfg = dataclasses.replace(VQVAEConfig.preset("t1"), precision=name)
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: VQVAE(cfg, rngs=nnx.Rngs(0)))
  got = _precisions(model)
  assert got["conv"] == {want} and got["attn"] == {want}, got
  assert got["phi"] == {jax.lax.Precision.HIGHEST}  # the quantizer is always exact float32
  assert model.quant_conv.precision == want and model.post_quant_conv.precision == want


def test_bfloat16_attention_softmax_in_float32():
  with nnx.use_eager_sharding(False):
    block = AttnBlock(32, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 32), jnp.bfloat16)
  jaxpr = jax.make_jaxpr(lambda x: block(x))(x)
  exps = [e for e in jaxpr.eqns if e.primitive.name == "exp"]
  assert exps and all(e.outvars[0].aval.dtype == jnp.float32 for e in exps)
  assert jaxpr.out_avals[0].dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------------ sampling glue
def test_next_autoregressive_input_range_and_float32(t1):
  model, io, _ = t1
  f_hat = jnp.zeros((4, 4, 4, 8), jnp.float32)
  h = model.embed(jnp.asarray(io["idx_s1"])).reshape(4, 2, 2, 8)
  for si in (-1, S):
    with pytest.raises(ValueError, match=rf"si={si} is out of range \[0, 3\] for S=4"):
      model.next_autoregressive_input(si, f_hat, h)
  # a bfloat16 h is resampled in float32 (a bf16 bicubic matrix would round the weights)
  h16 = h.astype(jnp.bfloat16)
  got, nxt = model.next_autoregressive_input(1, f_hat, h16)
  want, want_nxt = model.next_autoregressive_input(1, f_hat, h16.astype(jnp.float32))
  assert got.dtype == jnp.float32 and nxt.dtype == jnp.float32
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(nxt, want_nxt)


# ------------------------------------------------------------------------------------------------ dropout
@nnx.jit
def _dropout_outputs(model, img):
  return dict(
    f=[model.encode(img), model.encode(img)],
    idx=[model.img_to_idx(img), model.img_to_idx(img)],
    train=[model(img)[0], model(img)[0]],
    det=model(img, deterministic=True),
  )


def test_dropout_only_in_the_training_forward():
  cfg = VQVAEConfig(
    ch=32, ch_mult=(1, 1), num_res_blocks=1, using_sa=False, using_mid_sa=False, z_channels=4, vocab_size=16,
    patch_nums=(1, 4), dropout=0.5,
  )
  with nnx.use_eager_sharding(False):
    model = VQVAE(cfg, rngs=nnx.Rngs(0))
  # a codebook at the scale of f (the official init is ~1/V, far smaller), so that tokens depend on f
  model.quantize.embedding.embedding[...] = 0.2 * jax.random.normal(jax.random.key(1), (16, 4))
  img = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1.0, maxval=1.0)
  out = _dropout_outputs(model, img)  # the module is in train mode (nnx.Dropout's default)
  np.testing.assert_array_equal(*out["f"])
  assert len(np.unique(np.asarray(out["idx"][0][-1]))) > 3
  for a, b, c in zip(*out["idx"], out["det"][2], strict=True):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)  # the deterministic training forward picks the same tokens
  # the training forward drops: two calls draw different masks
  assert float(jnp.max(jnp.abs(out["train"][0] - out["train"][1]))) > 1e-3
