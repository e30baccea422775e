"""CoDe (var/code.py) sampling throughput and memory against the drafter alone (random weights, 256px schedule).

  python -m benchmarks.bench_code [--drafter auto|d30|d24] [--refiner d16] [--draft_steps 8] \
      [--batch_sizes 16,64] [--dtype bfloat16] [--iters 2] [--warmup 1] [--memory_gb 24] [--quick]

Both samplers are var.sampler.Sampler AOT-compiled once per batch with CoDe's FID preset (cfg 1.5, top-k 600,
top-p 0.96, CoDe's per-scale temperatures); the drafter alone runs the same options on every scale. VQVAE decode
included. Prints JSON lines:
* "pair": the models, their parameter counts and KV-cache bytes per sample (cond + uncond rows, full sequence);
  `--drafter auto` takes d30 when d30 + d16 (parameters + KV caches at the largest batch + decode) fit in
  --memory_gb, else d24, and says which and why;
* "sample": per (batch, plan) compile seconds, images/s, the compiled temp bytes (XLA memory analysis: KV caches
  and activations), and CoDe's images/s ratio over the drafter alone measured in the same run.
Digits quality (`--digits`): a large and a small VAR trained on the embedded UCI digits with the same tokenizer
(the 7-scale evaluation tokenizer of var/eval/eval_model.py; configs/digits_eval_var.py documents both models,
configs/digits_code.py the fine-tuned pair), judged as var/eval/eval_model.py `sample_report` does
(var/eval/digits_quality.py `default_judge`: class accuracy of the generated digits, the 8x8-grid Frechet distance
to the real held-out digits beside the real-vs-real figure at the same N, and the Frechet distance in the judge's
features) for: the large model alone, the small one alone, training-free CoDe at every N in --draft_steps_list
(default 2..S-1), and the fine-tuned pair (--drafter_ft / --refiner_ft) at --ft_draft_steps (with the
training-free pair at that N; --ft_only: the fine-tuned pair alone), at every cfg in --cfgs. Sample i of every
setting uses seed --seed + i (class-major, --num_per_class per digit), drawn in calls of --digits_batch. Each line
also gives the token positions each model forwards per image row, `relative_cost` (parameter-weighted token
forwards over the large model alone's: the linear layers' work, attention left out), and the compile and sampling
seconds:

  python -m benchmarks.bench_code --digits --large workdir/var_d8/model --small workdir/eval_model/var/model \
      [--cfgs 1.5,0] [--num_per_class 50] \
      [--drafter_ft workdir/code_drafter/model --refiner_ft workdir/code_refiner/model --ft_draft_steps 5 [--ft_only]]

--quick: a smoke run on tiny random models (depth 4 / width 128 drafter, depth 2 / width 64 refiner, 64-token
vocabulary, the small fixture VQVAE at 64px on the 10-scale schedule), batches 2 and 4, one timed run: it checks
the benchmark runs, its numbers are not CoDe's figures.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
from flax import nnx

from tokenizer import VQVAE, VQVAEConfig
from var import code
from var import model as var_model
from var import sampler as sampler_lib


def kv_bytes_per_sample(config: var_model.VARConfig) -> int:
  """Keys + values of every layer over the full sequence, cond and uncond rows, in the activation dtype."""
  return 2 * 2 * config.depth * config.seq_len * config.width * np.dtype(config.dtype).itemsize


def _param_bytes(config: var_model.VARConfig) -> int:
  return 4 * var_model.param_count(var_model.abstract(config))  # float32 parameters


def choose_drafter(refiner: var_model.VARConfig, batch: int, memory_gb: float, dtype: str) -> tuple[str, str]:
  """d30 if d30 + the refiner fit in memory_gb (parameters, both KV caches at `batch`, 2 GB for the VQVAE
  decode and activations), else d24; returns (preset, reason)."""
  d30 = var_model.preset("d30", dtype=dtype)
  need = _param_bytes(d30) + _param_bytes(refiner) + batch * (kv_bytes_per_sample(d30) + kv_bytes_per_sample(
      refiner)) + 2 * 2**30
  if need <= memory_gb * 2**30:
    return "d30", f"d30 + {refiner.depth}-layer refiner need ~{need / 2**30:.1f} GB <= {memory_gb} GB"
  return "d24", f"d30 + refiner would need ~{need / 2**30:.1f} GB at batch {batch} > {memory_gb} GB"


def _time(sampler, batch: int, iters: int, warmup: int = 1) -> float:
  """Best of `iters` timed calls after `warmup` untimed ones (the sampler is AOT-compiled already, so a warm-up
  only pre-touches its buffers: worth it for seconds-long calls, noise for the ten-minute ones at d24 batch 64)."""
  labels, seeds = np.arange(batch) % sampler.config.num_classes, np.arange(batch)
  for _ in range(warmup):
    jax.block_until_ready(sampler(labels, seeds)["images"])
  best = float("inf")
  for i in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(sampler(labels, seeds + i + 1)["images"])
    best = min(best, time.perf_counter() - t0)
  return best


def token_forwards(patch_nums, draft_steps: int) -> dict:
  """Token positions each model forwards per image row under a CoDe plan (cond and uncond rows alike): the
  drafter the tokens of scales 0..N-1; the refiner all L tokens (its hand-over prefill covers scales 0..N, then
  the later scales) unless N = S."""
  total = sum(p * p for p in patch_nums)
  drafted = sum(p * p for p in patch_nums[:draft_steps])
  return {"drafter": drafted, "refiner": total if draft_steps < len(patch_nums) else 0}


def digits_quality(args) -> None:
  """The digits quality table (module docstring): one JSON line per (cfg, setting)."""
  from var.eval.digits_quality import default_judge

  models, vae, vae_config = code.load_pair(args.large, args.small)
  patch_nums = tuple(vae_config.patch_nums)
  s = len(patch_nums)
  ns = (list(range(2, s)) if not args.draft_steps_list
        else [int(n) for n in args.draft_steps_list.split(",") if n])
  labels = np.repeat(np.arange(10), args.num_per_class).astype(np.int32)
  seeds = (args.seed + np.arange(labels.size)).astype(np.uint32)  # sample i: seed + i, whatever the chunking
  batch = min(args.digits_batch, labels.size)
  pad = -labels.size % batch
  labels_p, seeds_p = np.pad(labels, (0, pad)), np.pad(seeds, (0, pad))  # padding samples are dropped
  judge = default_judge(vae_config.image_size, crop_scale=args.crop_scale)  # eval_model.sample_report's judge
  params = {k: var_model.param_count(m) for k, m in models.items()}

  def run(name, drafter, refiner, n, cfg):
    sampling = sampler_lib.SamplingConfig(cfg=cfg, top_k=args.top_k, top_p=args.top_p)
    sampler = code.code_sampler(drafter, refiner, vae, draft_steps=n, batch=batch, sampling=sampling,
                                temperatures=None)
    compile_s = sampler.compile(batch)
    t0 = time.perf_counter()
    chunks = [np.asarray(sampler(labels_p[i:i + batch], seeds_p[i:i + batch])["images"])
              for i in range(0, labels_p.size, batch)]
    sample_s = time.perf_counter() - t0
    images = np.concatenate(chunks)[:labels.size]
    rep = judge.report(images, labels, value_range="[0,1]")
    tok = token_forwards(patch_nums, n)
    # parameter-weighted token forwards (the linear layers' cost, attention left out) relative to the large alone
    cost = (params["drafter"] * tok["drafter"] + params["refiner"] * tok["refiner"]) / (
        params["drafter"] * sum(p * p for p in patch_nums))
    print(json.dumps({"bench": "code", "kind": "digits", "setting": name, "draft_steps": n, "cfg": cfg,
                      "accuracy": rep["accuracy"], "fd": rep["fd"], "fd_real_same_n": rep["fd_real_same_n"],
                      "fd_features": rep["fd_features"], "judge_test_accuracy": rep["judge_test_accuracy"],
                      "num_images": int(labels.size), "token_forwards": tok, "relative_cost": round(cost, 3),
                      "compile_s": round(compile_s, 1), "sample_s": round(sample_s, 1)}), flush=True)

  d, r = models["drafter"], models["refiner"]
  print(json.dumps({"bench": "code", "kind": "digits_pair", "large": args.large, "small": args.small,
                    "params": params, "patch_nums": patch_nums, "crop_scale": args.crop_scale,
                    "top_k": args.top_k, "top_p": args.top_p, "seeds": [args.seed, args.seed + int(labels.size)]}),
        flush=True)
  ft = None
  if args.drafter_ft:
    ft, _, _ = code.load_pair(args.drafter_ft, args.refiner_ft)
    code.check_shared_tokenizer(args.drafter_ft, args.large, names=("fine-tuned drafter", "large model"))
  for cfg in [float(c) for c in args.cfgs.split(",") if c]:
    if not args.ft_only:
      run("large alone", d, r, s, cfg)
      run("small alone", d, r, 0, cfg)
      for n in ns:
        run("CoDe training-free", d, r, n, cfg)
    if ft is not None:
      run("CoDe fine-tuned", ft["drafter"], ft["refiner"], args.ft_draft_steps, cfg)
      if not args.ft_only and args.ft_draft_steps not in ns:  # the training-free pair at the same N, to compare
        run("CoDe training-free", d, r, args.ft_draft_steps, cfg)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--drafter", default="auto", choices=["auto", "d30", "d24", "d20"])
  p.add_argument("--refiner", default="d16", choices=["d16", "d20"])
  p.add_argument("--draft_steps", type=int, default=8)
  p.add_argument("--batch_sizes", default="16,64")
  p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
  p.add_argument("--iters", type=int, default=2)
  p.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones, per (batch, plan)")
  p.add_argument("--memory_gb", type=float, default=24.0)
  p.add_argument("--quick", action="store_true", help="tiny models (a smoke run, not for reporting)")
  p.add_argument("--digits", action="store_true", help="the digits quality table instead of the speed benchmark")
  p.add_argument("--large", help="--digits: model directory of the large VAR (the drafter)")
  p.add_argument("--small", help="--digits: model directory of the small VAR (the refiner)")
  p.add_argument("--drafter_ft", help="--digits: the fine-tuned drafter's model directory (code_drafter)")
  p.add_argument("--refiner_ft", help="--digits: the fine-tuned refiner's model directory (code_refiner)")
  p.add_argument("--ft_draft_steps", type=int, default=2, help="--digits: N the fine-tuned pair was trained for")
  p.add_argument("--draft_steps_list", default="", help="--digits: comma-separated N (default 2..S-1)")
  p.add_argument("--num_per_class", type=int, default=20)
  p.add_argument("--cfgs", default="1.5", help="--digits: comma-separated guidance scales (e.g. 1.5,0)")
  p.add_argument("--digits_batch", type=int, default=100, help="--digits: images per sampler call")
  p.add_argument("--ft_only", action="store_true",
                 help="--digits: only the fine-tuned pair (a full run's rows at the same seeds give the rest)")
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--top_p", type=float, default=0.0)
  p.add_argument("--crop_scale", type=float, default=1.0,
                 help="--digits: the generators' input crop_scale (configs/digits_var.py: 1.0)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.digits:
    if not (args.large and args.small) or bool(args.drafter_ft) != bool(args.refiner_ft):
      p.error("--digits needs --large and --small, and --drafter_ft with --refiner_ft")
    if args.ft_only and not args.drafter_ft:
      p.error("--ft_only needs --drafter_ft and --refiner_ft")
    return digits_quality(args)
  batches = [int(b) for b in args.batch_sizes.split(",") if b]

  if args.quick:
    batches, iters = [2, 4], 1
    base = dict(vocab_size=64, z_channels=8, num_classes=10, dtype=args.dtype)
    drafter_cfg = var_model.VARConfig(depth=4, width=128, num_heads=2, **base)
    refiner_cfg = var_model.VARConfig(depth=2, width=64, num_heads=2, **base)
    vae_cfg = VQVAEConfig.preset("t1", patch_nums=var_model.PATCH_NUMS_256)
    names, reason = ("tiny-d4w128", "tiny-d2w64"), "quick smoke run"
  else:
    iters = args.iters
    refiner_cfg = var_model.preset(args.refiner, dtype=args.dtype)
    name, reason = (choose_drafter(refiner_cfg, max(batches), args.memory_gb, args.dtype) if args.drafter == "auto"
                    else (args.drafter, "chosen with --drafter"))
    drafter_cfg = var_model.preset(name, dtype=args.dtype)
    vae_cfg = VQVAEConfig.preset("vqvae_256")
    names = (name, args.refiner)

  drafter, refiner = var_model.build(drafter_cfg, seed=1), var_model.build(refiner_cfg, seed=2)
  with nnx.use_eager_sharding(False):
    vae = VQVAE(vae_cfg, rngs=nnx.Rngs(0))
  print(json.dumps({"bench": "code", "kind": "pair", "quick": args.quick, "drafter": names[0], "refiner": names[1],
                    "why": reason, "draft_steps": args.draft_steps, "dtype": args.dtype,
                    "params": [var_model.param_count(drafter), var_model.param_count(refiner)],
                    "kv_bytes_per_sample": [kv_bytes_per_sample(drafter_cfg), kv_bytes_per_sample(refiner_cfg)]}),
        flush=True)

  sampling = code.PRESETS["fid"]
  if sampling.top_k > drafter_cfg.vocab_size:  # the tiny vocabulary of --quick
    sampling = sampler_lib.SamplingConfig(cfg=1.5, top_k=drafter_cfg.vocab_size // 2, top_p=0.96)
  temps = code.code_temperatures(len(drafter_cfg.patch_nums))
  for batch in batches:
    rates = {}
    for plan_name, n in (("drafter", len(drafter_cfg.patch_nums)), ("code", args.draft_steps)):
      s = code.code_sampler(drafter, refiner, vae, draft_steps=n, batch=batch, sampling=sampling, temperatures=temps)
      compile_s = s.compile(batch)
      temp_bytes = s._compiled[(batch, False)].memory_analysis().temp_size_in_bytes
      sec = _time(s, batch, iters, args.warmup)
      rates[plan_name] = batch / sec
      kv = batch * (kv_bytes_per_sample(drafter_cfg) if n > 0 else 0) + batch * (
          kv_bytes_per_sample(refiner_cfg) if n < len(drafter_cfg.patch_nums) else 0)
      rec = {"bench": "code", "kind": "sample", "quick": args.quick, "plan": plan_name, "draft_steps": n,
             "batch": batch, "compile_s": round(compile_s, 2), "s_per_batch": round(sec, 3),
             "images_per_s": round(batch / sec, 4), "kv_cache_bytes_allocated": kv, "temp_bytes": temp_bytes}
      if plan_name == "code":
        rec["speedup_vs_drafter"] = round(rates["code"] / rates["drafter"], 3)
      print(json.dumps(rec), flush=True)


if __name__ == "__main__":
  main()
