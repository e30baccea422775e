"""VAR sampling throughput, compile time and model FLOP utilisation (d16, 256px, random weights).

  python -m benchmarks.bench_sample [--quick] [--batch_sizes 1,8] [--dtypes float32,bfloat16] [--iters 2]

Exactly the path of `sample.py`: var.sampler.Sampler AOT-compiled once per (batch, dtype), cfg 1.5, top-k 900,
top-p 0.96, final VQVAE decode included. Prints JSON lines:
* "matmul_peak": the best 2048^3 float32 matmul rate of this machine, measured in the same run (the MFU baseline);
* "forward_compile": lower + compile seconds of the d16 teacher-forced forward (256px, batch 1, abstract params);
* "sample": per (batch, dtype) compile seconds, images/s, seconds/batch, MFU = (601 GFLOP transformer with CFG +
  394 GFLOP VQVAE decode per image) * images/s / matmul peak. The official PyTorch sampler in the same run:
  benchmarks/bench_official.py (a figure from another run is no baseline: this CPU's speed moves by up to 1.6x).
--quick: batch 1 only, one timed run.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tokenizer import VQVAE, VQVAEConfig
from var import model as var_model
from var import sampler as sampler_lib

GFLOP_PER_IMAGE = 601.0 + 394.0  # d16 transformer with CFG + VQVAE decode (256px; as upsample + conv: 349 executed)


def matmul_peak(n: int = 2048, iters: int = 5, dtype=jnp.float32) -> float:
  """Best n^3 matmul rate (FLOP/s) over a few runs, inputs in `dtype`, accumulated in float32."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  jax.block_until_ready(f(a, b))
  best = float("inf")
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def forward_compile_seconds(config: var_model.VARConfig) -> dict:
  """Lower + compile of the teacher-forced forward, batch 1, from abstract parameters (nothing allocated)."""
  graphdef, state = nnx.split(var_model.abstract(config))
  fwd = jax.jit(lambda st, labels, x: nnx.merge(graphdef, st)(labels, x))
  t0 = time.perf_counter()
  lowered = fwd.lower(state, jax.ShapeDtypeStruct((1,), jnp.int32),
                      jax.ShapeDtypeStruct((1, config.seq_len - 1, config.z_channels), jnp.float32))
  t1 = time.perf_counter()
  lowered.compile()
  t2 = time.perf_counter()
  return {"lower_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3)}


def jit_build(ctor):
  """Builds a module with its random init compiled into one XLA program (much faster than op-by-op for 300M
  parameters)."""
  def init():
    with nnx.use_eager_sharding(False):
      return nnx.split(ctor())[1]

  with nnx.use_eager_sharding(False):
    graphdef = nnx.graphdef(nnx.eval_shape(ctor))
  return nnx.merge(graphdef, jax.jit(init)())


def with_dtype(model: var_model.VAR, dtype: str) -> var_model.VAR:
  """The same parameters in a model whose activations run in `dtype`."""
  cfg = var_model.VARConfig.from_dict({**model.config.to_dict(), "dtype": dtype})
  out = var_model.abstract(cfg)
  nnx.update(out, nnx.state(model, nnx.Param))
  return out


def bench_sampler(var, vae, batch: int, iters: int) -> dict:
  sampling = sampler_lib.SamplingConfig(cfg=1.5, top_k=900, top_p=0.96)
  s = sampler_lib.Sampler(var, vae, sampling)
  compile_s = s.compile(batch)
  labels = np.arange(batch) % var.config.num_classes
  jax.block_until_ready(s(labels, np.arange(batch))["images"])  # first run (allocations, caches)
  times = []
  for i in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(s(labels, np.arange(batch) + 1000 * (i + 1))["images"])
    times.append(time.perf_counter() - t0)
  best = min(times)
  return {"compile_s": round(compile_s, 2), "s_per_batch": round(best, 3), "images_per_s": round(batch / best, 4),
          "s_per_batch_median": round(float(np.median(times)), 3), "trace_count": s.trace_count}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch_sizes", default="1,8")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--iters", type=int, default=2)
  p.add_argument("--quick", action="store_true", help="batch 1 only, one timed run")
  args = p.parse_args(argv)
  batches = [1] if args.quick else [int(b) for b in args.batch_sizes.split(",")]
  iters = 1 if args.quick else args.iters
  device = f"{jax.devices()[0].platform}:{jax.device_count()}x {jax.devices()[0].device_kind}"

  peak = matmul_peak()
  print(json.dumps({"bench": "matmul_peak", "device": device, "n": 2048, "gflop_per_s": round(peak / 1e9, 2)}),
        flush=True)
  cfg = var_model.preset("d16")
  print(json.dumps({"bench": "forward_compile", "device": device, "model": "d16", "batch": 1,
                    **forward_compile_seconds(cfg)}), flush=True)

  t0 = time.perf_counter()
  var32 = jit_build(lambda: var_model.VAR(cfg, rngs=nnx.Rngs(0)))  # random weights: speed does not depend on them
  with nnx.use_eager_sharding(False):  # (eager: its jitted init compiles slowly)
    vae = VQVAE(VQVAEConfig(), rngs=nnx.Rngs(1))
  print(json.dumps({"bench": "build_random_models", "device": device, "seconds": round(time.perf_counter() - t0, 1),
                    "var_params": var_model.param_count(var32)}), flush=True)
  for dtype in args.dtypes.split(","):
    var = var32 if dtype == "float32" else with_dtype(var32, dtype)
    for batch in batches:
      r = bench_sampler(var, vae, batch, iters)
      mfu = GFLOP_PER_IMAGE * 1e9 * r["images_per_s"] / peak
      rec = {"bench": "sample", "device": device, "model": "d16", "resolution": 256, "batch": batch, "dtype": dtype,
             "cfg": 1.5, "top_k": 900, "top_p": 0.96, **r, "mfu": round(mfu, 4)}
      print(json.dumps(rec), flush=True)


if __name__ == "__main__":
  main()
