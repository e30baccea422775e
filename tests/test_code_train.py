"""CoDe's fine-tuning losses (var/code_train.py) against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var import code_train

PN = (1, 2, 3)  # 14 tokens: scale 0 = token 0, scale 1 = tokens 1..4, scale 2 = tokens 5..13


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_drafter_loss_ignores_the_scales_after_n():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 14, 7)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 7, size=(3, 14)))
  grad = jax.grad(lambda lg: code_train.drafter_loss(lg, targets, PN, draft_steps=2))(logits)
  assert (np.asarray(grad[:, 5:]) == 0).all()  # the late scale's logits get exactly zero gradient
  assert (np.abs(np.asarray(grad[:, :5])).sum(-1) > 1e-4).all()
  nll = -np.take_along_axis(_np_log_softmax(np.asarray(logits, np.float64)), np.asarray(targets)[..., None], -1)
  np.testing.assert_allclose(code_train.drafter_loss(logits, targets, PN, 2), nll[:, :5].mean(), rtol=1e-6)
  # a forward truncated after the drafted scales gives the same loss
  np.testing.assert_allclose(code_train.drafter_loss(logits[:, :5], targets[:, :5], PN, 2),
                             nll[:, :5].mean(), rtol=1e-6)
  for bad in (0, 4, 1.5):
    with pytest.raises(ValueError, match=f"draft_steps={bad} must be an integer in 1..3"):
      code_train.drafter_token_weights(PN, bad)


def test_draft_weight_schedule():
  total = 101
  np.testing.assert_allclose([code_train.draft_weight(s, total) for s in (0, 50, 100)], [1.0, 0.5, 0.0])
  w = [np.asarray(code_train.refiner_token_weights(PN, 2, s, total)) for s in (0, 50, 100)]
  np.testing.assert_allclose(w[0], np.ones(14))  # every token
  np.testing.assert_allclose(w[1], [0.5] * 5 + [1.0] * 9)
  np.testing.assert_allclose(w[2], [0.0] * 5 + [1.0] * 9)  # only the refine tokens
  np.testing.assert_allclose(code_train.draft_weight(jnp.int32(7), 1), 0.0)
  with pytest.raises(ValueError, match="the refiner draws no scale"):
    code_train.refiner_token_weights(PN, 3, 0, total)


def test_refiner_kl_and_ce_match_numpy():
  rng = np.random.default_rng(1)
  s_logits = rng.normal(size=(2, 14, 5)).astype(np.float32)
  t_logits = 2 * rng.normal(size=(2, 14, 5)).astype(np.float32)
  targets = rng.integers(0, 5, size=(2, 14))
  weights = np.asarray(code_train.refiner_token_weights(PN, 1, 3, 10))  # alpha = 2/3 on the first token
  out = code_train.refiner_loss(jnp.asarray(s_logits), jnp.asarray(t_logits), jnp.asarray(targets),
                                jnp.asarray(weights), ce_weight=0.3)
  ls, lt = _np_log_softmax(s_logits.astype(np.float64)), _np_log_softmax(t_logits.astype(np.float64))
  kl_tok = (np.exp(lt) * (lt - ls)).sum(-1)  # (2, 14)
  nll = -np.take_along_axis(ls, targets[..., None], -1)[..., 0]
  kl = ((kl_tok * weights).sum(-1) / weights.sum()).mean()
  ce = ((nll * weights).sum(-1) / weights.sum()).mean()
  np.testing.assert_allclose(out["kl"], kl, rtol=1e-5)
  np.testing.assert_allclose(out["ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(out["loss"], kl + 0.3 * ce, rtol=1e-5)
  # KL of a distribution to itself is 0; the teacher gets no gradient
  np.testing.assert_allclose(code_train.kl_per_token(jnp.asarray(t_logits), jnp.asarray(t_logits)), 0, atol=1e-6)
  g_teacher = jax.grad(lambda t: code_train.refiner_loss(jnp.asarray(s_logits), t, jnp.asarray(targets),
                                                         jnp.asarray(weights))["loss"])(jnp.asarray(t_logits))
  assert (np.asarray(g_teacher) == 0).all()
