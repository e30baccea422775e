"""One module per training stage: its trainer module, loss, and train / eval steps (var/train_lib.py runs them all
in one sharded loop).

  tokenizer.py  the multi-scale VQVAE
  var.py        the next-scale transformer on a frozen tokenizer's tokens
  code.py       CoDe's drafter and refiner fine-tuning (VAR-stage runs with their own loss and step)
"""

import jax


def step_rng(seed: int, step) -> jax.Array:
  """The randomness of step `step`: fold_in(seed, step), so a resumed run draws what an uninterrupted one would."""
  return jax.random.fold_in(jax.random.key(seed), step)
