"""Config inference from official state dicts, including narrow models (widths below 64)."""

import dataclasses

import pytest
from flax import nnx

from var import model as var_model
from var import official


def _state_dict(cfg):
  with nnx.use_eager_sharding(False):
    return official.to_state_dict(var_model.VAR(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("width,heads", [(32, 2), (48, 3)])
def test_narrow_l2_models_are_inferred_exactly(width, heads):
  cfg = var_model.preset("tiny", width=width, num_heads=heads, depth=2, patch_nums=(1, 2, 3))
  inferred = official.config_from_state_dict(_state_dict(cfg), init_adaln_gamma=cfg.init_adaln_gamma,
                                             drop_path_rate=cfg.drop_path_rate)
  assert inferred == cfg


def test_head_count_without_l2_attention_is_asked_for_not_guessed():
  cfg = var_model.preset("tiny", width=32, num_heads=2, depth=2, patch_nums=(1, 2, 3), attn_l2_norm=False)
  sd = _state_dict(cfg)
  with pytest.raises(ValueError, match=r"does not determine the head count.*width-32.*\[1, 2, 4, 8, 16, 32\]"
                                       r".*Pass num_heads="):
    official.config_from_state_dict(sd)
  inferred = official.config_from_state_dict(sd, num_heads=2, init_adaln_gamma=cfg.init_adaln_gamma,
                                             drop_path_rate=cfg.drop_path_rate)
  assert inferred == cfg
  with pytest.raises(ValueError, match="num_heads=3 does not divide the width 32"):
    official.config_from_state_dict(sd, num_heads=3)
  assert dataclasses.replace(inferred, num_heads=4) != cfg  # the head count really is a free choice here
