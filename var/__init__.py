"""var-jax: next-scale autoregressive image generation (VAR) in JAX / Flax NNX."""
