"""Multi-scale residual VQ tokenizer (the VAR VQVAE) in Flax NNX."""
