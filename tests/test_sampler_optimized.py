"""The official greedy sampler parity (fixture T1) once with XLA's optimisation passes ON (test_sampler.py
turns most of them off for compile speed): fusion and reassociation must not move the images."""

import jax
import numpy as np

from tokenizer import VQVAEConfig, load_official_vqvae
from var import model as var_model
from var import official
from var import sampler as sampler_lib


def test_greedy_cfg_sampling_matches_official_fully_optimised(shared_dir):
  assert not jax.config.read("jax_disable_most_optimizations")
  root = shared_dir / "fixtures" / "var"
  var = official.load_state_dict(var_model.build(var_model.preset("tiny")), dict(np.load(root / "T1" / "var.npz")))
  vae = load_official_vqvae(dict(np.load(root / "vae_shared.npz")), VQVAEConfig.preset("t1"))
  io = np.load(root / "T1" / "io.npz")
  sampler_lib._SAMPLERS.clear()  # a sampler cached by another test may have been compiled unoptimised
  images = sampler_lib.sample_images(var, vae, [3, 0, 9, 3], cfg=1.5, top_k=1)
  want = io["sample_cfg1p5_img"].transpose(0, 2, 3, 1)
  print(f"optimised greedy images vs official: {np.max(np.abs(images - want)):.2e}")
  np.testing.assert_allclose(images, want, atol=1e-5, rtol=0)
