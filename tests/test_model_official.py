"""Official state-dict import: the released d16 / d36 key lists, strict errors, buffers, .pth and trainer nesting."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from var import model as var_model
from var import official


@pytest.fixture(scope="module")
def official_shapes(shared_dir):
  return json.loads((shared_dir / "fixtures" / "var" / "official_state_dict_shapes.json").read_text())


def _zero_state_dict(keys, config):
  """Zero parameters with the official key list's shapes (broadcast views: nothing allocated), true buffers."""
  dtypes = {"float32": np.float32, "int64": np.int64}
  sd = {k: np.broadcast_to(np.zeros((), dtypes[dt]), shape) for k, shape, dt in keys}
  sd["lvl_1L"] = var_model.level_index(config.patch_nums).astype(np.int64)[None]
  sd["attn_bias_for_masking"] = var_model.block_causal_bias(config.patch_nums)[None, None]
  return sd


@pytest.mark.parametrize("name,key", [("d16", "var_d16"), ("d36", "var_d36_saln_512")])
def test_released_key_lists(official_shapes, name, key):
  ref = official_shapes[key]
  cfg = var_model.preset(name)
  assert (cfg.depth, cfg.width, cfg.num_heads, cfg.shared_aln, list(cfg.patch_nums), cfg.seq_len) == (
    ref["depth"], ref["embed_dim"], ref["num_heads"], ref["shared_aln"], ref["patch_nums"], ref["L"])
  np.testing.assert_allclose(cfg.drop_path_rate, ref["drop_path_rate"])
  expected = official.expected_state_dict_shapes(cfg)
  assert expected == {k: tuple(shape) for k, shape, _ in ref["keys"]}
  sd = _zero_state_dict(ref["keys"], cfg)
  official.check_state_dict(cfg, sd)  # accepted as is
  inferred = official.config_from_state_dict(sd, init_adaln_gamma=cfg.init_adaln_gamma)
  assert inferred == cfg

  # drop one key and reshape another: ONE error names both
  bad = dict(sd)
  del bad["blocks.3.ffn.fc2.bias"]
  bad["head.weight"] = np.zeros((4096, 7), np.float32)
  bad["blocks.0.attn.extra"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as err:
    official.check_state_dict(cfg, bad)
  msg = str(err.value)
  assert "blocks.3.ffn.fc2.bias" in msg and "head.weight: got (4096, 7)" in msg and "blocks.0.attn.extra" in msg
  assert "missing keys (1)" in msg and "unexpected keys (1)" in msg and "wrong shapes (1)" in msg


def test_param_counts_match_json(official_shapes):
  for name, key in [("d16", "var_d16"), ("d20", "var_d20"), ("d24", "var_d24"), ("d30", "var_d30"),
                    ("d36", "var_d36_saln_512")]:
    assert var_model.param_count(var_model.abstract(var_model.preset(name))) == official_shapes[key]["num_params"]


def test_inconsistent_buffers_are_rejected(shared_dir):
  sd = dict(np.load(shared_dir / "fixtures" / "var" / "T1" / "var.npz"))
  cfg = var_model.preset("tiny")
  official.check_state_dict(cfg, sd)
  for key, value, what in [
    ("attn_bias_for_masking", np.zeros((1, 1, 30, 30), np.float32), "attn_bias_for_masking"),
    ("lvl_1L", np.zeros((1, 30), np.int64), "lvl_1L"),
    ("blocks.1.attn.zero_k_bias", np.ones(64, np.float32), r"zero_k_bias is not zero in blocks \[1\]"),
  ]:
    with pytest.raises(ValueError, match=what):
      official.check_state_dict(cfg, {**sd, key: value})
  # a checkpoint for other patch_nums is refused with the fix in the message
  with pytest.raises(ValueError, match="pick the model options"):
    official.check_state_dict(var_model.preset("tiny", patch_nums=(1, 2, 3, 5)), sd)


def test_pth_file_and_trainer_nesting(shared_dir):
  from tokenizer.torch_pth import load_pth

  root = shared_dir / "fixtures" / "var" / "T1"
  io = np.load(root / "io.npz")
  model = official.load_official(root / "var.pth")
  assert model.config == var_model.preset("tiny")
  logits = model(jnp.asarray(io["labels_fwd"]), jnp.asarray(io["var_input"]))
  np.testing.assert_allclose(logits, io["logits_fwd"], atol=3e-5, rtol=0)  # measured 5.7e-6
  # export reproduces the official state dict exactly (buffers included)
  sd = load_pth(root / "var.pth")
  out = official.to_state_dict(model)
  assert set(out) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(out[k], sd[k], err_msg=k)
  # trainer checkpoints nest the model under trainer.var_wo_ddp (flattened by load_pth)
  nested = {f"trainer.var_wo_ddp.{k}": v for k, v in sd.items()}
  nested["trainer.vae_local.quantize.embedding.weight"] = np.zeros((64, 8), np.float32)
  nested["epoch"] = np.asarray(3)
  params = official.state_dict_to_params(model.config, nested)
  np.testing.assert_array_equal(params[("blocks", "attn", "mat_qkv", "kernel")][1],
                                sd["blocks.1.attn.mat_qkv.weight"].T)
