"""var-jax against the official PyTorch VAR in the same run: d16 sampling (batch 8) and the d8 train step (batch 8).

  python -m benchmarks.bench_official --official_repo /path/to/VAR --official_python /path/to/torch-venv/bin/python \
      [--what sample,train] [--rounds 2] [--threads 2]

The official side runs benchmarks/official_torch.py in its own process under --official_python (an interpreter
with torch; nothing is installed or downloaded here: the checkout and the interpreter are the user's); var-jax
runs in this process. Both use random weights of the same architecture (speed does not depend on the values).
The systems take turns, one call each per round, so a load change on a shared machine hits both; the best call
of each counts. A 2048^3 float32 matmul (XLA) before and after gives this run's peak. JSON lines:

* "peak": the float32 (and bfloat16) matmul GFLOP/s of this run;
* "sample" (d16, 256px, batch 8, cfg 1.5, top-k 900, top-p 0.96, VQVAE decode included): seconds per batch of
  the official `autoregressive_infer_cfg` and var-jax's `Sampler` in float32 and bfloat16, each system's
  images/s ratio over the official in this run, and per round var-jax float32's executed FLOP rate (950 GFLOP per
  image) over the float32 matmul peak measured just before and after that call (this CPU's peak moves by up to
  1.6x within minutes, so a peak from the start of the run is not a baseline for a call minutes later);
* "train" (d8, 256px, batch 8, fp32): seconds per step of the official `VARTrainer.train_step` (tokenising every
  step) and var-jax's train step on images (tokenising every step, the default) and on token input
  (tokenise-once: var/token_data.py), and their ratios over the official step (medians: two steps a round).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# what var-jax executes per 256px d16 image with CFG: the transformer's 601 GFLOP and the decoder's 349 (the
# nearest x2 + 3x3 convs run as 2x2 phase convolutions; bench_sample's 995 counts the official decoder's 394)
EXECUTED_GFLOP_PER_IMAGE = 601.0 + 349.0
DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_torch.py")


def matmul_peaks() -> dict:
  """Best 2048^3 matmul GFLOP/s over 10 runs (about a second): float32, and bfloat16 with float32 accumulation."""
  from benchmarks.bench_sample import matmul_peak

  out = {"float32": matmul_peak(iters=10) / 1e9, "bfloat16": matmul_peak(iters=10, dtype=jnp.bfloat16) / 1e9}
  return {k: round(v, 1) for k, v in out.items()}


def official(args, what: str, depth: int, iters: int = 1, warmup: int = 0) -> dict:
  """One run of the official driver in its own process; returns its JSON line."""
  cmd = [args.official_python, DRIVER, "--repo", args.official_repo, "--what", what, "--depth", str(depth),
         "--batch", "8", "--iters", str(iters), "--warmup", str(warmup), "--threads", str(args.threads)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
  if proc.returncode != 0:
    raise RuntimeError(f"the official driver failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_sample(args, peak: dict) -> dict:
  from flax import nnx

  from benchmarks.bench_sample import GFLOP_PER_IMAGE, jit_build, with_dtype
  from tokenizer import VQVAE, VQVAEConfig
  from var import model as var_model
  from var import sampler as sampler_lib

  batch, cfg = 8, var_model.preset("d16")
  var32 = jit_build(lambda: var_model.VAR(cfg, rngs=nnx.Rngs(0)))
  with nnx.use_eager_sharding(False):
    vae = VQVAE(VQVAEConfig(), rngs=nnx.Rngs(1))
  sampling = sampler_lib.SamplingConfig(cfg=1.5, top_k=900, top_p=0.96)
  samplers = {"float32": sampler_lib.Sampler(var32, vae, sampling),
              "bfloat16": sampler_lib.Sampler(with_dtype(var32, "bfloat16"), vae, sampling)}
  labels = np.arange(batch) % 1000
  for s in samplers.values():
    s.compile(batch)
    jax.block_until_ready(s(labels, np.arange(batch))["images"])  # first call: allocations
  times = {"official": [], "float32": [], "bfloat16": []}
  of_peak = []  # var-jax float32 per round: executed GFLOP/s over the higher of the peaks just before and after
  for r in range(args.rounds):
    times["official"] += official(args, "sample", depth=16)["seconds"]
    for name, s in samplers.items():
      before = matmul_peaks()["float32"] if name == "float32" else None
      t0 = time.perf_counter()
      jax.block_until_ready(s(labels, np.arange(batch) + 1000 * (r + 1))["images"])
      times[name].append(time.perf_counter() - t0)
      if before is not None:
        around = max(before, matmul_peaks()["float32"])
        of_peak.append({"gflop_per_s": round(EXECUTED_GFLOP_PER_IMAGE * batch / times[name][-1], 1),
                        "peak_gflop_per_s": around,
                        "fraction": round(EXECUTED_GFLOP_PER_IMAGE * batch / times[name][-1] / around, 3)})
  best = {k: min(v) for k, v in times.items()}
  return {"bench": "official", "kind": "sample", "model": "d16", "batch": batch, "cfg": 1.5, "top_k": 900,
          "top_p": 0.96, "s_per_batch": {k: [round(t, 2) for t in v] for k, v in times.items()},
          "best_s": {k: round(v, 2) for k, v in best.items()},
          "speedup_vs_official": {k: round(best["official"] / best[k], 3) for k in samplers},
          "var_jax_float32_model_gflop_per_s": round(GFLOP_PER_IMAGE * batch / best["float32"], 1),
          "var_jax_float32_of_peak": of_peak, "peak_at_start": peak}


def bench_train(args) -> dict:
  from benchmarks.bench_train import StepTimer

  timer = StepTimer("d8", batch=8, tokenise_once=True)
  timer.time_images()  # first calls: allocations
  timer.time_tokens()
  times = {"official": [], "images": [], "tokens": []}
  for _ in range(args.rounds):
    times["official"] += official(args, "train", depth=8, iters=2, warmup=1)["seconds"]
    times["images"] += [timer.time_images() for _ in range(2)]
    times["tokens"] += [timer.time_tokens() for _ in range(2)]
  med = {k: float(np.median(v)) for k, v in times.items()}
  return {"bench": "official", "kind": "train", "model": "d8", "batch": 8, "resolution": 256, "dtype": "float32",
          "step_s": {k: [round(t, 2) for t in v] for k, v in times.items()},
          "median_s": {k: round(v, 2) for k, v in med.items()},
          "speedup_vs_official": {"on_the_fly": round(med["official"] / med["images"], 3),
                                  "tokenise_once": round(med["official"] / med["tokens"], 3)}}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--official_repo", required=True, help="a checkout of github.com/FoundationVision/VAR")
  p.add_argument("--official_python", required=True, help="a Python interpreter with torch installed")
  p.add_argument("--what", default="sample,train", help="comma-separated: sample, train")
  p.add_argument("--rounds", type=int, default=2, help="turns each system takes (one call, or two train steps)")
  p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (XLA uses every core)")
  args = p.parse_args(argv)
  what = [w for w in args.what.split(",") if w]
  if set(what) - {"sample", "train"}:
    p.error(f"--what {args.what!r}: choose from sample, train")
  if not os.path.isfile(os.path.join(args.official_repo, "models", "var.py")):
    p.error(f"--official_repo {args.official_repo!r} is not a checkout of the official VAR repository "
            "(no models/var.py); clone github.com/FoundationVision/VAR")
  check = subprocess.run([args.official_python, "-c", "import torch"], capture_output=True, text=True)
  if check.returncode != 0:
    p.error(f"--official_python {args.official_python!r} cannot import torch: {check.stderr.strip()[-300:]}")
  device = f"{jax.devices()[0].platform}:{jax.device_count()}x {jax.devices()[0].device_kind}"
  peak = matmul_peaks()
  print(json.dumps({"bench": "official", "kind": "peak", "when": "before", "device": device, "gflop_per_s": peak}),
        flush=True)
  for w in what:
    rec = bench_sample(args, peak) if w == "sample" else bench_train(args)
    print(json.dumps(rec), flush=True)
  after = matmul_peaks()
  print(json.dumps({"bench": "official", "kind": "peak", "when": "after", "device": device, "gflop_per_s": after}),
        flush=True)


if __name__ == "__main__":
  sys.exit(main())
