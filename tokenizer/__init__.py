"""Multi-scale residual VQ tokenizer (the VAR VQVAE) in Flax NNX."""

from tokenizer.layers import AttnBlock, Decoder, Downsample, Encoder, ResnetBlock, Upsample
from tokenizer.official import (
  check_state_dict,
  load_official_state_dict,
  load_official_vqvae,
  official_shapes,
  to_official_state_dict,
)
from tokenizer.quantizer import VectorQuantizer, phi_indices
from tokenizer.resample import area_matrix, area_resize, bicubic_matrix, bicubic_resize
from tokenizer.vqvae import PATCH_NUMS_256, PATCH_NUMS_512, PRESETS, VQVAE, VQVAEConfig, num_params

__all__ = [
  "PATCH_NUMS_256",
  "PATCH_NUMS_512",
  "PRESETS",
  "VQVAE",
  "AttnBlock",
  "Decoder",
  "Downsample",
  "Encoder",
  "ResnetBlock",
  "Upsample",
  "VQVAEConfig",
  "VectorQuantizer",
  "area_matrix",
  "area_resize",
  "bicubic_matrix",
  "bicubic_resize",
  "check_state_dict",
  "load_official_state_dict",
  "load_official_vqvae",
  "num_params",
  "official_shapes",
  "phi_indices",
  "to_official_state_dict",
]
