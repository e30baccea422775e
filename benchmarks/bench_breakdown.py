"""Where the time goes: the VAR sampler and the VAR train step split into separately jitted stages (JSON lines).

  python -m benchmarks.bench_breakdown [--models d16,d30] [--batch_sizes 1,8] [--dtype float32] [--train d16]
  python -m benchmarks.bench_breakdown --quick     # smoke run: tiny VAR + the fixture-size VQVAE

Random-weight official configs (`var.model.preset`, the vae_ch160v4096z32 VQVAE), 256px, cfg 1.5, top-k 900,
top-p 0.96, the plain plan. The sampler stages are the library functions the fused sampler
(`var.sampler.sample_loop`) traces, each jitted on its own and fed the previous stage's outputs (the KV cache is
donated, so its in-place writes stay in place), per scale si:
  transformer: `forward_scale` over the KV cache, both CFG halves (the class condition and the blocks' AdaLN
    modulations are built once, in "prologue")
  sample: `model.logits` (AdaLN head + vocabulary projection, both halves), the CFG mix, `sample_tokens`
    (top-k/top-p masking, the categorical draw, the codebook lookup)
  next_input: `vae.next_autoregressive_input` (f_hat update, area/bicubic resampling) and `embed_scale` of the
    next scale's input
  decode: `vae.fhat_to_img` (post_quant_conv + decoder) to [0, 1]
The staged run draws the same tokens as the fused `Sampler` (checked, "tokens_match"), whose time is reported
beside the stage sum ("fused"): the difference is what fusing the stages saves (or costs).
The train step (`var.train_lib.var_train_step`, AdamW) splits into tokenise (VQVAE encode + quantise + teacher-
forcing input), forward + backward (class dropout, drop path, weighted cross-entropy), optimizer (clip + AdamW
update), against the fused step.

Every stage reports seconds and GFLOP/s, and its fraction of two peaks measured in the same run: a 2048^3 float32
matmul and a 3x3 conv (1, 128, 128, 320) -> 320 (a decoder level). FLOPs: analytic for the transformer layers
(their `lax.scan` is a while loop, which XLA's cost analysis counts once) and for the train forward/backward
(3x the forward), XLA's cost analysis (`compiled.cost_analysis()['flops']`) for the loop-free stages (head +
sampling, next input, decode, tokenise, optimizer).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.bench_sample import jit_build, matmul_peak, with_dtype
from tokenizer import VQVAE, VQVAEConfig
from var import model as var_model
from var import sampler as sampler_lib
from var.plan import ScalePlan

SAMPLING = sampler_lib.SamplingConfig(cfg=1.5, top_k=900, top_p=0.96)
QUICK_SAMPLING = sampler_lib.SamplingConfig(cfg=1.5, top_k=16, top_p=0.9)  # the tiny models' vocabulary is 64


def conv_peak(iters: int = 3) -> float:
  """Best float32 rate (FLOP/s) of a 3x3 conv (1, 128, 128, 320) -> 320, NHWC / HWIO as in the VQVAE."""
  x = jax.random.normal(jax.random.key(0), (1, 128, 128, 320), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (3, 3, 320, 320), jnp.float32)
  f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC")))
  return 2 * 128 * 128 * 320 * 320 * 9 / _best(f, (x, w), iters)


def device_and_peaks() -> tuple[str, dict]:
  """This run's device string and its matmul / conv peaks (FLOP/s), also printed as the "peaks" record."""
  device = f"{jax.devices()[0].platform}:{jax.device_count()}x {jax.devices()[0].device_kind}"
  peaks = {"matmul": matmul_peak(), "conv": conv_peak()}
  print(json.dumps({"bench": "peaks", "device": device, "matmul_2048_gflop_per_s": round(peaks["matmul"] / 1e9, 1),
                    "conv3x3_128x128x320_gflop_per_s": round(peaks["conv"] / 1e9, 1)}), flush=True)
  return device, peaks


def _best(fn, args, iters: int) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def _xla_flops(jitted, *args) -> float:
  cost = jitted.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  return float(cost.get("flops", 0.0))


def transformer_flops(config: var_model.VARConfig, rows: int, n: int, held: int) -> float:
  """Matmul FLOPs of all blocks on n new tokens per row over `held` cached ones: AdaLN (6C per row), qkv 3C,
  proj C, MLP 2 * 4C per token, attention scores and values over held + n keys."""
  c, hidden = config.width, config.mlp_hidden
  per_layer = 2 * c * 6 * c + n * 2 * c * (3 * c + c + 2 * hidden) + 4 * n * (held + n) * c
  return float(rows * config.depth * per_layer)


class StagedSampler:
  """The plain-plan sampler (CFG on) as separately jitted stages; see the module docstring."""

  def __init__(self, var, vae, sampling: sampler_lib.SamplingConfig, batch: int):
    self.var, self.vae, self.sampling, self.b = var, vae, sampling, batch
    cfg = var.config
    self.patch_nums = cfg.patch_nums
    s = len(self.patch_nums)
    self.plan = ScalePlan.plain(s, batch, sampling.cfg)
    self.sizes = sampler_lib.planned_buffer_sizes(self.plan, self.patch_nums, cfg.depth)
    self.held = sampler_lib.planned_held_lengths(self.plan, self.patch_nums, cfg.depth)
    self.gd, self.st = nnx.split(var)
    self.vgd, self.vst = nnx.split(vae)
    self.fns = {"prologue": jax.jit(self._prologue), "decode": jax.jit(self._decode)}
    for si in range(s):
      self.fns[("transformer", si)] = jax.jit(lambda st, x, md, ms, si=si: self._transformer(si, st, x, md, ms),
                                              donate_argnums=(3,))
      self.fns[("sample", si)] = jax.jit(lambda st, vst, h, c, k, g, si=si: self._sample(si, st, vst, h, c, k, g))
      self.fns[("next_input", si)] = jax.jit(lambda st, vst, f, e, si=si: self._next_input(si, st, vst, f, e))

  def _prologue(self, st, labels):
    model = nnx.merge(self.gd, st)
    cond = model.condition(jnp.concatenate([labels, jnp.full_like(labels, model.config.num_classes)]))
    return cond, model.layer_modulations(model.block_condition(cond)), model.first_tokens(cond)

  def _transformer(self, si, st, x, mods, mstate):
    model = nnx.merge(self.gd, st)
    pn = self.patch_nums[si]
    spec = sampler_lib.ScaleForward(n=pn * pn, side=pn, emit=si < len(self.patch_nums) - 1, sizes=self.sizes[si])
    return sampler_lib.forward_scale(model, x, mods, mstate, spec, hooks=sampler_lib.SamplerHooks(),
                                     kv_options=self.plan.kv, kv_dtype=model.config.compute_dtype)

  def _sample(self, si, st, vst, h, cond, base_keys, guidance):
    model, vae = nnx.merge(self.gd, st), nnx.merge(self.vgd, vst)
    s, b, pn = len(self.patch_nums), self.b, self.patch_nums[si]
    ratio = si / (s - 1)
    logits = model.logits(h, cond)
    t = guidance * ratio
    logits = (1 + t) * logits[:b] - t * logits[b:]
    keys = jax.vmap(lambda k: jax.random.fold_in(k, si))(base_keys)
    idx, h_emb = sampler_lib.sample_tokens(logits, keys, self.sampling, ratio, vae.quantize.codebook(),
                                           self.plan[si].temperature)
    return idx, h_emb.reshape(b, pn, pn, -1)

  def _next_input(self, si, st, vst, f_hat, h_emb):
    model, vae = nnx.merge(self.gd, st), nnx.merge(self.vgd, vst)
    f_hat, nxt = vae.next_autoregressive_input(si, f_hat, h_emb)
    if si == len(self.patch_nums) - 1:
      return f_hat, None
    x = model.embed_scale(nxt.reshape(self.b, -1, nxt.shape[-1]), model.config.begin_ends[si + 1][0])
    return f_hat, jnp.concatenate([x, x])

  def _decode(self, vst, f_hat):
    return (nnx.merge(self.vgd, vst).fhat_to_img(f_hat) + 1) / 2

  def run(self, labels, seeds, times: dict | None = None):
    """One staged sample; `times` (if given) receives the seconds of every stage call."""
    def call(name, *args):
      t0 = time.perf_counter()
      out = jax.block_until_ready(self.fns[name](*args))
      if times is not None:
        times[name] = time.perf_counter() - t0
      return out

    labels = jnp.asarray(labels, jnp.int32)
    base_keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    guidance = jnp.float32(self.sampling.cfg)
    cond, mods, x = call("prologue", self.st, labels)
    mstate = sampler_lib.ModelState()
    f_hat = jnp.zeros((self.b, self.patch_nums[-1], self.patch_nums[-1], self.var.config.z_channels), jnp.float32)
    tokens = []
    for si in range(len(self.patch_nums)):
      h, mstate = call(("transformer", si), self.st, x, mods, mstate)
      idx, h_emb = call(("sample", si), self.st, self.vst, h, cond, base_keys, guidance)
      tokens.append(idx)
      f_hat, x = call(("next_input", si), self.st, self.vst, f_hat, h_emb)
    images = call("decode", self.vst, f_hat)
    return jnp.concatenate(tokens, axis=1), images

  def flops(self, labels, seeds) -> dict:
    """FLOPs per stage: analytic for the transformer, XLA cost analysis for the rest."""
    out = {}
    labels = jnp.asarray(labels, jnp.int32)
    base_keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    cond, _, _ = self.fns["prologue"](self.st, labels)
    cvae = self.var.config.z_channels
    p = self.patch_nums[-1]
    f_hat = jnp.zeros((self.b, p, p, cvae), jnp.float32)
    for si, pn in enumerate(self.patch_nums):
      out[("transformer", si)] = transformer_flops(self.var.config, 2 * self.b, pn * pn, self.held[si][0])
      h = jax.ShapeDtypeStruct((2 * self.b, pn * pn, self.var.config.width), self.var.config.compute_dtype)
      out[("sample", si)] = _xla_flops(self.fns[("sample", si)], self.st, self.vst, h, cond, base_keys,
                                       jnp.float32(1.5))
      h_emb = jax.ShapeDtypeStruct((self.b, pn, pn, cvae), jnp.float32)
      out[("next_input", si)] = _xla_flops(self.fns[("next_input", si)], self.st, self.vst, f_hat, h_emb)
    out["decode"] = _xla_flops(self.fns["decode"], self.vst, f_hat)
    out["prologue"] = _xla_flops(self.fns["prologue"], self.st, labels)
    return out


def bench_sampler(name, var, vae, sampling, batch, iters, peaks, device) -> None:
  labels = np.arange(batch) % var.config.num_classes
  seeds = np.arange(batch) + 1000
  staged = StagedSampler(var, vae, sampling, batch)
  t0 = time.perf_counter()
  staged_tokens, _ = staged.run(labels, seeds)  # compiles every stage
  compile_s = time.perf_counter() - t0
  flops = staged.flops(labels, seeds)
  runs = []
  for _ in range(iters):
    times = {}
    staged.run(labels, seeds, times)
    runs.append(times)
  best = {k: min(r[k] for r in runs) for k in runs[0]}  # best of the runs, stage by stage

  fused = sampler_lib.Sampler(var, vae, sampling)
  fused_compile = fused.compile(batch)
  fused_tokens = np.asarray(fused(labels, seeds)["tokens"])  # also the warm-up run
  fused_s = float("inf")
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fused(labels, seeds)["images"])
    fused_s = min(fused_s, time.perf_counter() - t0)

  base = {"device": device, "model": name, "batch": batch, "dtype": var.config.dtype, "cfg": sampling.cfg,
          "top_k": sampling.top_k, "top_p": sampling.top_p}

  def record(stage, seconds, fl, **extra):
    rate = fl / seconds
    return {"bench": "sample_stage", **base, "stage": stage, **extra, "s": round(seconds, 4),
            "gflop": round(fl / 1e9, 3), "gflop_per_s": round(rate / 1e9, 2),
            "of_matmul_peak": round(rate / peaks["matmul"], 3), "of_conv_peak": round(rate / peaks["conv"], 3)}

  totals: dict[str, list[float]] = {}
  for key, seconds in best.items():
    stage, si = key if isinstance(key, tuple) else (key, None)
    extra = {} if si is None else {"scale": si, "tokens": var.config.patch_nums[si] ** 2}
    print(json.dumps(record(stage, seconds, flops[key], **extra)), flush=True)
    acc = totals.setdefault(stage, [0.0, 0.0])
    acc[0] += seconds
    acc[1] += flops[key]
  for stage, (seconds, fl) in totals.items():
    print(json.dumps(record(stage, seconds, fl, scale="all")), flush=True)
  stage_sum = sum(best.values())
  all_flops = sum(flops.values())
  print(json.dumps({**record("fused", fused_s, all_flops), "compile_s": round(fused_compile, 1),
                    "staged_compile_s": round(compile_s, 1), "stage_sum_s": round(stage_sum, 3),
                    "fused_over_stage_sum": round(fused_s / stage_sum, 3),
                    "tokens_match": bool(np.array_equal(fused_tokens, np.asarray(staged_tokens)))}), flush=True)


def bench_train(name, batch, iters, peaks, device, quick: bool) -> None:
  """The VAR train step of var/train_lib.py split into tokenise, forward + backward and optimizer."""
  import optax

  from benchmarks import bench_train as bt
  from var import sharding as shd
  from var import train_lib
  from var.model import cross_entropy_loss

  tok_config = VQVAEConfig.preset("t1" if quick else "vqvae_256")
  config = bt.bench_config("tiny" if quick else name, batch, "float32", resolution=tok_config.image_size)
  mesh = shd.make_mesh((-1, 1, 1))
  setup = train_lib.make_setup(config, mesh, tok_config=tok_config)
  res = tok_config.image_size
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (batch, res, res, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, config.model.num_classes, (batch,)), jnp.int32)
  graphdef, state = setup.graphdef, setup.state

  def tokenize(state, images):
    return train_lib.var_tokenize(nnx.merge(graphdef, state).tokenizer, images)

  def fwd_bwd(state, labels, gt, x):
    trainer = nnx.merge(graphdef, state)
    mcfg = trainer.model.config
    weights = train_lib.var_loss_weights(mcfg.patch_nums, np.int32(-1), np.float32(1.0))

    def loss_fn(model):
      logits = model(labels, x, cond_drop_rate=config.loss.cond_drop_rate, rng=jax.random.key(0),
                     deterministic=mcfg.drop_path_rate == 0)
      return cross_entropy_loss(logits, gt, config.loss.label_smoothing, weights[None])

    return nnx.value_and_grad(loss_fn)(trainer.model)

  def optimizer(state, grads):
    trainer = nnx.merge(graphdef, state)
    trainer.opt.update(trainer.model, grads)
    return nnx.state(trainer), optax.tree.norm(grads)

  with jax.set_mesh(mesh):
    tok_j, fb_j, opt_j = jax.jit(tokenize), jax.jit(fwd_bwd), jax.jit(optimizer)
    gt, x = tok_j(state, images)
    (_, grads) = fb_j(state, labels, gt, x)
    gbatch = shd.shard_batch({"image": np.asarray(images), "label": np.asarray(labels)}, mesh)
    prog = (np.int32(-1), np.float32(1.0))
    step = setup.train_step.lower(state, gbatch, *prog).compile()
    mcfg = nnx.merge(graphdef, state).model.config
    t_tok = _best(tok_j, (state, images), iters)
    t_fb = _best(fb_j, (state, labels, gt, x), iters)
    t_opt = _best(opt_j, (state, grads), iters)
    t_step = float("inf")
    for _ in range(iters + 1):  # the step donates its state: thread it through (the first run warms up)
      t0 = time.perf_counter()
      state, metrics = step(state, gbatch, *prog)
      jax.block_until_ready(metrics)
      t_step = min(t_step, time.perf_counter() - t0)
    # the teacher-forced forward attends densely over all L tokens (block-causal by a mask), then the head
    fwd = transformer_flops(mcfg, batch, mcfg.seq_len, 0) + 2.0 * batch * mcfg.seq_len * mcfg.width * mcfg.vocab_size
    flops = {"tokenize": _xla_flops(tok_j, state, images), "forward_backward": 3 * fwd,
             "optimizer": _xla_flops(opt_j, state, grads)}
  seconds = {"tokenize": t_tok, "forward_backward": t_fb, "optimizer": t_opt}
  flops["step"] = sum(flops.values())
  seconds["step"] = t_step
  for stage in ("tokenize", "forward_backward", "optimizer", "step"):
    rate = flops[stage] / seconds[stage]
    rec = {"bench": "train_stage", "device": device, "model": "tiny" if quick else name, "batch": batch,
           "resolution": res, "stage": stage, "s": round(seconds[stage], 4), "gflop": round(flops[stage] / 1e9, 2),
           "gflop_per_s": round(rate / 1e9, 2), "of_matmul_peak": round(rate / peaks["matmul"], 3),
           "of_conv_peak": round(rate / peaks["conv"], 3)}
    if stage == "step":
      rec["stage_sum_s"] = round(t_tok + t_fb + t_opt, 3)
    print(json.dumps(rec), flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="d16", help="comma-separated var.model presets (d16, d20, d24, d30)")
  p.add_argument("--batch_sizes", default="1,8")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="transformer activations")
  p.add_argument("--iters", type=int, default=2, help="timed runs (the best is reported)")
  p.add_argument("--train", default="", help="comma-separated presets whose train step is split too (e.g. d16)")
  p.add_argument("--train_batch", type=int, default=8)
  p.add_argument("--quick", action="store_true", help="smoke run: tiny VAR + fixture VQVAE, batch 2, one run")
  args = p.parse_args(argv)
  device, peaks = device_and_peaks()
  iters = 1 if args.quick else args.iters
  if args.quick:
    models, batches = {"tiny": var_model.preset("tiny")}, [2]
    vae_config = VQVAEConfig.preset("t1")
  else:
    models = {m: var_model.preset(m) for m in args.models.split(",") if m}
    batches = [int(b) for b in args.batch_sizes.split(",")]
    vae_config = VQVAEConfig()
  with nnx.use_eager_sharding(False):
    vae = VQVAE(vae_config, rngs=nnx.Rngs(1))
  sampling = QUICK_SAMPLING if args.quick else SAMPLING
  for name, cfg in models.items():
    if 4 * var_model.param_count(var_model.abstract(cfg)) > 4 * 2**30:
      var = var_model.build(cfg, seed=0)  # the one-program init peaks near 3x the parameters: 24 GB for d30
    else:
      var = jit_build(lambda cfg=cfg: var_model.VAR(cfg, rngs=nnx.Rngs(0)))
    if args.dtype != "float32":
      var = with_dtype(var, args.dtype)
    for batch in batches:
      bench_sampler(name, var, vae, sampling, batch, iters, peaks, device)
    del var
  train = ["tiny"] if args.quick else [m for m in args.train.split(",") if m]
  for name in train:
    bench_train(name, 2 if args.quick else args.train_batch, iters, peaks, device, args.quick)


if __name__ == "__main__":
  main()
