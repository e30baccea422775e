"""Training recipe pieces against the official formulas, codebook maintenance, and bad-input errors."""

import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import train_testlib as tl
from flax import nnx

from configs import digits_tokenizer, digits_var, imagenet_var
from var import model as var_model
from var import train_lib


def official_lr_wd(sche, peak, wd, wd_end, it, wp_it, max_it, wp0=0.005, wpe=0.01):
  """VAR utils/lr_control.py `lr_wd_annealing`, transcribed line by line (lin0 / cos / lin00)."""
  wp_it = round(wp_it)
  if it < wp_it:
    cur = wp0 + (1 - wp0) * it / wp_it
  else:
    pasd = (it - wp_it) / (max_it - 1 - wp_it)
    rest = 1 - pasd
    if sche == "cos":
      cur = wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * pasd))
    elif sche == "lin0":
      cur = 1 if pasd < 0.05 else wpe + (1 - wpe) * rest / 0.95
    else:  # lin00
      cur = wpe + (1 - wpe) * rest
  pasd = it / (max_it - 1)
  return cur * peak, wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * pasd))


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", False)


@pytest.mark.parametrize("sche", ["lin0", "cos", "lin00"])
def test_lr_and_weight_decay_schedules_match_official(sche):
  cfg = imagenet_var.get_config("depth=30")  # wpe 0.01, twd 0.05 -> twde 0.08, peak 8e-5 * 1024 / 256
  o, total = cfg.optim, 1000
  peak = train_lib.peak_lr(o, cfg.input.batch_size)
  assert peak == pytest.approx(3.2e-4)
  for it in [0, 1, 7, 19, 20, 21, 60, 61, 500, 998, 999]:
    lr_ref, wd_ref = official_lr_wd(sche, peak, o.weight_decay, o.weight_decay_end, it, 20, total,
                                    wpe=o.end_ratio)
    lr = peak * float(train_lib.lr_factor(it, schedule=sche, warmup_steps=20, total_steps=total,
                                          warmup_start=o.warmup_start, end_ratio=o.end_ratio))
    wd = float(train_lib.weight_decay_at(it, weight_decay=o.weight_decay, weight_decay_end=o.weight_decay_end,
                                         total_steps=total))
    assert lr == pytest.approx(lr_ref, rel=1e-5, abs=1e-12), (it, lr, lr_ref)
    assert wd == pytest.approx(wd_ref, rel=1e-5), (it, wd, wd_ref)
  assert official_lr_wd(sche, peak, 0.05, 0.08, 999, 20, total)[0] == pytest.approx(0.01 * peak)


def test_imagenet_recipes_table():
  rows = {16: (768, 3.0e-4, 1e-3, 0.1, 0.05), 20: (768, 3.0e-4, 1e-3, 0.1, 0.05),
          24: (768, 2.4e-4, 1e-4, 0.01, 0.05), 30: (1024, 3.2e-4, 1e-5, 0.01, 0.08),
          36: (768, 2.4e-4, 5e-6, 0.01, 0.08)}
  for depth, (bs, peak, alng, wpe, twde) in rows.items():
    c = imagenet_var.get_config(f"depth={depth}")
    iters = math.ceil(1_281_167 / bs)
    assert c.input.batch_size == bs and c.model.init_adaln_gamma == alng
    assert train_lib.peak_lr(c.optim, bs) == pytest.approx(peak)
    assert (c.optim.end_ratio, c.optim.weight_decay, c.optim.weight_decay_end) == (wpe, 0.05, twde)
    assert c.optim.warmup_steps == round(c.total_steps / iters / 50 * iters)
    assert (c.optim.b1, c.optim.b2, c.optim.grad_clip, c.loss.cond_drop_rate) == (0.9, 0.95, 2.0, 0.1)
    assert c.model.shared_aln == (depth == 36) and c.input.resolution == (512 if depth == 36 else 256)
  assert imagenet_var.get_config("depth=16").total_steps == 200 * math.ceil(1_281_167 / 768)


def test_no_weight_decay_set_is_the_official_one():
  cfg = var_model.VARConfig(depth=2, width=64, num_heads=4, vocab_size=64, z_channels=8,
                            patch_nums=(1, 2, 3, 4), num_classes=10)
  params = nnx.state(var_model.abstract(cfg), nnx.Param)
  mask = train_lib.decay_mask(params)
  decayed = {jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(mask) if v}
  assert decayed == {"['word_embed']['kernel']", "['class_emb']['embedding']",
                     "['blocks']['ada_lin']['kernel']", "['blocks']['attn']['mat_qkv']['kernel']",
                     "['blocks']['attn']['proj']['kernel']",
                     "['blocks']['ffn']['fc1']['kernel']", "['blocks']['ffn']['fc2']['kernel']",
                     "['head_nm']['ada_lin']['kernel']", "['head']['kernel']"}
  # stacked (depth, C) biases count as 1-D: the "layers" axis is not a parameter dimension
  assert not mask["blocks"]["attn"]["q_bias"] and not mask["blocks"]["attn"]["scale_mul_1H11"]


def test_adamw_step_matches_the_torch_recipe():
  """Two steps of clip(2.0) + AdamW(0.9, 0.95) with decay only on the decay set, against a numpy transcription
  of torch.optim.AdamW (decoupled decay p *= 1 - lr * wd) and clip_grad_norm_."""

  class Toy(nnx.Module):
    def __init__(self):
      self.lin = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      self.pos_1LC = nnx.Param(jnp.linspace(-1, 1, 6).reshape(1, 3, 2))

  with nnx.use_eager_sharding(False):
    toy = Toy()
  o = ml_collections.ConfigDict(dict(tblr=0.1, b1=0.9, b2=0.95, eps=1e-8, schedule="lin0", warmup_steps=0,
                                     warmup_start=0.005, end_ratio=0.01, weight_decay=0.05,
                                     weight_decay_end=0.05, grad_clip=2.0))
  params = nnx.state(toy, nnx.Param)
  tx = train_lib.make_optimizer(o, params, global_batch=256, total_steps=100)
  opt_state = tx.init(nnx.to_pure_dict(params))
  p = jax.tree.map(np.float64, nnx.to_pure_dict(params))
  ref = {"b": np.array(p["lin"]["bias"]), "k": np.array(p["lin"]["kernel"]), "pos": np.array(p["pos_1LC"])}
  m = {k: np.zeros_like(v) for k, v in ref.items()}
  v2 = {k: np.zeros_like(v) for k, v in ref.items()}
  cur = nnx.to_pure_dict(params)
  rng = np.random.default_rng(0)
  for t in (1, 2):
    g = {"b": rng.normal(size=2), "k": rng.normal(size=(3, 2)) * 3, "pos": rng.normal(size=(1, 3, 2))}
    grads = {"lin": {"bias": jnp.asarray(g["b"], jnp.float32), "kernel": jnp.asarray(g["k"], jnp.float32)},
             "pos_1LC": jnp.asarray(g["pos"], jnp.float32)}
    updates, opt_state = tx.update(grads, opt_state, cur)
    cur = optax.apply_updates(cur, updates)
    norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
    scale = min(1.0, 2.0 / (norm + 1e-6))
    lr = 0.1 * float(train_lib.lr_factor(t - 1, schedule="lin0", warmup_steps=0, total_steps=100))
    for k in ref:
      gk = g[k] * scale
      m[k] = 0.9 * m[k] + 0.1 * gk
      v2[k] = 0.95 * v2[k] + 0.05 * gk * gk
      if k == "k":  # only the Linear weight decays
        ref[k] = ref[k] * (1 - lr * 0.05)
      ref[k] = ref[k] - lr * (m[k] / (1 - 0.9 ** t)) / (np.sqrt(v2[k] / (1 - 0.95 ** t)) + 1e-8)
    # optax's clip uses max_norm / norm (torch adds 1e-6 to the norm): relative difference ~1e-6
    np.testing.assert_allclose(np.asarray(cur["lin"]["kernel"]), ref["k"], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(cur["lin"]["bias"]), ref["b"], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(cur["pos_1LC"]), ref["pos"], rtol=2e-5, atol=2e-6)


def test_var_loss_matches_official_fixture(shared_dir):
  io = np.load(shared_dir / "fixtures" / "var" / "T1" / "io.npz")
  w = train_lib.var_loss_weights((1, 2, 3, 4), -1, 1.0)
  np.testing.assert_allclose(np.asarray(w), np.full(30, 1 / 30), rtol=1e-7)
  for ls, key in ((0.0, "loss_ls0"), (0.1, "loss_ls0p1")):
    got = var_model.cross_entropy_loss(jnp.asarray(io["logits_fwd"]), jnp.asarray(io["idx_BL"]), ls, w[None])
    assert abs(float(got) - float(io[key])) < 2e-6, (key, float(got), float(io[key]))


def test_progressive_training_schedule_and_weights():
  kw = dict(num_scales=4, pg=0.5, pg0=1, warmup_steps=2, total_steps=20, pg_warmup_steps=3)
  stages = [train_lib.progressive_stage(s, **kw) for s in range(12)]
  # official: prog_si = pg0 through warmup, ramps to S-1 by pg * max_it, then -1 (= all scales); the newest
  # scale's weight ramps over pg_warmup_steps except in the first stage
  # (it 8: progress 0.75 -> round(1.5) = 2 -> prog_si 3 = S-1, i.e. -1; Python rounds half to even like the
  # official)
  assert [s for s, _ in stages] == [1, 1, 1, 1, 1, 2, 2, 2, -1, -1, -1, -1]
  assert stages[5][1] == pytest.approx(1 / 3) and stages[6][1] == pytest.approx(2 / 3) and stages[7][1] == 1.0
  assert all(w == 1.0 for _, w in stages[:5])
  w = np.asarray(train_lib.var_loss_weights((1, 2, 3, 4), 2, 0.25)) * 30
  np.testing.assert_allclose(w, [1] * 5 + [0.25] * 9 + [0] * 16)
  assert train_lib.progressive_stage(7, **{**kw, "pg": 0.0}) == (-1, 1.0)


def test_codebook_usage_metrics():
  idx = [jnp.zeros((2, 1), jnp.int32), jnp.arange(8, dtype=jnp.int32).reshape(2, 4)]
  m = jax.device_get(train_lib.codebook_usage_metrics(idx, 16))
  assert m["perplexity/s0"] == pytest.approx(1.0) and m["codes_used/s0"] == pytest.approx(1 / 16)
  assert m["perplexity/s1"] == pytest.approx(8.0) and m["codes_used/s1"] == pytest.approx(0.5)
  p = np.array([3, 1, 1, 1, 1, 1, 1, 1]) / 10  # code 0 is used 3 times overall
  assert m["perplexity"] == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-5)


def _tokenizer_step(config, img, prepare=None):
  """One tokenizer_train_step on one device; returns (trainer before, trainer after, metrics)."""
  with nnx.use_eager_sharding(False):
    trainer = train_lib.TokenizerTrainer(config, global_batch=img.shape[0], rngs=nnx.Rngs(0))
  if prepare:
    prepare(trainer)
  graphdef, state = nnx.split(trainer)
  before = jax.tree.map(np.array, state)
  new_state, metrics = jax.jit(lambda s, b: train_lib.tokenizer_train_step(graphdef, s, b, config=config))(
      state, {"image": jnp.asarray(img)})
  return nnx.merge(graphdef, before), nnx.merge(graphdef, new_state), metrics


def test_ema_codebook_update_and_dead_code_restart(tmp_path):
  """One EMA-codebook step at a restart step: starved codes get vectors of this batch, the others follow the
  EMA formula (VQ-VAE-2 style, Laplace-smoothed counts) computed here in numpy from the quantised vectors."""
  img = tl.synthetic_batch(4, 8)["image"]
  config = tl.tokenizer_config(tmp_path, **{"loss.codebook_update": "ema", "loss.restart_every": 1,
                                            "loss.restart_threshold": 0.5})
  dead = np.arange(0, 64, 2)

  def starve(trainer):  # usage EMA of the even codes at 0, and a step where restarts happen
    trainer.codebook_stats.usage[...] = trainer.codebook_stats.usage[...].at[dead].set(0.0)
    trainer.opt.step[...] = jnp.uint32(1)

  old, new, metrics = _tokenizer_step(config, img, starve)
  f = old.model.encode(jnp.asarray(img))
  idx_list = old.model.img_to_idx(jnp.asarray(img))
  zs = np.concatenate([np.asarray(z) for z in train_lib.scale_residuals(old.model, f, idx_list)])
  idx = np.concatenate([np.asarray(i).reshape(-1) for i in idx_list])
  vocab, d = 64, config.loss.ema_decay
  counts = np.bincount(idx, minlength=vocab).astype(np.float64)
  sums = np.zeros((vocab, zs.shape[1]))
  np.add.at(sums, idx, zs)
  share = idx.size / vocab
  ema_count = d * share + (1 - d) * counts
  smoothed = (ema_count + 1e-5) / (ema_count.sum() + vocab * 1e-5) * ema_count.sum()
  ema_codebook = (1 - d) * sums / smoothed[:, None]
  cb_new = np.asarray(new.model.quantize.embedding.embedding[...])
  alive = np.setdiff1d(np.arange(vocab), dead)
  np.testing.assert_allclose(cb_new[alive], ema_codebook[alive], rtol=1e-4, atol=1e-7)
  usage = np.asarray(new.codebook_stats.usage[...])
  np.testing.assert_allclose(usage[alive], d * share + (1 - d) * counts[alive], rtol=1e-6)
  # every starved code was restarted with one of this batch's quantised vectors, and given a fresh usage share
  assert int(metrics["codes_restarted"]) == len(dead)
  dist = np.min(np.abs(cb_new[dead][:, None, :] - zs[None]).max(-1), axis=1)
  assert dist.max() < 1e-5
  np.testing.assert_allclose(usage[dead], share)
  assert np.abs(cb_new[dead] - ema_codebook[dead]).max() > 1e-3  # (restart really replaced the EMA value)


def _run_errors(config, tmp_path, exc, match):
  with pytest.raises(exc, match=match):
    train_lib.train_and_evaluate(config, tmp_path / "w")


def test_bad_inputs_fail_before_work(tmp_path):
  tok_dir = tl.write_tokenizer_dir(tmp_path / "tok")
  data_dir = tmp_path / "tfds"
  c = tl.var_config(data_dir, tok_dir)
  c.stage = "gan"
  _run_errors(c, tmp_path, ValueError, "config.stage='gan' is not a training stage")
  _run_errors(tl.var_config(data_dir, tok_dir, **{"input.batch_size": 6}), tmp_path, ValueError,
              "global batch size 6 is not divisible by the 8 batch shards")
  _run_errors(tl.var_config(data_dir, tok_dir, mesh=(3, 1, 1)), tmp_path, ValueError,
              r"mesh shape \(3, 1, 1\) has 3 devices but jax.device_count\(\)=8")
  _run_errors(tl.var_config(data_dir, tok_dir, **{"model.patch_nums": (1, 2, 3, 5)}), tmp_path, ValueError,
              r"patch_nums=\(1, 2, 3, 5\) ends in 5.*4x4 latent")
  _run_errors(tl.var_config(data_dir, tmp_path / "missing"), tmp_path, FileNotFoundError,
              "is not a tokenizer model directory")
  _run_errors(tl.var_config(data_dir, tok_dir, **{"input.name": "no_such_dataset_xyz"}), tmp_path,
              FileNotFoundError, r"data_dir=.*tfds' does not exist")
  data_dir.mkdir()
  _run_errors(tl.var_config(data_dir, tok_dir, **{"input.name": "no_such_dataset_xyz"}), tmp_path, Exception,
              "no_such_dataset_xyz")
  folder = {"input.name": "folder", "input.data_dir": str(tmp_path / "nope")}
  _run_errors(tl.var_config(data_dir, tok_dir, **folder), tmp_path, Exception, "nope")
  _run_errors(tl.tokenizer_config(data_dir, **{"loss.lpips_weight": 1.0}), tmp_path, FileNotFoundError,
              "lpips_vgg_weights=''")
  assert not (tmp_path / "w" / "ckpt").exists()  # nothing was written by any of the failed runs


def test_unknown_config_field_is_an_error(tmp_path):
  """train.py locks the config: an override of a field that does not exist stops before any work."""
  root = pathlib.Path(__file__).resolve().parents[1]
  proc = subprocess.run([sys.executable, str(root / "train.py"), "--config=configs/digits_var.py:runlocal",
                         f"--workdir={tmp_path / 'w'}", "--config.model.no_such_field=3"],
                        cwd=root, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "no_such_field" in proc.stderr
  assert not (tmp_path / "w").exists()
  with pytest.raises(ValueError, match="Unknown config argument 'dept'"):
    digits_var.get_config("dept=3")
  assert digits_var.get_config("depth=3,runlocal").model.depth == 3
  assert digits_tokenizer.get_config("runlocal").stage == "tokenizer"
