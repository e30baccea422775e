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


# ----------------------------------------------------------------------------------------------------------------
# Allocation


def test_allocate_by_hand():
  """256px, 4 layers, 10% (43 tokens after si = 4..8, total 860), drafters layer 1 at si 4 and 5, delta 4:
  refiners 18 x - 39 delta = 860 - (55 + 91) -> x = 48.33: floors 48, 44, 40, 36, 32 (k = 0..4) sum to 708, the
  6 remaining tokens go to the first six refiners (equal fractions: si 4 and 5, layers 0, 2, 3)."""
  caps = kv.allocate(PATCH_NUMS_256, 4, 43, {4: [1], 5: [1]}, delta=4)
  assert caps == {4: (49, 55, 49, 49), 5: (45, 91, 45, 45), 6: (40,) * 4, 7: (36,) * 4, 8: (32,) * 4}
  assert kv.allocate(PATCH_NUMS_256, 4, 43, {}, delta=0) == kv.uniform_capacities(PATCH_NUMS_256, 4, "10%")


def test_allocate_clamps_and_redistributes():
  """delta 20: si 4 refiners would get 83 > their 55-token cache and si 8 ones 3 < the window; both are clamped
  and the difference moves to the unclamped refiners, which still decay by delta."""
  caps = kv.allocate(PATCH_NUMS_256, 4, 43, {4: [1], 5: [1]}, delta=20)
  assert sum(map(sum, caps.values())) == 43 * 4 * 5
  assert caps[4] == (55,) * 4 and caps[8] == (16,) * 4
  r5, r6, r7 = (np.array(caps[si])[[0, 2, 3] if si == 5 else slice(None)] for si in (5, 6, 7))
  assert r5.max() - r5.min() <= 1 and abs(r5.mean() - r6.mean() - 20) <= 1 and abs(r6.mean() - r7.mean() - 20) <= 1


def test_allocate_drafters_beyond_the_total():
  """Drafters whose whole caches do not fit: refiners at the window, drafters share the rest."""
  caps = kv.allocate(PATCH_NUMS_256, 2, 20, {si: [0] for si in range(3, 9)}, delta=0)
  assert sum(map(sum, caps.values())) == 20 * 2 * 6
  assert all(c[1] == 16 for c in caps.values())
  assert all(16 <= c[0] <= kv.cumulative_lengths(PATCH_NUMS_256)[si] for si, c in caps.items())


def test_num_drafters_and_pick():
  assert kv.num_drafters(160, 1 / 16) == 10 and kv.num_drafters(8, 1 / 16) == 1 and kv.num_drafters(0, 0.1) == 0
  assert kv.num_drafters(8, 0.1875) == 2  # 1.5 rounds up
  z = np.array([[0, 0, 0.5, -2.0], [0, 0, -1.0, 1.0], [0, 0, 0.7, 0.9]])  # (depth 3, S 4)
  assert kv.pick_drafters(z, (1, 2), 2 / 6) == {1: [1], 2: [0]}  # pair (l, si) ranked by z[l, si + 1]
  with pytest.raises(ValueError, match="drafter_fraction 1.5 must be in"):
    kv.num_drafters(4, 1.5)


# ----------------------------------------------------------------------------------------------------------------
# The budget JSON


def test_budgets_round_trip_and_errors(tmp_path):
  caps = kv.allocate(PATCH_NUMS_256, 4, 43, {4: [1], 5: [1]}, delta=4)
  path = tmp_path / "b.json"
  kv.save_budgets(path, caps, depth=4, patch_nums=PATCH_NUMS_256, meta={"drafters": {"4": [1], "5": [1]}})
  assert kv.load_budgets(path, 4, PATCH_NUMS_256) == caps
  assert kv.resolve_capacities(str(path), PATCH_NUMS_256, 4) == caps
  record = kv.read_budgets(path)
  assert record["format"] == "var-jax-scalekv-budgets" and record["capacities"]["4"] == [49, 55, 49, 49]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]  # no temporary left behind
  with pytest.raises(ValueError, match="is for a 4-layer model, not this 16-layer one"):
    kv.load_budgets(path, 16, PATCH_NUMS_256)
  with pytest.raises(ValueError, match=r"is for patch_nums \[1, 2, 3, 4, 5, 6, 8, 10, 13, 16\], not"):
    kv.load_budgets(path, 4, (1, 2, 3, 4, 5, 6, 8, 10, 13, 17))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    kv.load_budgets(tmp_path / "none.json", 4, PATCH_NUMS_256)
  for bad, match in [({"4": [49, 55, 49]}, "one capacity per layer"), ({"4": [49, 56, 49, 49]}, r"\[56\] must be"),
                     ({"4": [15, 20, 20, 20]}, r"\[15\] must be ints in \[window 16"),
                     ({"9": [20] * 4}, "scale 9 out of range"), ({"x": [20] * 4}, "'x' is not a scale index")]:
    record = kv.read_budgets(path)
    record["capacities"] = bad
    (tmp_path / "bad.json").write_text(__import__("json").dumps(record))
    with pytest.raises(ValueError, match=match):
      kv.load_budgets(tmp_path / "bad.json", 4, PATCH_NUMS_256)
  (tmp_path / "bad.json").write_text('{"format": "other"}')
  with pytest.raises(ValueError, match="is not a var-jax-scalekv-budgets file"):
    kv.load_budgets(tmp_path / "bad.json", 4, PATCH_NUMS_256)
  with pytest.raises(ValueError, match="reserved"):
    kv.save_budgets(path, caps, depth=4, patch_nums=PATCH_NUMS_256, meta={"depth": 3})


def test_apply_capacities():
  from var.plan import ScalePlan

  plan = kv.apply_capacities(ScalePlan.plain(10, 2), kv.uniform_capacities(PATCH_NUMS_256, 3, "10%"))
  assert [s.kv_capacity for s in plan.steps] == [None] * 4 + [(43,) * 3] * 5 + [None]


# ----------------------------------------------------------------------------------------------------------------
# Calibration on a tiny random model (6 scales: cum 1, 5, 14, 30, 55, 91)

PN6 = (1, 2, 3, 4, 5, 6)


pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def tiny():
  from flax import nnx

  from tokenizer import VQVAE, VQVAEConfig
  from var import model as var_model

  cfg = var_model.preset("tiny", depth=4, patch_nums=PN6)
  model = var_model.build(cfg, seed=1)
  vae_cfg = VQVAEConfig.preset("t1", patch_nums=PN6)
  with nnx.use_eager_sharding(False):
    vae = VQVAE(vae_cfg, rngs=nnx.Rngs(2))
  return model, cfg, vae, vae_cfg


def _np_stats(model, vae, labels, tokens, k_prime):
  """(depth, S, 3) mean [current, history top-K', history mass] from attention maps computed in numpy (float64)
  from the probe's q / k, running the blocks eagerly one at a time (no scan, no kvcompress code)."""
  from flax import nnx

  from var.model import block_causal_bias

  cfg = model.config
  x_in = vae.idx_to_var_input(vae.split_tokens(jnp.asarray(tokens)))
  cond = model.condition(jnp.asarray(labels))
  x, block_cond = model.embed_inputs(cond, x_in), model.block_condition(cond)
  bias = block_causal_bias(cfg.patch_nums)
  graphdef, state = nnx.split(model.blocks)
  out = np.zeros((cfg.depth, len(cfg.patch_nums), 3))
  for layer in range(cfg.depth):
    block = nnx.merge(graphdef, jax.tree.map(lambda a, layer=layer: a[layer], state))
    box = {}
    x = block(x, block_cond, attn_bias=jnp.asarray(bias), probe=box.update)
    q, k = np.asarray(box["q"], np.float64), np.asarray(box["k"], np.float64)
    logits = np.einsum("rqhd,rkhd->rhqk", q, k) * box["logit_scale"] + bias
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    for si, (beg, end) in enumerate(cfg.begin_ends[1:], start=1):
      rows = a[:, :, beg:end]
      hist = np.sort(rows[..., :beg], axis=-1)[..., ::-1]
      out[layer, si] = [rows[..., beg:end].sum(-1).mean(), hist[..., :k_prime].sum(-1).mean(), hist.sum(-1).mean()]
  return out


@pytest.mark.parametrize("asi", ["product", "ratio"])
def test_calibrate_matches_numpy(tiny, asi):
  from var.sampler import SamplingConfig

  model, cfg, vae, _ = tiny
  rng = np.random.default_rng(0)
  labels = np.array([1, 4, 7], np.int32)
  tokens = rng.integers(0, cfg.vocab_size, (3, cfg.seq_len))
  # 50% of the 55-token prefix = 28 tokens: compression after si = 3 (30 tokens) and 4 (55); 8 (layer, si) pairs
  record = kv.calibrate(model, vae, labels, np.arange(3), budget="50%", k_prime=4, asi=asi, delta=3.0,
                        drafter_fraction=0.25, sampling=SamplingConfig(cfg=1.5), batch_size=2, tokens=tokens)
  ref = _np_stats(model, vae, np.concatenate([labels, np.full(3, cfg.num_classes)]),
                  np.concatenate([tokens, tokens]), 4)
  for i, name in enumerate(["current_ratio", "history_topk", "history_mass"]):
    got = np.array([record[name][str(k)] for k in range(1, 6)]).T  # (depth, S - 1)
    np.testing.assert_allclose(got, ref[:, 1:, i], rtol=1e-4, atol=1e-6)
  cur, top, mass = ref[:, 1:, 0], ref[:, 1:, 1], ref[:, 1:, 2]
  np.testing.assert_allclose(mass, 1 - cur, atol=1e-5)
  asi_ref = cur * top if asi == "product" else cur * top / mass
  got_asi = np.array([record["asi"][str(k)] for k in range(1, 6)]).T
  np.testing.assert_allclose(got_asi, asi_ref, rtol=1e-4, atol=1e-7)
  z = (asi_ref - asi_ref.mean(0)) / (asi_ref.std(0) + 1e-6)
  np.testing.assert_allclose(np.array([record["z"][str(k)] for k in range(1, 6)]).T, z, atol=1e-3)
  # drafters: the 2 lowest z among the pairs (l, si) for si in (3, 4), ranked by z[l, si + 1]
  order = sorted((z[layer, si], si, layer) for si in (3, 4) for layer in range(4))[:2]
  expected = {"3": [], "4": []}
  for _, si, layer in order:
    expected[str(si)].append(layer)
  assert record["drafters"] == {k: sorted(v) for k, v in expected.items()}
  caps = {int(si): c for si, c in record["capacities"].items()}
  assert sorted(caps) == [3, 4] and sum(map(sum, caps.values())) == 28 * 4 * 2  # the uniform total exactly
  drafted = {(int(si), layer) for si, d in record["drafters"].items() for layer in d}
  full = {3: 30, 4: 55}
  fits = sum(full[si] for si, _ in drafted) + 16 * (8 - len(drafted)) <= 28 * 8
  for si in (3, 4):
    for layer in range(4):
      if (si, layer) in drafted:  # the whole cache, or (when that cannot fit) at least what refiners keep
        assert caps[si][layer] == full[si] if fits else caps[si][layer] >= 16
      else:
        assert 16 <= caps[si][layer] <= full[si] if fits else caps[si][layer] == 16
  assert kv.allocate(PN6, 4, 28, {int(k): v for k, v in record["drafters"].items()}, delta=3.0) == {
    si: tuple(c) for si, c in caps.items()}
  assert record["budget"] == {"spec": "50%", "tokens": 28}
  assert record["options"]["k_prime"] == 4 and record["options"]["cfg_rows"]


def test_calibrate_refiner_decay(tiny):
  """With no unclamped interference, refiners of consecutive compressed scales differ by delta (+-1 rounding)."""
  caps = kv.allocate(PN6, 4, 25, {3: [0], 4: [2]}, delta=5.0)
  r3 = [c for layer, c in enumerate(caps[3]) if layer != 0]
  r4 = [c for layer, c in enumerate(caps[4]) if layer != 2]
  assert caps[3][0] == 30 and caps[4][2] == 55 and sum(r3) + sum(r4) + 85 == 25 * 8
  assert abs(np.mean(r3) - np.mean(r4) - 5.0) <= 1


def test_calibrate_cli(tiny, tmp_path):
  from var import pretrained

  model, cfg, vae, vae_cfg = tiny
  model_dir = pretrained.save_pretrained(tmp_path / "m", tokenizer=vae, tokenizer_config=vae_cfg, var=model,
                                         var_config=cfg)
  out = tmp_path / "b.json"
  base = ["calibrate", "--checkpoint", model_dir, "--out", str(out), "--no_progress"]
  assert kv.main(base + ["--budget", "22", "--classes", "0,3,9", "--batch_size", "2", "--drafter_fraction",
                         "0.25", "--k_prime", "8"]) == 0
  record = kv.read_budgets(out)
  caps = kv.load_budgets(out, 4, PN6)
  assert sorted(caps) == [3, 4] and sum(map(sum, caps.values())) == 22 * 4 * 2
  assert sum(len(v) for v in record["drafters"].values()) == 2
  assert record["options"]["classes"] == [0, 3, 9] and record["options"]["sampled"]
  assert record["options"]["delta"] == pytest.approx(70 * 55 / 6425)
  for args, match in [
    (["--budget", "22", "--classes", "1,10"], r"class ids \[10\] out of range.*0\.\.9"),
    (["--budget", "5%"], "below the observation window of 16"),
    (["--budget", "abc"], "malformed"),
    (["--budget", "55"], "holds the whole cache"),
    (["--budget", "22", "--drafter_fraction", "2"], "--drafter_fraction 2.0 must be in"),
  ]:
    with pytest.raises(SystemExit, match=match):
      kv.main(base + args)
  with pytest.raises(SystemExit, match="does not exist"):
    kv.main(["calibrate", "--checkpoint", str(tmp_path / "none"), "--out", str(out), "--budget", "10%"])
