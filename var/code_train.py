"""CoDe's specialised fine-tuning losses (specs/ACCELERATION.md 5.2), which the official CoDe repository does not
ship: pure functions of logits, so the train steps and the tests share them.

Drafter ("code_drafter"): the VAR cross-entropy on the first N scales only (the drafter never draws the later
scales at inference). Every token of scales 0..N-1 weighs 1 / cum[N] (the mean over the drafted tokens), the later
scales weigh 0, so their logits get exactly zero gradient. Block-causal attention makes this equal to training on
the truncated sequence of cum[N] tokens.

Refiner ("code_refiner"): distillation from the frozen large model. The spec only says "KL distillation, weight
decaying 1 -> 0 from all tokens to refine tokens"; what is implemented:

  KL_t   = sum_v p_teacher(v) (log p_teacher(v) - log p_student(v))    per token t (temperature 1)
  w_t    = 1 on the refine tokens (scales N..S-1), alpha(step) on the draft tokens (scales 0..N-1)
  alpha  = 1 - step / (total_steps - 1), clipped to [0, 1]: 1 at the first step, 0.5 half-way, 0 at the last
  loss   = mean_b [ sum_t w_t KL_t / sum_t w_t ] + ce_weight * mean_b [ sum_t w_t CE_t / sum_t w_t ]

CE_t is the usual next-scale cross-entropy on the ground-truth tokens (the "plus its CE" of the issue), weighted
like the KL. Both terms are weighted means over the tokens that count, so their scale does not grow when alpha
shrinks the number of weighted tokens. Teacher and student see the same (class-dropped) labels and inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _levels(patch_nums: Sequence[int]) -> np.ndarray:
  return np.concatenate([np.full(p * p, i, np.int32) for i, p in enumerate(patch_nums)])  # (L,) scale index


def _check_draft_steps(draft_steps: int, patch_nums: Sequence[int], lo: int) -> None:
  s = len(patch_nums)
  if isinstance(draft_steps, bool) or not isinstance(draft_steps, (int, np.integer)) or not lo <= draft_steps <= s:
    raise ValueError(f"draft_steps={draft_steps!r} must be an integer in {lo}..{s} for the {s}-scale schedule "
                     f"{tuple(patch_nums)} (the drafter draws scales 0..N-1, the refiner N..{s - 1})")


def drafter_token_weights(patch_nums: Sequence[int], draft_steps: int) -> np.ndarray:
  """(L,) float32: 1 / cum[N] on the tokens of scales 0..N-1, 0 on the later scales."""
  _check_draft_steps(draft_steps, patch_nums, lo=1)
  drafted = _levels(patch_nums) < draft_steps
  return (drafted / drafted.sum()).astype(np.float32)


def drafter_loss(logits: jax.Array, targets: jax.Array, patch_nums: Sequence[int], draft_steps: int,
                 label_smoothing: float = 0.0) -> jax.Array:
  """The code_drafter loss: the VAR cross-entropy over the first `draft_steps` scales only.

  logits (B, L', V) float32 with L' = L, or L' = cum[N] for a forward truncated after the drafted scales; targets
  (B, L') int -> scalar."""
  from var.model import cross_entropy_loss

  w = jnp.asarray(drafter_token_weights(patch_nums, draft_steps)[:logits.shape[1]])
  if logits.shape[1] < int(np.count_nonzero(np.asarray(w))):
    raise ValueError(f"logits cover {logits.shape[1]} tokens, fewer than the {np.count_nonzero(np.asarray(w))} "
                     f"of the first {draft_steps} scales")
  return cross_entropy_loss(logits, targets, label_smoothing, w[None])


def draft_weight(step, total_steps: int) -> jax.Array:
  """alpha(step) = clip(1 - step / (total_steps - 1), 0, 1): the weight of the draft tokens in the refiner's loss
  (1 at the first step, 0.5 half-way, 0 at the last). step may be traced."""
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps} must be >= 1")
  return jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / max(total_steps - 1, 1), 0.0, 1.0)


def refiner_token_weights(patch_nums: Sequence[int], draft_steps: int, step, total_steps: int) -> jax.Array:
  """(L,) float32 per-token weights of the refiner's loss: 1 on scales N.., alpha(step) on scales 0..N-1."""
  _check_draft_steps(draft_steps, patch_nums, lo=0)
  if draft_steps == len(patch_nums):
    raise ValueError(f"draft_steps={draft_steps}: the refiner draws no scale; use 0..{len(patch_nums) - 1}")
  refine = jnp.asarray(_levels(patch_nums) >= draft_steps)
  return jnp.where(refine, 1.0, draft_weight(step, total_steps))


def kl_per_token(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """KL(teacher || student) per token: (B, L, V) logits each -> (B, L) float32 (the teacher is not
  differentiated)."""
  t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
  s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)


def _weighted_mean(per_token: jax.Array, weights: jax.Array) -> jax.Array:
  """(B, L) values, (L,) weights -> scalar: per sample sum(w x) / sum(w), averaged over the batch."""
  return jnp.mean(jnp.sum(per_token * weights, axis=-1) / jnp.sum(weights))


def refiner_loss(student_logits: jax.Array, teacher_logits: jax.Array, targets: jax.Array,
                 weights: jax.Array, ce_weight: float = 1.0, label_smoothing: float = 0.0) -> dict[str, jax.Array]:
  """The code_refiner loss (module docstring): weighted KL to the teacher plus ce_weight x the weighted CE.

  student_logits, teacher_logits (B, L, V), targets (B, L) int, weights (L,) (refiner_token_weights)
  -> {'loss', 'kl', 'ce'} scalars."""
  kl = _weighted_mean(kl_per_token(student_logits, teacher_logits), weights)
  logp = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  ce_tok = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1) if label_smoothing else nll
  ce = _weighted_mean(ce_tok, weights)
  return {"loss": kl + ce_weight * ce, "kl": kl, "ce": ce}
