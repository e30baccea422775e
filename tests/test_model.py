"""VAR transformer parity with the official PyTorch model (fixture T1) and the configuration paths it lacks."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from var import model as var_model
from var import official

# one compiled forward per model architecture (eager calls would retrace the layer scan every time)
fwd = nnx.jit(lambda m, labels, x: m(labels, x))


@pytest.fixture(scope="module")
def t1(shared_dir):
  root = shared_dir / "fixtures" / "var" / "T1"
  io = dict(np.load(root / "io.npz"))
  sd = dict(np.load(root / "var.npz"))
  cfg = var_model.preset("tiny")
  model = official.load_state_dict(var_model.abstract(cfg), sd)  # abstract build: no random init
  return cfg, model, io


def test_t1_forward_intermediates(t1):
  cfg, model, io = t1
  labels, x = jnp.asarray(io["labels_fwd"]), jnp.asarray(io["var_input"])
  cond = model.condition(labels)
  np.testing.assert_allclose(cond, io["cond_BD_fwd"], atol=1e-6, rtol=0)
  h = model.embed_inputs(cond, x)
  np.testing.assert_allclose(h, io["h_embed"], atol=1e-5, rtol=0)
  # block 0 alone: slice layer 0 out of the stacked parameters
  graphdef, state = nnx.split(model.blocks)
  block0 = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
  bias = jnp.asarray(var_model.block_causal_bias(cfg.patch_nums))
  h0 = block0(h, model.block_condition(cond), attn_bias=bias)
  np.testing.assert_allclose(h0, io["h_block0"], atol=1e-5, rtol=0)


def test_t1_logits(t1):
  _, model, io = t1
  logits = model(jnp.asarray(io["labels_fwd"]), jnp.asarray(io["var_input"]))  # eager
  assert logits.shape == (4, 30, 64) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, io["logits_fwd"], atol=1e-4, rtol=0)
  jitted = fwd(model, jnp.asarray(io["labels_fwd"]), jnp.asarray(io["var_input"]))
  np.testing.assert_allclose(jitted, io["logits_fwd"], atol=1e-4, rtol=0)


def test_t1_loss_and_grads(t1):
  _, model, io = t1
  labels, x, targets = (jnp.asarray(io[k]) for k in ("labels_fwd", "var_input", "idx_BL"))

  def loss_fn(m, ls):
    return var_model.cross_entropy_loss(m(labels, x), targets, label_smoothing=ls)

  logits = fwd(model, labels, x)
  np.testing.assert_allclose(var_model.cross_entropy_loss(logits, targets), io["loss_ls0"], rtol=1e-5)
  np.testing.assert_allclose(var_model.cross_entropy_loss(logits, targets, 0.1), io["loss_ls0p1"], rtol=1e-5)
  grads = nnx.jit(nnx.grad(loss_fn), static_argnums=1)(model, 0.0)
  gnorm = math.sqrt(sum(float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(gnorm, io["grad_global_norm"], rtol=1e-4)
  gsd = official.to_state_dict(model, grads, buffers=False)
  names = [k[len("grad."):] for k in io if k.startswith("grad.")]
  assert len(names) == 8
  for name in names:
    ref = io["grad." + name]
    np.testing.assert_allclose(gsd[name], ref, rtol=0, atol=1e-4 * np.abs(ref).max(), err_msg=name)


def test_class_dropout_and_drop_path_need_rng(t1):
  cfg, model, io = t1
  labels, x = jnp.asarray(io["labels_fwd"]), jnp.asarray(io["var_input"])
  with pytest.raises(ValueError, match="rng"):
    model(labels, x, cond_drop_rate=0.5)
  with pytest.raises(ValueError, match="rng"):
    model(labels, x, deterministic=False)
  # rate 1: every label becomes the null class
  out = model(labels, x, cond_drop_rate=1.0, rng=jax.random.key(0))
  ref = fwd(model, jnp.full_like(labels, cfg.num_classes), x)
  np.testing.assert_allclose(out, ref, atol=1e-6)
  # drop path (training mode): rates linspace(0, 0.9, depth) -> block 1 drops its branches with p = 0.9
  dp = official.load_state_dict(var_model.abstract(dataclasses.replace(cfg, drop_path_rate=0.9)),
                                official.to_state_dict(model))
  train = nnx.jit(lambda m, lab, x, key: m(lab, x, deterministic=False, rng=key))
  a, a2, b = (train(dp, labels, x, jax.random.key(k)) for k in (0, 0, 1))
  np.testing.assert_array_equal(a, a2)  # the rng fully determines the masks
  eval_out = fwd(dp, labels, x)
  np.testing.assert_allclose(eval_out, io["logits_fwd"], atol=1e-4)  # eval ignores the rate
  changed = [not np.allclose(o, eval_out, atol=1e-4) for o in (a, b)]
  assert any(changed) and not np.allclose(a, b)


def test_drop_path_rates_and_scaling():
  x = jnp.ones((4096, 3))
  y = var_model.drop_path(x, 0.25, jax.random.key(0))
  kept = np.asarray(y[:, 0] != 0)
  assert 0.70 < kept.mean() < 0.80
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
  assert var_model.drop_path(x, 0.25, None) is x


def test_bfloat16_activations_close_to_float32(t1):
  cfg, model, io = t1
  sd = official.to_state_dict(model)
  bf = official.load_state_dict(var_model.abstract(var_model.preset("tiny", dtype="bfloat16")), sd)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(bf, nnx.Param)))
  out = fwd(bf, jnp.asarray(io["labels_fwd"]), jnp.asarray(io["var_input"]))
  assert out.dtype == jnp.float32
  ref = io["logits_fwd"]
  err = float(jnp.abs(out - ref).max())
  assert 1e-5 < err < 0.05 * np.abs(ref).max(), err  # really bf16, still the same function


def test_init_statistics():
  cfg = var_model.VARConfig.from_depth(2, patch_nums=(1, 2, 4), vocab_size=256, z_channels=8, num_classes=100,
                                       init_adaln=0.5, init_adaln_gamma=1e-3)
  m = var_model.build(cfg, seed=0)
  c, std = cfg.width, math.sqrt(1 / (3 * cfg.width))
  assert cfg.width == 128 and cfg.num_heads == 2 and cfg.mlp_hidden == 512
  np.testing.assert_allclose(cfg.drop_path_rate, 0.1 * 2 / 24)
  np.testing.assert_allclose(np.std(m.blocks.attn.mat_qkv.kernel[...]), std, rtol=0.02)
  np.testing.assert_allclose(np.std(m.blocks.attn.proj.kernel[...]), std / math.sqrt(4), rtol=0.03)
  np.testing.assert_allclose(np.std(m.blocks.ffn.fc2.kernel[...]), std / math.sqrt(4), rtol=0.03)
  ada = np.asarray(m.blocks.ada_lin.kernel[...])  # (layers, C, 6C)
  np.testing.assert_allclose(ada[..., :2 * c].std(), 1e-3 * std, rtol=0.03)
  np.testing.assert_allclose(ada[..., 2 * c:].std(), 0.5 * std, rtol=0.03)
  np.testing.assert_allclose(np.std(m.head.kernel[...]), 0.02 * std, rtol=0.03)
  np.testing.assert_allclose(np.std(m.head_nm.ada_lin.kernel[...]), 0.5 * std, rtol=0.03)
  np.testing.assert_allclose(np.std(m.class_emb.embedding[...]), std, rtol=0.05)
  np.testing.assert_allclose(m.blocks.attn.scale_mul_1H11[...], math.log(4.0))
  for z in (m.blocks.attn.q_bias, m.blocks.attn.v_bias, m.blocks.ada_lin.bias, m.head.bias, m.word_embed.bias):
    assert not np.any(z[...])
  # layers are initialised independently
  assert not np.allclose(m.blocks.ffn.fc1.kernel[...][0], m.blocks.ffn.fc1.kernel[...][1])
  assert m.blocks.ffn.fc1.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")


@pytest.mark.parametrize("overrides", [
  dict(shared_aln=True),
  dict(attn_l2_norm=False),
  dict(patch_nums=(1, 2, 3, 5)),  # scale areas 1, 4, 9, 25: non-square cumulative lengths
])
def test_config_paths_roundtrip_and_block_causality(overrides):
  cfg = var_model.preset("tiny", **overrides)
  m = var_model.build(cfg, seed=3)
  if cfg.shared_aln:  # shared AdaLN starts at gamma ~ 1e-5: make the blocks matter for the causality check
    m.blocks.ada_gss[...] = m.blocks.ada_gss[...] * 1e3
  sd = official.to_state_dict(m)
  assert {k: v.shape for k, v in sd.items()} == official.expected_state_dict_shapes(cfg)
  assert ("shared_ada_lin.1.weight" in sd) == cfg.shared_aln
  assert ("blocks.0.ada_gss" in sd) == cfg.shared_aln and ("blocks.0.ada_lin.1.weight" in sd) != cfg.shared_aln
  assert ("blocks.1.attn.scale_mul_1H11" in sd) == cfg.attn_l2_norm
  m2 = official.load_state_dict(var_model.abstract(cfg), sd)
  rng = np.random.default_rng(0)
  labels = jnp.asarray([1, 10])
  x = jnp.asarray(rng.normal(size=(2, cfg.seq_len - 1, cfg.z_channels)), jnp.float32)
  out, out2 = fwd(m, labels, x), fwd(m2, labels, x)
  np.testing.assert_array_equal(out, out2)
  assert out.shape == (2, cfg.seq_len, cfg.vocab_size)
  # block-causal: changing the inputs of the last scale leaves all earlier scales' logits unchanged
  beg = cfg.begin_ends[-1][0]
  x2 = x.at[:, beg - 1:].add(1.0)
  out3 = fwd(m, labels, x2)
  np.testing.assert_allclose(out3[:, :beg], out[:, :beg], atol=1e-6)
  assert np.abs(out3[:, beg:] - out[:, beg:]).max() > 1e-4
  # progressive training: a truncated input gives the logits of the first scales
  out4 = fwd(m, labels, x[:, :cfg.begin_ends[2][1] - 1])
  np.testing.assert_allclose(out4, out[:, :cfg.begin_ends[2][1]], atol=1e-5)


def test_non_l2_attention_scale():
  """attn_l2_norm=False uses the official 0.25/sqrt(hd) softmax scale (checked against a hand computation)."""
  cfg = var_model.preset("tiny", attn_l2_norm=False)
  with nnx.use_eager_sharding(False):
    attn = var_model.SelfAttention(cfg, rngs=nnx.Rngs(0))
  assert not hasattr(attn, "scale_mul_1H11")
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 5, cfg.width)), jnp.float32)
  attn.q_bias[...] = jnp.full((cfg.width,), 0.3)
  qkv = x @ attn.mat_qkv.kernel[...] + jnp.concatenate([attn.q_bias[...], jnp.zeros(cfg.width), attn.v_bias[...]])
  q, k, v = (qkv[..., i * cfg.width:(i + 1) * cfg.width].reshape(1, 5, 4, 16).transpose(0, 2, 1, 3) for i in range(3))
  w = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) * 0.25 / 4.0, axis=-1)
  ref = (w @ v).transpose(0, 2, 1, 3).reshape(1, 5, cfg.width) @ attn.proj.kernel[...] + attn.proj.bias[...]
  np.testing.assert_allclose(attn(x), ref, atol=1e-5)


def test_official_param_counts():
  """Counted from abstract shapes (nothing allocated): exactly the numbers of VAR.md 2.1."""
  expected = {"d16": 310_283_520, "d20": 600_917_136, "d24": 1_033_399_360, "d30": 2_010_020_356,
              "d36": 2_353_893_904}
  for name, count in expected.items():
    assert var_model.param_count(var_model.abstract(var_model.preset(name))) == count, name


def test_config_dict_roundtrip_and_errors():
  cfg = var_model.preset("d36")
  assert cfg.patch_nums == var_model.PATCH_NUMS_512 and cfg.shared_aln and cfg.seq_len == 2240
  assert var_model.VARConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="unknown VARConfig fields"):
    var_model.VARConfig.from_dict({"depht": 3})
  with pytest.raises(ValueError, match="divisible"):
    var_model.VARConfig(width=100, num_heads=3)
  with pytest.raises(ValueError, match="unknown VAR preset"):
    var_model.preset("d17")


def test_eager_sharded_build_and_forward(t1):
  """Built under a (2, 2, 2) mesh with eager sharding: parameters are placed by the logical rules, and loading
  official weights keeps that placement. (Sharded execution is covered by test_sampler / the train tests.)"""
  from var import sharding

  cfg, model, io = t1
  mesh = sharding.make_mesh((2, 2, 2))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.rules_for_mesh(mesh)):
    m = var_model.VAR(cfg, rngs=nnx.Rngs(0))
    assert m.blocks.ffn.fc1.kernel[...].sharding.spec == jax.P(None, "fsdp", "tensor")
    assert m.head.kernel[...].sharding.spec == jax.P("fsdp", "tensor")
    official.load_state_dict(m, official.to_state_dict(model))
  kernel = m.blocks.ffn.fc1.kernel[...]
  assert kernel.sharding.spec == jax.P(None, "fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (2, 32, 128)
  np.testing.assert_array_equal(kernel, model.blocks.ffn.fc1.kernel[...])
