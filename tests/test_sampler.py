"""The jitted sampler against the official `autoregressive_infer_cfg` (fixture T1) and its plan / sharding / editing
machinery."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from var import editing
from var import model as var_model
from var import sampler as sampler_lib
from var.plan import PruneStep, ScalePlan, SelectStep


@pytest.fixture(scope="module")
def greedy(t1):
  var, vae, _ = t1
  return sampler_lib.Sampler(var, vae, sampler_lib.SamplingConfig(cfg=1.5, top_k=1), return_logits=True)


pytestmark = pytest.mark.usefixtures("fast_compile")


def _check_against_teacher_forcing(var, vae, out, labels, ts):
  """KV-cached logits == block-causal teacher-forced logits on the sampled tokens: the conditional rows to 1e-5,
  the CFG mix (ramp value t per scale, None = cond only) to 5e-5 (it amplifies differences by 1 + 2t; measured
  9.1e-6)."""
  x = vae.idx_to_var_input(vae.split_tokens(jnp.asarray(out["tokens"])))
  cond = var(jnp.asarray(labels), x)
  uncond = var(jnp.full_like(jnp.asarray(labels), var.config.num_classes), x)
  np.testing.assert_allclose(out["cond_logits"], cond, atol=1e-5, rtol=0)
  parts = []
  for (b, e), t in zip(var.config.begin_ends, ts, strict=True):
    parts.append(cond[:, b:e] if t is None else (1 + t) * cond[:, b:e] - t * uncond[:, b:e])
  np.testing.assert_allclose(out["logits"], jnp.concatenate(parts, axis=1), atol=5e-5, rtol=0)


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("cfg,tag", [(1.5, "cfg1p5"), (1.0, "cfg1")])
def test_greedy_matches_official(t1, greedy, cfg, tag):
  var, vae, io = t1
  out = greedy(io["labels_sample"], np.arange(4), cfg=cfg)
  np.testing.assert_array_equal(out["tokens"], io[f"sample_{tag}_idx_BL"])
  np.testing.assert_allclose(_nchw(out["f_hat"]), io[f"sample_{tag}_fhat"], atol=6e-7, rtol=0)  # measured 1.2e-7
  np.testing.assert_allclose(_nchw(out["images"]), io[f"sample_{tag}_img"], atol=1e-5, rtol=0)  # measured 2.1e-6
  if tag == "cfg1p5":
    np.testing.assert_allclose(out["logits"], io["sample_cfg1p5_logits_BLV"], atol=1e-4, rtol=0)
  # KV-cached logits == block-causal teacher-forced logits on the sampled tokens
  _check_against_teacher_forcing(var, vae, out, io["labels_sample"], [cfg * si / 3 for si in range(4)])
  # greedy is seed independent; one executable serves every seed, label and cfg value
  again = greedy(io["labels_sample"][::-1], np.arange(4) + 100, cfg=cfg)
  np.testing.assert_array_equal(again["tokens"], io[f"sample_{tag}_idx_BL"][::-1])
  assert greedy.trace_count == 1


def test_top_k_top_p_masks_match_official(shared_dir):
  ref = np.load(shared_dir / "fixtures" / "var" / "common" / "topk_topp.npz")
  logits = jnp.asarray(ref["logits"])
  names = [k for k in ref if k.startswith("keep_")]
  assert len(names) == 6
  for name in names:
    k, p = name[len("keep_k"):].split("_p")
    masked = sampler_lib.mask_top_k_top_p(logits, int(k), float(p.replace("p", ".")))
    np.testing.assert_array_equal(np.isfinite(np.asarray(masked)), ref[name], err_msg=name)
  with pytest.raises(ValueError, match="exceeds the vocabulary"):
    sampler_lib.mask_top_k_top_p(logits, 33)


def test_more_smooth_and_temperature():
  codebook = jnp.asarray(np.random.default_rng(0).normal(size=(16, 3)), jnp.float32)
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 16)), jnp.float32)
  keys = jax.vmap(jax.random.key)(jnp.arange(2))
  # top_k=1: the soft embedding collapses onto the drawn (= argmax) code
  cfg = sampler_lib.SamplingConfig(top_k=1, more_smooth=True)
  tok, h = sampler_lib.sample_tokens(logits, keys, cfg, 0.5, codebook)
  np.testing.assert_array_equal(tok, jnp.argmax(logits, -1))
  np.testing.assert_allclose(h, codebook[tok], atol=1e-6)
  # no filtering: a convex combination of codes, not a code
  tok, h = sampler_lib.sample_tokens(logits, keys, sampler_lib.SamplingConfig(more_smooth=True), 0.0, codebook)
  assert np.abs(np.asarray(h) - np.asarray(codebook[tok])).max() > 1e-3
  # a tiny temperature turns sampling into argmax
  tok, _ = sampler_lib.sample_tokens(logits, keys, sampler_lib.SamplingConfig(temperature=1e-4), 0.0, codebook)
  np.testing.assert_array_equal(tok, jnp.argmax(logits, -1))


def test_plan_select_model_switch_and_cfg_off(t1):
  """A plan that keeps candidates (3, 1) after scale 1, hands over to another model at scale 2 (prefill) and
  drops CFG at the last scale: selected samples equal the same samples of the plain run, and every logit equals
  the teacher-forced logits of the model that produced it."""
  var, vae, io = t1
  plan = ScalePlan.plain(4, 4, cfg=1.5).replace(1, select=SelectStep("pick", 2))
  plan = plan.replace(2, batch=2, model="refiner").replace(3, batch=2, model="refiner", cfg_on=False)
  hooks = sampler_lib.SamplerHooks(select={"pick": lambda ctx, key: jnp.asarray([3, 1])})
  s = sampler_lib.Sampler({"main": var, "refiner": var}, vae, sampler_lib.SamplingConfig(cfg=1.5, top_k=1),
                          plan=plan, hooks=hooks, return_logits=True)
  out = s(io["labels_sample"], np.arange(4))
  ref_tokens = io["sample_cfg1p5_idx_BL"][[3, 1]]
  assert out["tokens"].shape == (2, 30) and out["images"].shape == (2, 16, 16, 3)
  np.testing.assert_array_equal(out["tokens"][:, :14], ref_tokens[:, :14])
  _check_against_teacher_forcing(var, vae, out, io["labels_sample"][[3, 1]], [0.0, 0.5, 1.0, None])
  np.testing.assert_allclose(out["f_hat"], vae.idx_to_fhat(vae.split_tokens(out["tokens"])), atol=1e-6)


def test_plan_validation(t1):
  var, vae, _ = t1
  make = lambda plan, hooks=None: sampler_lib.Sampler(var, vae, plan=plan, hooks=hooks)
  plain = ScalePlan.plain(4, 4)
  with pytest.raises(ValueError, match="only changes through a SelectStep"):
    make(plain.replace(2, batch=2))
  with pytest.raises(ValueError, match="no function in SamplerHooks.select"):
    make(plain.replace(1, select=SelectStep("cluster", 2)))
  with pytest.raises(ValueError, match="switches back on"):
    make(plain.replace(1, cfg_on=False))
  with pytest.raises(ValueError, match="no compression after the last scale"):
    make(plain.replace(3, kv_capacity=(3, 3)))
  with pytest.raises(ValueError, match="only trailing scales"):
    make(plain.replace(2, skip=True))
  with pytest.raises(ValueError, match="cache scale 2 must be an earlier scale"):
    make(plain.replace(2, prune=PruneStep(4, 0, 2, 2)))
  with pytest.raises(ValueError, match="not given to the sampler"):
    make(plain.replace(0, model="drafter"))
  with pytest.raises(ValueError, match="4 scales"):
    make(ScalePlan.plain(3, 4))


@pytest.fixture(scope="module")
def edit_run(t1):
  """Random sampling with editing on 8 samples (single device) - shared by the sharding and editing tests."""
  var, vae, io = t1
  img = jnp.asarray(np.concatenate([io["img"], io["img"][::-1]]).transpose(0, 2, 3, 1))  # (8, 16, 16, 3)
  mask = editing.outpaint_mask(4, (0.0, 0.0, 0.75, 0.75))  # keep the top-left 3 x 3 latent cells
  edit = editing.edit_inputs(vae, img, mask)
  labels = np.array([3, 0, 9, 10, 1, 2, 10, 5])
  seeds = np.arange(8) * 7 + 1
  sampling = sampler_lib.SamplingConfig(cfg=2.0, top_k=16, top_p=0.9)
  s = sampler_lib.Sampler(var, vae, sampling)
  return s, edit, labels, seeds, sampling, s(labels, seeds, edit)


def test_editing_keeps_masked_tokens(t1, edit_run):
  _, vae, _ = t1
  s, edit, labels, seeds, _, out = edit_run
  tokens, gt = np.asarray(out["tokens"]), np.asarray(edit["tokens"])
  np.testing.assert_array_equal(np.asarray(edit["mask"][0]), [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]])
  expected_keep = {1: [[1]], 2: [[1, 0], [0, 0]], 4: np.asarray(edit["mask"][0])}
  for si, (b, e) in enumerate(var_model.preset("tiny").begin_ends):
    pn = [1, 2, 3, 4][si]
    keep = np.asarray(editing.scale_keep_mask(edit["mask"], pn))
    if pn in expected_keep:
      np.testing.assert_array_equal(keep, np.broadcast_to(np.asarray(expected_keep[pn], bool), (8, pn, pn)))
    keep = keep.reshape(8, -1)
    assert keep.any() and (si == 0 or not keep.all())
    np.testing.assert_array_equal(tokens[:, b:e][keep], gt[:, b:e][keep])
    if si > 0:
      assert (tokens[:, b:e][~keep] != gt[:, b:e][~keep]).any()
  # the image is the decode of exactly these tokens
  np.testing.assert_allclose(out["images"], (vae.idx_to_img(vae.split_tokens(out["tokens"])) + 1) / 2, atol=7e-6)
  # torch bilinear (align_corners=False) weights: 4 -> 3 and 4 -> 2
  np.testing.assert_allclose(editing.bilinear_matrix(4, 2), [[.5, .5, 0, 0], [0, 0, .5, .5]])
  np.testing.assert_allclose(editing.bilinear_matrix(4, 3)[0], [5 / 6, 1 / 6, 0, 0], rtol=1e-6)


def test_samples_do_not_depend_on_batch_position(edit_run):
  s, edit, labels, seeds, _, out = edit_run
  perm = np.array([5, 2, 7, 0, 1, 6, 3, 4])
  edit_p = {k: np.asarray(v)[perm] for k, v in edit.items()}
  out_p = s(labels[perm], seeds[perm], edit_p)
  np.testing.assert_array_equal(out_p["tokens"], np.asarray(out["tokens"])[perm])
  assert s.trace_count == 1


def test_sharded_equals_single_device(t1, edit_run):
  from var import sharding

  var, vae, _ = t1
  _, edit, labels, seeds, sampling, out = edit_run
  mesh = sharding.make_mesh((4, 2, 1))  # batch over data x fsdp = 8 ways, parameters FSDP-sharded over 2
  s8 = sampler_lib.Sampler(var, vae, sampling, mesh=mesh)
  qkv = s8._states[0]["main"]["blocks"]["attn"]["mat_qkv"]["kernel"]
  assert qkv.sharding.spec[1] == "fsdp" and qkv.addressable_shards[0].data.shape == (2, 32, 192)
  out8 = s8(labels, seeds, edit)
  assert len(out8["images"].sharding.device_set) == 8
  np.testing.assert_array_equal(out8["tokens"], out["tokens"])
  np.testing.assert_allclose(out8["images"], out["images"], atol=1e-5)
  with pytest.raises(ValueError, match="not divisible by the 8"):
    s8(labels[:4], seeds[:4])


def test_input_errors(greedy):
  with pytest.raises(ValueError, match=r"class ids \[11\] out of range"):
    greedy([1, 2, 11, 3], np.arange(4))
  with pytest.raises(ValueError, match="one seed per sample"):
    greedy([1, 2, 3, 4], np.arange(3))
  with pytest.raises(ValueError, match="cfg"):
    greedy([1, 2, 3, 4], np.arange(4), cfg=0.0)


def test_sample_images_helper(t1):
  """The helper the training loop calls: class-major order, seed + i per sample, compiled sampler reused."""
  var, vae, io = t1
  sampler_lib._SAMPLERS.clear()  # other tests (training loop, CLI) may have cached samplers of their own
  images = sampler_lib.sample_images(var, vae, [3, 0, 9, 3], cfg=1.5, top_k=1)
  assert isinstance(images, np.ndarray) and images.shape == (4, 16, 16, 3)
  np.testing.assert_allclose(images, io["sample_cfg1p5_img"].transpose(0, 2, 3, 1), atol=1e-5)  # measured 1.9e-6
  again = sampler_lib.sample_images(var, vae, [9, 3], num_per_class=2, cfg=1.5, top_k=1, batch_size=4)
  np.testing.assert_allclose(again, images[[2, 2, 0, 0]], atol=1e-6)
  assert len(sampler_lib._SAMPLERS) == 1 and next(iter(sampler_lib._SAMPLERS.values())).trace_count == 1


def _eqns(jaxpr, inside_scan=False):
  """(eqn, inside a lax.scan) for every equation of a jaxpr and its sub-jaxprs."""
  for eqn in jaxpr.eqns:
    yield eqn, inside_scan
    for value in eqn.params.values():
      for sub in value if isinstance(value, list | tuple) else [value]:
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, "eqns"):
          yield from _eqns(sub, inside_scan or eqn.primitive.name == "scan")


def test_bfloat16_sampler_samples_from_float32_logits(t1):
  """bfloat16 activations and KV cache: the layers (inside the layer scan) compute in bfloat16, everything around
  them (embeddings, head, logits, top-k/top-p, the draw, the tokenizer) in float32."""
  var, vae, _ = t1
  bf = var_model.abstract(var_model.VARConfig.from_dict({**var.config.to_dict(), "dtype": "bfloat16"}))
  nnx.update(bf, nnx.state(var, nnx.Param))
  s = sampler_lib.Sampler(bf, vae, sampler_lib.SamplingConfig(cfg=1.5, top_k=8, top_p=0.9), kv_dtype="bfloat16")
  args = s._inputs(np.arange(2), np.arange(2), None)
  eqns = list(_eqns(jax.make_jaxpr(s._run)(s._states, *args).jaxpr))
  dtypes = lambda e: {str(v.aval.dtype) for v in (*e.invars, *e.outvars) if hasattr(v.aval, "dtype")}
  inner = [e for e, in_scan in eqns if in_scan and e.primitive.name == "dot_general"]
  outer = [e for e, in_scan in eqns if not in_scan and e.primitive.name in ("dot_general", "conv_general_dilated")]
  sampling = [e for e, in_scan in eqns if e.primitive.name in ("top_k", "cumsum", "argmax", "exp") and not in_scan]
  assert inner and all("bfloat16" in dtypes(e) for e in inner)
  assert outer and all(dtypes(e) == {"float32"} for e in outer)
  assert sampling and all(dtypes(e) <= {"float32", "int32"} for e in sampling)


def test_bfloat16_decode_changes_pixels_not_tokens(t1, greedy):
  var, vae, io = t1
  s = sampler_lib.Sampler(var, vae, sampler_lib.SamplingConfig(cfg=1.5, top_k=1), decode_dtype="bfloat16")
  out = s(io["labels_sample"], np.arange(4))
  ref = greedy(io["labels_sample"], np.arange(4))
  np.testing.assert_array_equal(out["tokens"], ref["tokens"])
  err = float(np.abs(np.asarray(out["images"]) - np.asarray(ref["images"])).max())
  assert 1e-4 < err < 0.05, err  # really bfloat16, still the same picture (measured in the report)
  with pytest.raises(ValueError, match="decode_dtype 'fp16'"):
    sampler_lib.Sampler(var, vae, decode_dtype="fp16")
