"""ScaleKV (var/kvcompress.py): window positions, the online selection against a numpy re-implementation, the
budgets, the budget JSON, and the calibration (ASI against a numpy recomputation from the attention maps)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var import kvcompress as kv
from var.model import PATCH_NUMS_256

# ----------------------------------------------------------------------------------------------------------------
# Window positions


def _grid(rows, cols, w):
  return (np.asarray(rows)[:, None] * w + np.asarray(cols)[None, :]).reshape(-1)


@pytest.mark.parametrize("h,w,held,query_rows", [
  (4, 4, 14, np.arange(16)),  # 1x1 patches: the whole map
  (8, 8, 30, _grid([0, 2, 4, 6], [0, 2, 4, 6], 8)),  # 2x2 patches, centre offset (2-1)//2 = 0
  (13, 13, 255, _grid([1, 4, 7, 10], [1, 4, 7, 10], 13)),  # 3x3 patches, offset 1, remainder row/col unused
  (16, 16, 424, _grid([1, 5, 9, 13], [1, 5, 9, 13], 16)),  # 4x4 patches, offset (4-1)//2 = 1
  (6, 10, 5, _grid([0, 1, 2, 3], [0, 2, 4, 6], 10)),  # non-square: 1x2 patches
  (8, 12, 0, _grid([0, 2, 4, 6], [1, 4, 7, 10], 12)),  # non-square: 2x3 patches
])
def test_window_grid(h, w, held, query_rows):
  pos, rows = kv.window_positions(h, w, held)
  assert pos.dtype == np.int32 and rows.dtype == np.int32
  np.testing.assert_array_equal(rows, query_rows)
  np.testing.assert_array_equal(pos, held + query_rows)


@pytest.mark.parametrize("h,w,held,positions,query_rows", [
  (3, 3, 5, np.arange(14), np.arange(9)),  # cache shorter than the window: everything, all queries
  (3, 3, 10, np.arange(3, 19), np.arange(9)),  # last 16 of 19: 7 held + the whole 3x3 map
  (2, 10, 5, np.arange(9, 25), np.arange(4, 20)),  # min side < 4: last 16 tokens, all in the map
  (1, 1, 0, np.arange(1), np.arange(1)),
])
def test_window_fallback(h, w, held, positions, query_rows):
  pos, rows = kv.window_positions(h, w, held)
  np.testing.assert_array_equal(pos, positions)
  np.testing.assert_array_equal(rows, query_rows)


# ----------------------------------------------------------------------------------------------------------------
# select_kv against numpy


def _np_select(q, k, cap, positions, query_rows, logit_scale, scorer, pooling, kernel, q_raw=None):
  """Independent float64 numpy ScaleKV selection -> idx (R, cap, H) (ascending)."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  r, t, heads, hd = k.shape
  out = np.zeros((r, cap, heads), np.int64)
  pad = kernel // 2
  for b in range(r):
    for h in range(heads):
      if scorer == "paper":
        logits = q[b, query_rows, h] @ k[b, :, h].T * logit_scale  # (Wq, T)
        e = np.exp(logits - logits.max(-1, keepdims=True))
        s = (e / e.sum(-1, keepdims=True)).sum(0)
      else:
        s = (np.asarray(q_raw, np.float64)[b, query_rows, h] @ k[b, :, h].T).sum(0) / math.sqrt(hd)
        s[positions] = -np.inf
      fill = 0.0 if pooling == "avg" else -np.inf
      sp = np.concatenate([np.full(pad, fill), s, np.full(pad, fill)])
      win = np.stack([sp[j:j + t] for j in range(kernel)])  # (kernel, T)
      pooled = win.mean(0) if pooling == "avg" else win.max(0)
      rest = [j for j in np.argsort(-pooled, kind="stable") if j not in set(positions.tolist())]
      out[b, :, h] = np.sort(np.concatenate([positions, rest[:cap - len(positions)]]))
  return out


def _qkv(seed, r=3, n=16, held=14, heads=2, hd=8, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  t = held + n
  q = rng.normal(size=(r, n, heads, hd)).astype(np.float32)
  q_raw = rng.normal(size=(r, n, heads, hd)).astype(np.float32)
  k = rng.normal(size=(r, t, heads, hd)).astype(np.float32)
  v = rng.normal(size=(r, t, heads, hd)).astype(np.float32)
  return tuple(jnp.asarray(a, dtype) for a in (q, q_raw, k, v))


@pytest.mark.parametrize("scorer,pooling,kernel", [
  ("paper", "avg", 5), ("paper", "max", 5), ("reference", "max", 5), ("paper", "avg", 3), ("reference", "max", 1)])
def test_select_kv_matches_numpy(scorer, pooling, kernel):
  h, w, held, cap = 4, 4, 14, 22
  q, q_raw, k, v = _qkv(0, n=h * w, held=held)
  pos, rows = kv.window_positions(h, w, held)
  fn = jax.jit(functools.partial(kv.select_kv, cap=cap, positions=pos, query_rows=rows, logit_scale=0.7,
                                 scorer=scorer, pooling=pooling, kernel=kernel))
  k_kept, v_kept, idx = fn(q, k, v, q_raw=q_raw)
  ref = _np_select(q, k, cap, pos, rows, 0.7, scorer, pooling, kernel, q_raw=q_raw)
  assert idx.shape == (3, cap, 2) and idx.dtype == jnp.int32
  np.testing.assert_array_equal(idx, ref)
  assert np.all(np.diff(np.asarray(idx), axis=1) > 0)  # ascending, distinct
  for p in pos:  # the window is always kept, in every row and head
    assert np.all((np.asarray(idx) == p).any(axis=1))
  np.testing.assert_array_equal(k_kept, np.take_along_axis(np.asarray(k), ref[..., None], axis=1))
  np.testing.assert_array_equal(v_kept, np.take_along_axis(np.asarray(v), ref[..., None], axis=1))
  # rows and heads choose their own tokens (random data: they differ)
  assert not np.array_equal(ref[0], ref[1]) and not np.array_equal(ref[:, :, 0], ref[:, :, 1])


def test_select_kv_fallback_window_and_bf16():
  """A 3x3 map (fallback window: the last 16 cache tokens, all 9 queries) on a bfloat16 cache."""
  h, w, held, cap = 3, 3, 14, 19
  q, q_raw, k, v = _qkv(1, n=h * w, held=held, dtype=jnp.bfloat16)
  pos, rows = kv.window_positions(h, w, held)
  np.testing.assert_array_equal(pos, np.arange(7, 23))
  k_kept, v_kept, idx = kv.select_kv(q, k, v, cap, pos, rows, logit_scale=0.35, pooling="max")
  ref = _np_select(np.asarray(q, np.float32), np.asarray(k, np.float32), cap, pos, rows, 0.35, "paper", "max", 5)
  np.testing.assert_array_equal(idx, ref)
  assert k_kept.dtype == jnp.bfloat16 and v_kept.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(v_kept, np.float32),
                                np.take_along_axis(np.asarray(v, np.float32), ref[..., None], axis=1))


def test_select_kv_avg_padding_is_counted():
  """avg pooling divides by the kernel at the edges too (zero padding counted): a key at position 0 whose
  neighbours carry the same softmax mass as an interior key scores lower. Checked through a hand-made score."""
  # one row, one head, hd 1: q = 0 makes softmax uniform (1/T each); every pooled interior score is Wq/T, the
  # first two and last two positions get (3/5, 4/5) of it: the interior wins.
  t, n = 12, 4
  q = jnp.zeros((1, n, 1, 1))
  k = jnp.asarray(np.arange(t, dtype=np.float32).reshape(1, t, 1, 1))
  pos, rows = np.array([11], np.int32), np.arange(n, dtype=np.int32)
  _, _, idx = kv.select_kv(q, k, k, 5, pos, rows, logit_scale=1.0, pooling="avg")
  np.testing.assert_array_equal(idx[0, :, 0], [2, 3, 4, 5, 11])  # interior ties -> lowest positions
  _, _, idx = kv.select_kv(q, k, k, 5, pos, rows, logit_scale=1.0, pooling="max")
  np.testing.assert_array_equal(idx[0, :, 0], [0, 1, 2, 3, 11])  # max: no edge penalty, ties -> lowest


def test_select_kv_reference_avg_never_repeats_the_window():
  """'reference' + 'avg': -inf window columns sink their neighbours; the result still holds distinct positions."""
  h, w, held = 4, 4, 14
  q, q_raw, k, v = _qkv(2, n=h * w, held=held)
  pos, rows = kv.window_positions(h, w, held)
  _, _, idx = kv.select_kv(q, k, v, 30, pos, rows, logit_scale=1.0, scorer="reference", pooling="avg", q_raw=q_raw)
  np.testing.assert_array_equal(idx, np.broadcast_to(np.arange(30)[None, :, None], (3, 30, 2)))
  _, _, idx = kv.select_kv(q, k, v, 25, pos, rows, logit_scale=1.0, scorer="reference", pooling="avg", q_raw=q_raw)
  assert np.all(np.diff(np.asarray(idx), axis=1) > 0)


def test_select_kv_errors():
  q, q_raw, k, v = _qkv(3)
  pos, rows = kv.window_positions(4, 4, 14)
  with pytest.raises(ValueError, match=r"capacity 10 must be in \[window 16, cache length 30\]"):
    kv.select_kv(q, k, v, 10, pos, rows, logit_scale=1.0)
  with pytest.raises(ValueError, match="capacity 31"):
    kv.select_kv(q, k, v, 31, pos, rows, logit_scale=1.0)
  with pytest.raises(ValueError, match="pass q_raw"):
    kv.select_kv(q, k, v, 20, pos, rows, logit_scale=1.0, scorer="reference")
  with pytest.raises(ValueError, match="kernel 4 must be an odd"):
    kv.select_kv(q, k, v, 20, pos, rows, logit_scale=1.0, kernel=4)
  with pytest.raises(ValueError, match="pooling 'mean'"):
    kv.select_kv(q, k, v, 20, pos, rows, logit_scale=1.0, pooling="mean")
  with pytest.raises(ValueError, match="scorer 'snap'"):
    kv.select_kv(q, k, v, 20, pos, rows, logit_scale=1.0, scorer="snap")


# ----------------------------------------------------------------------------------------------------------------
# Budgets


@pytest.mark.parametrize("budget,tokens,first", [
  ("4%", 17, 3),  # ceil(16.96); cum[3] = 30 > 17, cum[2] = 14 fits
  ("10%", 43, 4),  # ceil(42.4); cum[4] = 55 > 43
  (0.1, 43, 4),
  ("20%", 85, 5),  # ceil(84.8); cum[4] = 55 fits, cum[5] = 91 does not
  (100, 100, 6),
  ("16", 16, 3),
  ("100%", 424, None),  # the whole re-read prefix fits: nothing to compress
])
def test_uniform_capacities_256(budget, tokens, first):
  assert kv.budget_tokens(PATCH_NUMS_256, budget) == tokens
  caps = kv.uniform_capacities(PATCH_NUMS_256, 16, budget)
  expected = {} if first is None else {si: (tokens,) * 16 for si in range(first, 9)}
  assert caps == expected  # never after the last scale (si = 9)


@pytest.mark.parametrize("budget,match", [
  ("1%", r"budget '1%' = 5 tokens is below the observation window of 16"),
  (15, "15 tokens is below the observation window"),
  (425, r"425 tokens exceeds the full cache of 424 tokens.*at most 424"),
  ("150%", "more than 100%"),
  (1.5, "more than 100%"),
  (0, "must be > 0"),
  ("-3", "must be > 0"),
  ("0%", "must be > 0"),
  ("ten%", "malformed"),
  ("10%%", "malformed"),
  (True, "must be a percentage"),
  (None, "must be a percentage"),
  ("budgets.json", "is a budget file"),
])
def test_budget_errors(budget, match):
  with pytest.raises(ValueError, match=match):
    kv.uniform_capacities(PATCH_NUMS_256, 16, budget)


def test_parse_budget():
  assert kv.parse_budget("10%").fraction == pytest.approx(0.1)
  assert kv.parse_budget(0.04).fraction == 0.04
  assert kv.parse_budget("43").tokens == 43 and kv.parse_budget(np.int64(43)).tokens == 43
  assert kv.parse_budget("x/b.json").path == "x/b.json"
