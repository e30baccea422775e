"""FID Inception-v3 feature throughput (images/s): uint8 256x256 batches -> ADM preprocessing -> pool3/sFID/logits.

  python -m benchmarks.bench_inception [--batch_sizes 50,200] [--dtypes float32,bfloat16] [--iters 3]
      [--inception_weights PATH]

Exactly the jitted, data-parallel path of `python -m var.eval.fid` (var.eval.fid._features over a 1-D mesh of all
devices). Weights are random unless --inception_weights is given (throughput does not depend on their values).
Prints one JSON line per (batch, dtype) and a final line with the bf16/fp32 ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from var.eval import fid
from var.eval import inception as inception_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(weights: str | None, dtype) -> inception_lib.InceptionV3FID:
  if weights:
    return inception_lib.load_inception(weights, dtype)
  with nnx.use_eager_sharding(False):
    return inception_lib.InceptionV3FID(compute_dtype=dtype, rngs=nnx.Rngs(0))


def bench(model, batch: int, image_size: int, iters: int, mesh) -> dict:
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  images = np.random.default_rng(0).integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
  x = jax.device_put(images, NamedSharding(mesh, P("data")))
  t0 = time.perf_counter()
  jax.block_until_ready(fid._features(graphdef, state, x, "adm"))  # compile + first run
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fid._features(graphdef, state, x, "adm"))
    times.append(time.perf_counter() - t0)
  best = min(times)
  return {"images_per_s": round(batch / best, 2), "step_s_best": round(best, 4),
          "step_s_median": round(float(np.median(times)), 4), "first_call_s": round(compile_s, 2)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch_sizes", default="50,200")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--image_size", type=int, default=256)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--inception_weights")
  args = p.parse_args(argv)
  mesh = fid.make_mesh()
  device = f"{jax.devices()[0].device_kind} x{mesh.devices.size} ({jax.default_backend()})"
  results = {}
  for dtype_name in args.dtypes.split(","):
    model = build_model(args.inception_weights, DTYPES[dtype_name])
    for batch in (int(b) for b in args.batch_sizes.split(",")):
      batch = -(-batch // mesh.devices.size) * mesh.devices.size
      r = bench(model, batch, args.image_size, args.iters, mesh)
      results[(dtype_name, batch)] = r["images_per_s"]
      print(json.dumps({"bench": "inception_features", "device": device, "batch": batch, "dtype": dtype_name,
                        "image_size": args.image_size, "preprocess": "adm", **r}), flush=True)
  ratios = {f"bf16_over_fp32_batch{b}": round(results[("bfloat16", b)] / results[("float32", b)], 3)
            for (d, b) in results if d == "float32" and ("bfloat16", b) in results}
  if ratios:
    print(json.dumps({"bench": "inception_features_ratio", "device": device, **ratios}), flush=True)


if __name__ == "__main__":
  main()
