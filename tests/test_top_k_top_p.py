"""Top-k / top-p masking (var.sampler.mask_top_k_top_p) against the full-vocabulary sort it replaces.

The sampler's top-k + top-p path finds the nucleus from `lax.top_k` alone; it must give bit for bit what sorting
the whole vocabulary gave (the previous implementation, kept below as the reference), ties included: which of
several equal logits at the nucleus boundary is dropped follows the stable ascending sort. Compiled fully
optimised (no fast_compile), as in the sampler.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var import sampler as sampler_lib


def _sort_reference(logits, top_k, top_p):
  """The previous implementation: top-k by its k-th value, then top-p over the stable ascending sort of V."""
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p > 0:
    order = jnp.argsort(logits, axis=-1, stable=True)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    remove = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1) <= 1 - top_p
    remove = remove.at[..., -1].set(False)
    remove = jnp.take_along_axis(remove, jnp.argsort(order, axis=-1), axis=-1)
    logits = jnp.where(remove, -jnp.inf, logits)
  return logits


def _logits(vocab, step):
  """(2, 12, vocab) float32 logits with deliberate ties: normal values rounded to multiples of `step` (so also
  -0.0 and 0.0), one row of a single value, one with a few distinct values only, one with -inf entries."""
  rng = np.random.default_rng(vocab)
  x = np.round(rng.normal(0, 2, (2, 12, vocab)) / step) * step
  x[0, 0] = 1.5  # every entry tied
  x[0, 1] = rng.integers(0, 3, vocab) * 0.5  # three distinct values
  x[0, 2, rng.permutation(vocab)[: vocab // 4]] = -np.inf
  x[1, 0] = rng.normal(0, 2, vocab)  # no ties
  return jnp.asarray(x, jnp.float32)


_CASES = [(vocab, step, top_k) for vocab, step in [(64, 0.5), (4096, 0.25), (4096, 1e-3)]
          for top_k in (0, 1, 7, 50, 900, vocab) if top_k <= vocab]  # top_k = vocab: the whole vocabulary


@pytest.mark.parametrize("vocab,step,top_k", _CASES)
@pytest.mark.parametrize("top_p", [0.0, 0.5, 0.9, 0.96])
def test_mask_equals_the_full_sort(vocab, step, top_k, top_p):
  logits = _logits(vocab, step)
  got = jax.jit(sampler_lib.mask_top_k_top_p, static_argnums=(1, 2))(logits, top_k, top_p)
  want = jax.jit(_sort_reference, static_argnums=(1, 2))(logits, top_k, top_p)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  np.testing.assert_array_equal(np.signbit(np.asarray(got)), np.signbit(np.asarray(want)))  # -0.0 stays -0.0


def test_top_k_beyond_the_vocabulary_is_refused():
  with pytest.raises(ValueError, match="top_k=900 exceeds the vocabulary size 64"):
    sampler_lib.mask_top_k_top_p(_logits(64, 0.5), 900, 0.9)


def test_ties_beyond_k_and_at_the_nucleus_boundary():
  """Hand-made rows whose answer is known: k-th value ties beyond k kept; the boundary tie cut in index order."""
  # four equal largest values; top_k=2 keeps all four (ties with the 2nd); each has probability 1/4, so
  # top_p=0.6 drops the ascending-first ones while the cumulative mass is <= 0.4: exactly the first (lowest index)
  row = np.full(16, -30.0, np.float32)
  row[[3, 5, 9, 12]] = 2.0
  got = np.asarray(sampler_lib.mask_top_k_top_p(jnp.asarray(row[None]), 2, 0.6))[0]
  np.testing.assert_array_equal(np.flatnonzero(np.isfinite(got)), [5, 9, 12])
  # k larger than the number of distinct values: everything >= the k-th value is kept
  row = np.array([1, 0, 1, 2, 0, 1, 2, 0], np.float32)
  got = np.asarray(sampler_lib.mask_top_k_top_p(jnp.asarray(row[None]), 5, 0.0))[0]
  np.testing.assert_array_equal(np.isfinite(got), row >= 1)
