"""The technique benchmark: every inference technique (ScaleKV, FastVAR, test-time search, CoDe) against the plain
plan, on the same labels and seeds, in the same run.

  python -m benchmarks.bench_techniques [--setting speed|quality|all] [--models d16,d30] [--batch 8]
      [--plans plain,kv=10%,prune=default,kv=10%+prune=default] [--iters 1] [--eval_workdir workdir/eval_model]
      [--num_per_class 50] [--quick]

A plan is `plain` or '+'-joined options of var.plan.build: `kv=10%` (or a token count or a budget JSON),
`prune=default` or `prune=8:0.5;9:0.75`, `layers=A:B`, `cache=SI`, `kvdtype=bfloat16`, `scorer=reference`,
`pooling=max`.

JSON lines:
* "technique_speed" (random-weight official configs at 256px, cfg 1.5, top-k 900, top-p 0.96, decode included):
  per (model, plan): images/s (compile excluded; best of --iters), compile seconds, the compiled executable's
  memory analysis (argument / output / temp bytes and their sum), the KV-cache bytes held after every scale and
  their ratio to the plain plan's at the scale with the longest prefix (the one the last scale re-reads), the
  transformer seconds of every scale the plan prunes or skips (that scale's forward alone, jitted, on the plan's
  cache lengths) against the plain forward of the same scale, and quality against the plain plan on the same
  seeds: token agreement per scale and the images' PSNR.
* "technique_quality" (the digits evaluation model, var/eval/eval_model.py, trained once into --eval_workdir):
  per plan the digits judge's class accuracy and Frechet distance, the 8x8-grid Frechet distance, token
  agreement and PSNR against the plain plan.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.bench_sample import jit_build, matmul_peak
from tokenizer import VQVAE, VQVAEConfig
from var import model as var_model
from var import plan as plan_lib
from var import sampler as sampler_lib

SPEED_SAMPLING = sampler_lib.SamplingConfig(cfg=1.5, top_k=900, top_p=0.96)


def parse_plan(name: str, config, batch: int, cfg: float) -> tuple[plan_lib.ScalePlan, str | None]:
  """A benchmark plan name -> (ScalePlan, kv_dtype)."""
  if name == "plain":
    return plan_lib.build(config, batch, cfg=cfg), None
  kw, kv_kw, kv_dtype = {}, {}, None
  for part in name.split("+"):
    key, _, value = part.partition("=")
    if key == "kv":
      kw["kv_budget"] = value
    elif key == "prune":
      kw["prune"] = value if value == "default" else value.replace(";", ",")
    elif key == "layers":
      kw["prune_layers"] = value
    elif key == "cache":
      kw["prune_cache_scale"] = int(value)
    elif key == "kvdtype":
      kv_dtype = value
    elif key in ("scorer", "pooling"):
      kv_kw[key] = value
    else:
      raise ValueError(f"plan option {part!r} in {name!r}: use kv=, prune=, layers=, cache=, kvdtype=, scorer=, "
                       "pooling=")
  return plan_lib.build(config, batch, cfg=cfg, kv_options=plan_lib.KVOptions(**kv_kw), **kw), kv_dtype


def memory_stats(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
  out["peak_bytes"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def token_agreement(tokens, ref, patch_nums) -> list[float | None]:
  """Fraction of equal tokens per scale (None where the plan skipped the scale)."""
  out, cur = [], 0
  tokens, ref = np.asarray(tokens), np.asarray(ref)
  for p in patch_nums:
    t, r = tokens[:, cur:cur + p * p], ref[:, cur:cur + p * p]
    out.append(None if (t < 0).all() else round(float((t == r).mean()), 4))
    cur += p * p
  return out


def psnr(images, ref) -> float:
  mse = float(np.mean((np.asarray(images, np.float64) - np.asarray(ref, np.float64)) ** 2))
  return float("inf") if mse == 0 else round(10 * np.log10(1.0 / mse), 3)


def scale_seconds(var, plan: plan_lib.ScalePlan, si: int, rows: int, kv_dtype, iters: int = 3) -> float:
  """Seconds of scale si's transformer pass alone (jitted `forward_scale` on random inputs shaped like the plan's
  cache at that scale; without logits, sampling or decode)."""
  cfg = var.config
  step = plan[si]
  if step.skip:
    return 0.0
  held = sampler_lib.planned_held_lengths(plan, cfg.patch_nums, cfg.depth)[si]
  dtype = jnp.dtype(kv_dtype) if kv_dtype else cfg.compute_dtype
  key = jax.random.key(si)
  runs = []
  for start, stop in sampler_lib._runs(held):
    shape = (stop - start, rows, cfg.num_heads, cfg.head_dim, held[start])  # the cache's order (CacheRun)
    runs.append(sampler_lib.CacheRun(jax.random.normal(key, shape, dtype), jax.random.normal(key, shape, dtype),
                                     start, stop, tuple(held[start:stop])))
  restore = None
  if step.prune is not None:
    n_src = cfg.patch_nums[step.prune.cache_scale] ** 2
    shape = (step.prune.last - step.prune.first, rows, n_src, cfg.width)
    restore = {"attn": jax.random.normal(key, shape) * 0.1, "ffn": jax.random.normal(key, shape) * 0.1}
  state = sampler_lib.ModelState(runs=tuple(runs) if any(held) else None, restore=restore)
  pn = cfg.patch_nums[si]
  nxt = plan[si + 1] if si + 1 < len(plan) else None
  spec = sampler_lib.ScaleForward(n=pn * pn, side=pn, prune=step.prune, capacity=step.kv_capacity,
                                  emit=nxt is not None and not nxt.skip,
                                  sizes=sampler_lib.planned_buffer_sizes(plan, cfg.patch_nums, cfg.depth)[si])
  graphdef, params = nnx.split(var)

  def run(params, x, cond, state):
    model = nnx.merge(graphdef, params)
    h, new = sampler_lib.forward_scale(model, x, model.layer_modulations(model.block_condition(cond)), state, spec,
                                       hooks=sampler_lib.SamplerHooks(), kv_options=plan.kv, kv_dtype=dtype)
    return h, new

  fn = jax.jit(run).lower(params, jnp.zeros((rows, pn * pn, cfg.width)), jnp.zeros((rows, cfg.width)),
                          state).compile()
  x = jax.random.normal(key, (rows, pn * pn, cfg.width))
  cond = jax.random.normal(key, (rows, cfg.width))
  jax.block_until_ready(fn(params, x, cond, state))
  best = float("inf")
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, x, cond, state))
    best = min(best, time.perf_counter() - t0)
  return best


def run_plan(var, vae, plan, kv_dtype, sampling, labels, seeds, iters: int) -> dict:
  """Compiles the plan's sampler (iters = 0: only that) and times `iters` runs after a first one."""
  s = sampler_lib.Sampler(var, vae, sampling, plan=plan, kv_dtype=kv_dtype)
  b = labels.shape[0]
  t0 = time.perf_counter()
  s.compile(b)
  compile_s = time.perf_counter() - t0
  compiled = s._compiled[(b, False)]
  if iters == 0:
    return dict(out=None, seconds=None, compile_s=compile_s, memory=memory_stats(compiled),
                kv_bytes=s.kv_bytes_per_scale(b))
  out = jax.block_until_ready(s(labels, seeds))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(s(labels, seeds))
    times.append(time.perf_counter() - t0)
  return dict(out=jax.device_get(out), seconds=min(times), compile_s=compile_s, memory=memory_stats(compiled),
              kv_bytes=s.kv_bytes_per_scale(b))


def speed_setting(args, device: str) -> None:
  peak = matmul_peak()
  print(json.dumps({"bench": "matmul_peak", "device": device, "gflop_per_s": round(peak / 1e9, 2)}), flush=True)
  with nnx.use_eager_sharding(False):
    vae = VQVAE(VQVAEConfig(), rngs=nnx.Rngs(1))
  compile_only = set(filter(None, args.compile_only_models.split(",")))
  for name in args.models.split(","):
    cfg = var_model.preset(name)
    iters = 0 if name in compile_only else args.iters
    var = jit_build(lambda cfg=cfg: var_model.VAR(cfg, rngs=nnx.Rngs(0)))  # random weights
    labels = (np.arange(args.batch) * 97) % cfg.num_classes
    seeds = np.arange(args.batch) + 100
    base, base_scales = None, {}
    for plan_name in args.plans.split(","):
      plan, kv_dtype = parse_plan(plan_name, cfg, args.batch, SPEED_SAMPLING.cfg)
      r = run_plan(var, vae, plan, kv_dtype, SPEED_SAMPLING, labels, seeds, iters)
      rec = {"bench": "technique_speed", "device": device, "model": name, "batch": args.batch, "plan": plan_name,
             "compile_s": round(r["compile_s"], 2), **r["memory"], "kv_bytes_per_scale": r["kv_bytes"]}
      if iters:
        rec.update(images_per_s=round(args.batch / r["seconds"], 4), s_per_batch=round(r["seconds"], 3))
      longest = len(cfg.patch_nums) - 2  # the cache the last scale re-reads
      if base is None:
        base = r
      else:
        rec["kv_bytes_vs_plain_longest_prefix"] = round(r["kv_bytes"][longest] / base["kv_bytes"][longest], 4)
        if "peak_bytes" in base["memory"]:
          rec["peak_bytes_vs_plain"] = round(r["memory"]["peak_bytes"] / base["memory"]["peak_bytes"], 4)
        if iters:
          rec["images_per_s_vs_plain"] = round(base["seconds"] / r["seconds"], 3)
          rec["token_agreement"] = token_agreement(r["out"]["tokens"], base["out"]["tokens"], cfg.patch_nums)
          rec["psnr_vs_plain"] = psnr(r["out"]["images"], base["out"]["images"])
      rows = 2 * args.batch
      pruned = [si for si, st in enumerate(plan.steps) if st.prune is not None or st.skip]
      if pruned and iters:
        plain_plan = plan_lib.build(cfg, args.batch, cfg=SPEED_SAMPLING.cfg)
        times = {}
        for si in pruned:
          if si not in base_scales:
            base_scales[si] = scale_seconds(var, plain_plan, si, rows, None)
          times[si] = (base_scales[si], scale_seconds(var, plan, si, rows, kv_dtype))
        rec["pruned_scale_seconds"] = {str(si): [round(a, 4), round(b, 4)] for si, (a, b) in times.items()}
        total_plain, total = sum(a for a, _ in times.values()), sum(b for _, b in times.values())
        rec["pruned_scales_transformer_speedup"] = round(total_plain / total, 3) if total else float("inf")
      print(json.dumps(rec), flush=True)
    del var


def quality_setting(args, device: str) -> None:
  from var.eval import digits_quality, eval_model
  from var.pretrained import load_pretrained

  t0 = time.perf_counter()
  model_dir = eval_model.ensure_eval_model(args.eval_workdir)
  var, var_cfg, vae, _ = load_pretrained(model_dir)
  print(json.dumps({"bench": "eval_model", "device": device, "model_dir": str(model_dir),
                    "patch_nums": list(var_cfg.patch_nums), "depth": var_cfg.depth,
                    "seconds": round(time.perf_counter() - t0, 1),
                    "tokenizer": digits_quality.tokenizer_report(vae)}), flush=True)
  judge = digits_quality.default_judge()
  labels = np.repeat(np.arange(var_cfg.num_classes), args.num_per_class)
  seeds = np.arange(labels.shape[0])
  for cfg in (float(c) for c in args.quality_cfgs.split(",")):
    sampling = sampler_lib.SamplingConfig(cfg=cfg)
    base = None
    for plan_name in args.quality_plans.split(","):
      plan, kv_dtype = parse_plan(plan_name, var_cfg, labels.shape[0], cfg)
      r = run_plan(var, vae, plan, kv_dtype, sampling, labels, seeds, iters=1)
      images = np.asarray(r["out"]["images"])
      rep = judge.report(images, labels, value_range="[0,1]")
      rec = {"bench": "technique_quality", "device": device, "plan": plan_name, "cfg": cfg,
             "samples": int(labels.shape[0]), "images_per_s": round(labels.shape[0] / r["seconds"], 3),
             "accuracy": round(rep["accuracy"], 4), "fd_grid": round(rep["fd"], 2),
             "fd_grid_real_same_n": round(rep["fd_real_same_n"], 2), "fd_features": round(rep["fd_features"], 3),
             "kv_bytes_per_scale": r["kv_bytes"], **r["memory"]}
      if base is None:
        base = r
      else:
        rec["token_agreement"] = token_agreement(r["out"]["tokens"], base["out"]["tokens"], var_cfg.patch_nums)
        rec["psnr_vs_plain"] = psnr(images, base["out"]["images"])
        rec["images_per_s_vs_plain"] = round(base["seconds"] / r["seconds"], 3)
      print(json.dumps(rec), flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--setting", default="all", choices=["speed", "quality", "all"])
  p.add_argument("--models", default="d16")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--plans", default="plain,kv=10%,prune=default,kv=10%+prune=default")
  p.add_argument("--iters", type=int, default=1)
  p.add_argument("--compile_only_models", default="", help="models only compiled (memory analysis, KV bytes), not "
                 "timed, e.g. d30 on a small machine")
  p.add_argument("--eval_workdir", default="workdir/eval_model")
  p.add_argument("--num_per_class", type=int, default=50)
  p.add_argument("--quality_plans", default="plain,kv=10%,prune=default,kv=10%+prune=default",
                 help="plans of the quality setting (scale indices of the evaluation model's schedule)")
  p.add_argument("--quality_cfgs", default="1.5", help="guidance scales of the quality setting")
  p.add_argument("--quick", action="store_true", help="a smoke run: batch 2, 10 samples per class")
  args = p.parse_args(argv)
  if args.quick:
    args.batch, args.num_per_class = 2, 10
  device = f"{jax.devices()[0].platform}:{jax.device_count()}x {jax.devices()[0].device_kind}"
  if args.setting in ("speed", "all"):
    speed_setting(args, device)
  if args.setting in ("quality", "all"):
    quality_setting(args, device)


if __name__ == "__main__":
  main()
