"""Official VQVAE state-dict mapping: the official key/shape list, strict errors, round trips, variants."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from tokenizer import (
  VQVAE,
  VQVAEConfig,
  check_state_dict,
  load_official_state_dict,
  load_official_vqvae,
  num_params,
  official_shapes,
  phi_indices,
  to_official_state_dict,
)
from tokenizer.quantizer import phi_ticks


def _abstract(config: VQVAEConfig) -> VQVAE:
  def build():
    with nnx.use_eager_sharding(False):
      return VQVAE(config, rngs=nnx.Rngs(0))

  return nnx.eval_shape(build)


@pytest.fixture(scope="module")
def official(shared_dir):
  with open(shared_dir / "fixtures" / "var" / "official_state_dict_shapes.json") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def official_vae(official):
  entry = official["vae_ch160v4096z32"]
  shapes = {k: tuple(s) for k, s, _ in entry["keys"]}
  return entry, shapes, _abstract(VQVAEConfig.preset("vqvae_256"))


def test_official_config_has_exactly_the_official_keys(official_vae):
  entry, shapes, model = official_vae
  assert len(shapes) == 324
  want = {k: s for k, s in shapes.items() if k != "quantize.ema_vocab_hit_SV"}
  assert official_shapes(model) == want
  assert num_params(model) == entry["num_params"] == 108_948_355
  assert num_params(model.encoder) == entry["num_params_encoder"]
  assert num_params(model.decoder) == entry["num_params_decoder"]
  # the 512px preset differs only in patch_nums: same parameters
  assert official_shapes(_abstract(VQVAEConfig.preset("vqvae_512"))) == want


def test_official_zero_weights_load_into_the_abstract_model(official_vae):
  _, shapes, model = official_vae
  # zero-stride views: the full-size state dict costs no memory until it is placed
  sd = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
  load_official_state_dict(model, sd)
  kernel = model.decoder.up[1].block[0].nin_shortcut.kernel[...]
  assert (
    isinstance(kernel, jax.Array) and kernel.shape == (1, 1, 320, 160) and not kernel.any()
  )  # OIHW -> HWIO
  assert model.quantize.embedding.embedding[...].shape == (4096, 32)


def test_strict_errors_name_every_bad_key(official_vae):
  _, shapes, model = official_vae
  sd = {k: jax.ShapeDtypeStruct(s, np.float32) for k, s in shapes.items()}
  check_state_dict(model, sd)  # the full official list is accepted (shapes only)

  dropped = dict(sd)
  del dropped["decoder.up.4.attn.2.qkv.bias"]
  with pytest.raises(
    ValueError, match=r"missing key: decoder\.up\.4\.attn\.2\.qkv\.bias \(expected shape \(1920,\)\)"
  ):
    check_state_dict(model, dropped)

  reshaped = dict(sd)
  reshaped["encoder.conv_out.weight"] = jax.ShapeDtypeStruct((32, 640, 1, 1), np.float32)
  want = r"shape mismatch: encoder\.conv_out\.weight: checkpoint \(32, 640, 1, 1\) vs model \(32, 640, 3, 3\)"
  with pytest.raises(ValueError, match=want):
    check_state_dict(model, reshaped)

  # all problems at once, in ONE error
  bad = dict(dropped)
  bad["encoder.conv_out.weight"] = reshaped["encoder.conv_out.weight"]
  bad["quantize.quant_resi.qresi_ls.4.weight"] = jax.ShapeDtypeStruct((32, 32, 3, 3), np.float32)
  with pytest.raises(ValueError) as e:
    load_official_state_dict(model, bad)
  msg = str(e.value)
  assert "missing key: decoder.up.4.attn.2.qkv.bias" in msg
  assert "shape mismatch: encoder.conv_out.weight" in msg
  assert "unexpected key: quantize.quant_resi.qresi_ls.4.weight (shape (32, 32, 3, 3))" in msg
  assert msg.count("\n  ") == 3


def test_usage_buffer_is_ignored_with_any_shape(official_vae):
  _, shapes, model = official_vae
  sd = {k: jax.ShapeDtypeStruct(s, np.float32) for k, s in shapes.items()}
  for shape in [(10, 4096), (14, 4096), (3, 7), ()]:
    check_state_dict(model, {**sd, "quantize.ema_vocab_hit_SV": jax.ShapeDtypeStruct(shape, np.float32)})
  del sd["quantize.ema_vocab_hit_SV"]
  check_state_dict(model, sd)


def test_phi_mapping_matches_official(official):
  np.testing.assert_array_equal(phi_ticks(4), official["phi_ticks_K4"])
  for num_scales, want in official["phi_index_by_num_scales_K4"].items():
    assert list(phi_indices(int(num_scales), 4)) == want, num_scales
  model = _abstract(VQVAEConfig.preset("vqvae_256"))
  assert model.quantize.phi_index == tuple(official["phi_index_by_num_scales_K4"]["10"])


def test_t1_round_trip(shared_dir):
  sd = dict(np.load(shared_dir / "fixtures" / "var" / "vae_shared.npz"))
  model = load_official_vqvae(sd, VQVAEConfig.preset("t1"))
  back = to_official_state_dict(model)
  assert set(back) == set(sd) - {"quantize.ema_vocab_hit_SV"}
  for k, v in back.items():
    assert v.dtype == np.float32
    np.testing.assert_array_equal(v, sd[k], err_msg=k)
  # NNX -> official -> NNX is the identity too
  again = load_official_vqvae(back, VQVAEConfig.preset("t1"))
  flat = lambda m: nnx.to_flat_state(nnx.state(m, nnx.Param))
  for (p, a), (_, b) in zip(flat(model), flat(again), strict=True):
    np.testing.assert_array_equal(a[...], b[...], err_msg=str(p))


def test_variant_key_names():
  base = VQVAEConfig.preset("t1")
  keys = lambda **kw: {
    k for k in official_shapes(_abstract(dataclasses.replace(base, **kw))) if "quant_resi" in k
  }
  # share_quant_resi 0: PhiNonShared is itself a ModuleList, one phi per scale
  assert keys(share_quant_resi=0) == {
    f"quantize.quant_resi.{i}.{w}" for i in range(4) for w in ("weight", "bias")
  }
  assert keys(share_quant_resi=1) == {"quantize.quant_resi.qresi.weight", "quantize.quant_resi.qresi.bias"}
  qresi_ls = {f"quantize.quant_resi.qresi_ls.{i}.{w}" for i in range(2) for w in ("weight", "bias")}
  assert keys(share_quant_resi=2) == qresi_ls
  assert keys(quant_resi=0.0) == set()  # nn.Identity: no phi parameters
  no_sa = official_shapes(_abstract(dataclasses.replace(base, using_sa=False, using_mid_sa=False)))
  assert not any(".attn" in k for k in no_sa)
  assert len(official_shapes(_abstract(base))) - len(no_sa) == 6 * (
    2 + 3 + 2
  )  # enc 2 + dec 3 + 2 mid AttnBlocks
