"""The KV cache that follows the plan (var/sampler.py) with ScaleKV (var/kvcompress.py) and FastVAR
(var/pruning.py): identities with the plain plan, cached logits against independent references, and the cache
arrays' real shapes and bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokenizer import VQVAE, VQVAEConfig
from tokenizer.resample import area_matrix
from var import kvcompress, pruning
from var import model as var_model
from var import plan as plan_lib
from var import sampler as sampler_lib
from var.plan import PruneStep, ScalePlan

PN6 = (1, 2, 3, 4, 5, 6)


pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def six():
  """A random depth-3 VAR on a random VQVAE with six scales (24px): long enough caches for ScaleKV's window."""
  cfg = var_model.VARConfig(depth=3, width=64, num_heads=4, vocab_size=64, z_channels=8, patch_nums=PN6,
                            num_classes=10, init_adaln_gamma=0.3, init_head=2.0)
  var = var_model.build(cfg, seed=3)
  with nnx.use_eager_sharding(False):
    vae = VQVAE(VQVAEConfig.preset("t1", patch_nums=PN6), rngs=nnx.Rngs(1))
  return var, vae


def _teacher_forced(var, labels, x, biases):
  """Block-causal teacher-forced logits with a per-layer attention bias (B, H, L, L) (or None = block-causal)."""
  cond = var.condition(jnp.asarray(labels))
  h = var.embed_inputs(cond, x)
  graphdef, state = nnx.split(var.blocks)
  causal = jnp.asarray(var_model.block_causal_bias(var.config.patch_nums))
  for layer in range(var.config.depth):
    block = nnx.merge(graphdef, jax.tree.map(lambda a, i=layer: a[i], state))
    bias = causal if biases[layer] is None else causal + biases[layer]
    h = block(h, var.block_condition(cond), attn_bias=bias)
  return var.logits(h, cond)


def test_full_budget_and_zero_ratio_equal_plain(six):
  var, vae = six
  sampling = sampler_lib.SamplingConfig(cfg=2.0, top_k=20, top_p=0.9)
  labels, seeds = np.array([1, 4, 7, 10]), np.arange(4) + 11
  plain = sampler_lib.Sampler(var, vae, sampling)(labels, seeds)
  full = plan_lib.build(var.config, 4, cfg=2.0, kv_budget="100%", prune={3: 0.0, 5: 0.0})
  assert all(s.kv_capacity is None and s.prune is None for s in full.steps)
  out = sampler_lib.Sampler(var, vae, sampling, plan=full)(labels, seeds)
  np.testing.assert_array_equal(out["tokens"], plain["tokens"])
  np.testing.assert_array_equal(out["images"], plain["images"])


def test_compressed_cache_logits_match_masked_reference(six):
  """Per-layer capacities (layer 1 uncompressed after scale 3, layer 2 after scale 4): every cached logit equals
  a teacher-forced pass whose attention at scales 4 and 5 sees exactly the kept keys (per row and head), and the
  cache arrays are exactly the planned sizes."""
  var, vae = six
  caps3, caps4 = (20, 30, 18), (30, 20, 43)
  plan = ScalePlan.plain(6, 3, cfg=0.0).replace(3, kv_capacity=caps3).replace(4, kv_capacity=caps4)
  s = sampler_lib.Sampler(var, vae, sampler_lib.SamplingConfig(cfg=0.0, top_k=1), plan=plan, return_logits=True)
  labels = np.array([2, 5, 9])
  out = s(labels, np.arange(3))
  heads, hd = var.config.num_heads, var.config.head_dim
  # the cache really has these shapes: one run per distinct length, every array exactly its length
  # (layer 2 keeps its 18 tokens in a buffer of 43: scale 4 writes its 25 new ones in place)
  layout = s.kv_layouts[3]
  assert layout[3]["main"] == [(0, 1, (1, 3, 20, heads, hd), "float32"), (1, 2, (1, 3, 30, heads, hd), "float32"),
                               (2, 3, (1, 3, 43, heads, hd), "float32")]
  assert layout[4]["main"] == [(0, 1, (1, 3, 30, heads, hd), "float32"), (1, 2, (1, 3, 20, heads, hd), "float32"),
                               (2, 3, (1, 3, 43, heads, hd), "float32")]
  # before any compression one buffer holds every layer, sized for layer 1 (in place up to scale 3: 30 tokens)
  assert layout[2]["main"] == [(0, 3, (3, 3, 30, heads, hd), "float32")] and layout[5] == {}
  assert s.kv_bytes_per_scale(3)[3] == 2 * 4 * 3 * heads * hd * (20 + 30 + 43)
  held = sampler_lib.planned_held_lengths(plan, PN6, 3)
  assert held[4] == caps3 and held[5] == caps4 and held[3] == (14, 14, 14)
  # kept positions -> global token positions, per (layer, row, head)
  cum = [0, 1, 5, 14, 30, 55, 91]
  idx3, idx4 = out["kv_index"][3], out["kv_index"][4]
  assert sorted(idx3) == ["0:1", "2:3"] and sorted(idx4) == ["0:1", "1:2"]
  kept3 = {0: np.asarray(idx3["0:1"])[0], 2: np.asarray(idx3["2:3"])[0], 1: None}  # (R, cap, H) local = global
  pos3, _ = kvcompress.window_positions(4, 4, 14)
  for layer in (0, 2):
    for r in range(3):
      for hh in range(heads):
        assert set(pos3) <= set(kept3[layer][r, :, hh].tolist())
  kept4 = {0: np.asarray(idx4["0:1"])[0], 1: np.asarray(idx4["1:2"])[0], 2: None}
  biases = []
  for layer in range(3):
    allow = np.ones((3, heads, 91, 91), bool)
    g3 = np.broadcast_to(np.arange(30)[None, :, None], (3, 30, heads)) if kept3[layer] is None else kept3[layer]
    allow[:, :, cum[4]:cum[5], :cum[4]] = False
    for r in range(3):
      for hh in range(heads):
        allow[r, hh, cum[4]:cum[5], g3[r, :, hh]] = True
    # scale 5 sees the layer's cache after scale 4: [kept of g3 ; scale 4] compressed again
    local = np.concatenate([g3, np.broadcast_to(np.arange(30, 55)[None, :, None], (3, 25, heads))], axis=1)
    allow[:, :, cum[5]:, :cum[5]] = False
    for r in range(3):
      for hh in range(heads):
        keep = local[r, :, hh] if kept4[layer] is None else local[r, kept4[layer][r, :, hh], hh]
        allow[r, hh, cum[5]:, keep] = True
    biases.append(jnp.asarray(np.where(allow, 0.0, -np.inf), jnp.float32))
  x = vae.idx_to_var_input(vae.split_tokens(jnp.asarray(out["tokens"])))
  ref = _teacher_forced(var, labels, x, biases)
  np.testing.assert_allclose(out["cond_logits"], ref, atol=1e-5, rtol=0)
  full = _teacher_forced(var, labels, x, [None] * 3)
  assert np.abs(np.asarray(full[:, cum[4]:]) - np.asarray(ref[:, cum[4]:])).max() > 1e-3  # the eviction mattered
  np.testing.assert_allclose(full[:, :cum[4]], ref[:, :cum[4]], atol=1e-5)


def test_uniform_budget_with_cfg_bf16_cache_and_mesh(six):
  """A uniform budget with CFG (cond and uncond rows select their own tokens) and a bfloat16 cache, on the 8-device
  mesh: the same tokens as one device, half the bytes of a float32 cache, and fewer bytes than the full cache."""
  from var import sharding

  var, vae = six
  sampling = sampler_lib.SamplingConfig(cfg=1.5, top_k=8)
  plan = plan_lib.build(var.config, 8, cfg=1.5, kv_budget=20)
  assert [si for si, st in enumerate(plan.steps) if st.kv_capacity] == [3, 4]
  labels, seeds = np.arange(8) % 11, np.arange(8) + 5
  one = sampler_lib.Sampler(var, vae, sampling, plan=plan, kv_dtype="bfloat16")
  out1 = one(labels, seeds)
  mesh = sharding.make_mesh((4, 2, 1))
  out8 = sampler_lib.Sampler(var, vae, sampling, plan=plan, kv_dtype="bfloat16", mesh=mesh)(labels, seeds)
  np.testing.assert_array_equal(out8["tokens"], out1["tokens"])
  full = sampler_lib.Sampler(var, vae, sampling)
  full.compile(8)
  b_comp, b_full = one.kv_bytes_per_scale(8), full.kv_bytes_per_scale(8)
  heads, hd = var.config.num_heads, var.config.head_dim
  assert b_comp[4] == 2 * 2 * 16 * heads * hd * 3 * 20  # bf16, 16 rows, 3 layers, 20 tokens
  assert b_full[4] == 2 * 4 * 16 * heads * hd * 3 * 55  # one buffer of the longest re-read prefix (55 tokens)


def test_prune_keep_all_equals_plain(t1):
  """A PruneStep keeping every token runs the pruned path (gather, restore, scatter) yet gives the plain result."""
  var, vae, io = t1
  prune = PruneStep(keep=16, first=0, last=2, cache_scale=1)
  plan = ScalePlan.plain(4, 4, cfg=1.5).replace(2, prune=PruneStep(9, 0, 2, 1)).replace(3, prune=prune)
  s = sampler_lib.Sampler(var, vae, sampler_lib.SamplingConfig(cfg=1.5, top_k=1), plan=plan, return_logits=True)
  out = s(io["labels_sample"], np.arange(4))
  np.testing.assert_array_equal(out["tokens"], io["sample_cfg1p5_idx_BL"])
  np.testing.assert_allclose(out["logits"], io["sample_cfg1p5_logits_BLV"], atol=1e-4, rtol=0)


def test_pts_and_ctr_against_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 25, 8)).astype(np.float32)
  idx = np.asarray(pruning.pivotal_indices(jnp.asarray(x), 7))
  score = ((x - x.mean(1, keepdims=True)) ** 2).sum(-1)
  for r in range(3):
    np.testing.assert_array_equal(np.sort(idx[r]), np.sort(np.argsort(-score[r])[:7]))
  branch = rng.normal(size=(3, 9, 8)).astype(np.float32)  # a 3x3 map upsampled to 5x5
  up = np.asarray(pruning.upsample_branch(jnp.asarray(branch), 5))
  m = area_matrix(3, 5)
  ref = np.einsum("oh,rhwc,pw->ropc", m, branch.reshape(3, 3, 3, 8), m).reshape(3, 25, 8)
  np.testing.assert_allclose(up, ref, atol=1e-6)
  assert pruning.keep_count(256, 0.75) == 64 and pruning.keep_count(169, 0.5) == 85


def test_pruned_scale_matches_independent_reference(t1):
  """FastVAR at T1's last scale (keep 6 of 16 tokens in both layers, restoring from scale 2): the cond logits of
  scale 3 equal a step-by-step re-computation (numpy PTS, area-upsampled recorded branches, attention over the
  teacher-forced keys plus the kept tokens' keys)."""
  var, vae, io = t1
  plan = ScalePlan.plain(4, 4, cfg=0.0).replace(3, prune=PruneStep(keep=6, first=0, last=2, cache_scale=2))
  s = sampler_lib.Sampler(var, vae, sampler_lib.SamplingConfig(cfg=0.0, top_k=1), plan=plan, return_logits=True)
  labels = io["labels_sample"]
  out = s(labels, np.arange(4))
  tokens = jnp.asarray(out["tokens"])
  x = vae.idx_to_var_input(vae.split_tokens(tokens))
  cond = var.condition(jnp.asarray(labels))
  block_cond = var.block_condition(cond)
  h_all = var.embed_inputs(cond, x)  # (B, 30, C)
  h_prev, h3 = h_all[:, :14], h_all[:, 14:]
  graphdef, state = nnx.split(var.blocks)
  causal = jnp.asarray(var_model.block_causal_bias(var.config.patch_nums)[:14, :14])
  m = area_matrix(3, 4)
  for layer in range(2):
    block = nnx.merge(graphdef, jax.tree.map(lambda a, i=layer: a[i], state))
    mod = block.modulation(block_cond)[:, None]
    box = {}

    def record(k, v, box=box):
      box["kv"] = (k, v)
      return k, v

    attn = block.attn_branch(h_prev, mod, attn_bias=causal, kv_fn=record)
    k_prev, v_prev = box["kv"]
    mid = h_prev + attn
    ffn = block.ffn_branch(mid, mod)
    up = {name: np.einsum("oh,bhwc,pw->bopc", m, np.asarray(br[:, 5:14]).reshape(4, 3, 3, -1), m).reshape(4, 16, -1)
          for name, br in (("attn", attn), ("ffn", ffn))}
    h = np.asarray(h3)
    for name in ("attn", "ffn"):
      score = ((h - h.mean(1, keepdims=True)) ** 2).sum(-1)
      keep = np.argsort(-score, axis=1)[:, :6]
      sub = jnp.asarray(np.take_along_axis(h, keep[..., None], axis=1))
      if name == "attn":
        kv = lambda k, v, kp=k_prev, vp=v_prev: (jnp.concatenate([kp, k], 1), jnp.concatenate([vp, v], 1))
        out_k = np.asarray(block.attn_branch(sub, mod, kv_fn=kv))
      else:
        out_k = np.asarray(block.ffn_branch(sub, mod))
      full = up[name].copy()
      np.put_along_axis(full, keep[..., None], out_k, axis=1)
      h = h + full
    h_prev, h3 = mid + ffn, jnp.asarray(h)
  ref = var.logits(h3, cond)
  np.testing.assert_allclose(out["cond_logits"][:, 14:], ref, atol=1e-5, rtol=0)
  assert np.abs(np.asarray(ref) - np.asarray(var(jnp.asarray(labels), x)[:, 14:])).max() > 1e-3  # pruning mattered


def test_skipped_scale_draws_nothing(six):
  var, vae = six
  sampling = sampler_lib.SamplingConfig(cfg=1.5, top_k=1)
  labels, seeds = np.array([1, 2, 3, 4]), np.arange(4)
  plan = plan_lib.build(var.config, 4, cfg=1.5, prune={4: 0.5, 5: 1.0})
  assert plan[5].skip and plan[4].prune == PruneStep(keep=13, first=0, last=3, cache_scale=3)
  out = sampler_lib.Sampler(var, vae, sampling, plan=plan)(labels, seeds)
  plain = sampler_lib.Sampler(var, vae, sampling)(labels, seeds)
  tokens = np.asarray(out["tokens"])
  assert (tokens[:, 55:] == -1).all() and (tokens[:, :55] >= 0).all()
  np.testing.assert_array_equal(tokens[:, :30], np.asarray(plain["tokens"])[:, :30])
  f_hat = vae.idx_to_fhat(vae.split_tokens(jnp.asarray(tokens))[:5])
  np.testing.assert_allclose(out["f_hat"], f_hat, atol=1e-5)
  np.testing.assert_allclose(out["images"], (vae.fhat_to_img(f_hat) + 1) / 2, atol=1e-5)


def test_plan_build_errors(six):
  var, _ = six
  cfg = var.config
  cases = [
    (dict(kv_budget="2%"), "below the observation window"),
    (dict(kv_budget=500), "exceeds the full cache"),
    (dict(prune={3: 1.5}), r"outside \[0, 1\]"),
    (dict(prune={0: 0.5}), "scale 0 cannot be pruned"),
    (dict(prune={4: 0.5}, prune_cache_scale=4), "is itself pruned"),
    (dict(prune={9: 0.5}), "out of range"),
    (dict(prune={4: 0.5}, prune_layers="2:7"), "outside the 3-layer model"),
    (dict(prune={4: 1.0}), "only trailing scales"),
    (dict(prune="4=0.5"), "SCALE:RATIO"),
  ]
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      plan_lib.build(cfg, 4, **kwargs)


def test_scalekv_fastvar_cfg_editing_bf16_on_the_mesh(six):
  """Everything at once: a token budget and pruning at scale 4 (pruned layers append 13 tokens, then compress with
  their pivotal tokens as the window), CFG and editing; float32 on 8 devices == 1 device, and bfloat16 activations
  with a bfloat16 cache (whose rounding may move a few tokens) keep the edited positions and most tokens."""
  from benchmarks.bench_sample import with_dtype
  from var import editing, sharding

  var, vae = six
  plan = plan_lib.build(var.config, 8, cfg=1.5, kv_budget=20, prune={4: 0.5}, prune_layers="1:3")
  assert plan[4].prune == PruneStep(keep=13, first=1, last=3, cache_scale=3) and plan[4].kv_capacity == (20,) * 3
  img = jax.random.uniform(jax.random.key(0), (8, 24, 24, 3), minval=-1, maxval=1)
  edit = editing.edit_inputs(vae, img, editing.outpaint_mask(6, (0.0, 0.0, 0.5, 0.5)))
  sampling = sampler_lib.SamplingConfig(cfg=1.5, top_k=8)
  labels, seeds = np.arange(8) % 11, np.arange(8)
  out1 = sampler_lib.Sampler(var, vae, sampling, plan=plan)(labels, seeds, edit)
  out8 = sampler_lib.Sampler(var, vae, sampling, plan=plan, mesh=sharding.make_mesh((4, 2, 1)))(labels, seeds, edit)
  np.testing.assert_array_equal(out8["tokens"], out1["tokens"])
  half = sampler_lib.Sampler(with_dtype(var, "bfloat16"), vae, sampling, plan=plan, kv_dtype="bfloat16")
  out16 = half(labels, seeds, edit)
  # after scale 4 every layer holds 20 bf16 tokens (layer 0 unpruned, layers 1-2 pruned: two runs)
  assert half.kv_layouts[8][4]["main"] == [(0, 1, (1, 16, 20, 4, 16), "bfloat16"),
                                           (1, 3, (2, 16, 20, 4, 16), "bfloat16")]
  tokens, gt = np.asarray(out16["tokens"]), np.asarray(edit["tokens"])
  keep = np.asarray(editing.scale_keep_mask(edit["mask"], 6)).reshape(8, -1)
  np.testing.assert_array_equal(tokens[:, 55:][keep], gt[:, 55:][keep])
  assert (tokens[:, :30] == np.asarray(out1["tokens"])[:, :30]).mean() > 0.9
