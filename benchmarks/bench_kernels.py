"""The kernel ceiling of the sampler: its matmuls and convolutions, each timed alone (JSON lines).

  python -m benchmarks.bench_kernels [--models d16] [--batch_sizes 8] [--dtype float32] [--fused]
  python -m benchmarks.bench_kernels --quick     # smoke run: tiny VAR + the fixture-size VQVAE

Traces the fused sampler (`var.sampler.Sampler`, the plain plan, cfg 1.5, top-k 900, top-p 0.96, 256px, random-
weight official configs and the vae_ch160v4096z32 VQVAE) to a jaxpr from abstract parameters (nothing is
allocated for the trace), walks it (a `lax.scan` body counts `length` times) and collects every `dot_general` and
`conv_general_dilated` with its operand shapes and parameters. Each distinct one is then bound on its own in a
jitted program, fed random operands, and timed (best of a few calls) between two 2048^3 float32 matmuls: its
efficiency is its rate over the faster of those two (this machine's speed drifts by up to 2x within minutes, so
only a peak measured beside a kernel is its yardstick). The sampler's kernel FLOPs over the sum of each kernel's
count x FLOPs / efficiency is the fraction of the peak the sampler would reach if nothing but its kernels cost
anything and every kernel ran as fast as it does alone. `--fused` also times the real sampler (random weights)
in the same run, against the matmul peak measured right before and after each call.

Alone, an attention dot (q.k, p.v: the dots with batch dimensions) pays for transposing its operands; inside the
sampler XLA fuses both dots and the softmax into one kernel that reads the cache as stored, so the attention is
also bounded by the matmul peak instead ("all, attention at the matmul peak"): an upper bound on the fraction of
the peak the other kernels allow.

Records: "peaks"; "kernel" (the kinds losing the most time against their peak, one line each); "ceiling"
(totals per scope: dense matmuls, attention, convolutions; overall; overall with the attention at the matmul
peak; with --fused the sampler's own time in the same run).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.bench_breakdown import QUICK_SAMPLING, SAMPLING, device_and_peaks
from benchmarks.bench_sample import jit_build
from tokenizer import VQVAE, VQVAEConfig
from var import model as var_model
from var import sampler as sampler_lib

KERNELS = ("dot_general", "conv_general_dilated")


def _sub_jaxprs(params):
  for v in params.values():
    for item in v if isinstance(v, (tuple, list)) else (v,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def collect_kernels(jaxpr, times: int = 1, out: dict | None = None) -> dict:
  """{(primitive, operand avals, params): [eqn, count]} of every matmul / convolution in `jaxpr`, counting a scan
  body `length` times. Loops of unknown trip count (while) and conditionals are refused: the plain sampler has
  neither around its kernels, and a count would be a guess."""
  out = {} if out is None else out
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in KERNELS:
      key = (name, tuple((v.aval.shape, str(v.aval.dtype)) for v in eqn.invars),
             tuple(sorted((k, repr(p)) for k, p in eqn.params.items())))
      entry = out.setdefault(key, [eqn, 0])
      entry[1] += times
      continue
    subs = list(_sub_jaxprs(eqn.params))
    if not subs:
      continue
    if name in ("while", "cond"):
      inner = {}
      for s in subs:
        collect_kernels(s, 1, inner)
      if inner:
        raise ValueError(f"a {name} holds {len(inner)} matmul/conv kinds: their count is unknown")
      continue
    reps = eqn.params["length"] if name == "scan" else 1
    for s in subs:
      collect_kernels(s, times * reps, out)
  return out


def kernel_flops(eqn) -> float:
  """Multiply-adds x 2 of a dot_general / conv_general_dilated."""
  out_size = math.prod(eqn.outvars[0].aval.shape)
  if eqn.primitive.name == "dot_general":
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * out_size * math.prod(lhs[d] for d in lhs_contract)
  rhs = eqn.invars[1].aval.shape
  dn = eqn.params["dimension_numbers"]
  in_feat = rhs[dn.rhs_spec[1]]
  window = math.prod(rhs[d] for d in dn.rhs_spec[2:])
  return 2.0 * out_size * in_feat * window  # rhs in-features are already per group


def time_kernel(eqn, iters: int) -> float:
  """Best seconds of the kernel alone, jitted, on random operands."""
  prim, params = eqn.primitive, eqn.params
  fn = jax.jit(lambda *a: prim.bind(*a, **params))
  keys = jax.random.split(jax.random.key(0), len(eqn.invars))
  args = [jax.random.normal(k, v.aval.shape, jnp.float32).astype(v.aval.dtype)
          for k, v in zip(keys, eqn.invars, strict=True)]
  jax.block_until_ready(fn(*args))
  best, spent, n = float("inf"), 0.0, 0
  while n < iters or (spent < 0.2 and n < 200):  # small kernels: more calls, for a steady best
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    dt = time.perf_counter() - t0
    best, spent, n = min(best, dt), spent + dt, n + 1
  return best


def _scope(eqn) -> str:
  """'attention' (a dot with batch dimensions: q.k and p.v), 'dense' (the other dots) or 'conv'."""
  if eqn.primitive.name == "conv_general_dilated":
    return "conv"
  (_, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
  return "attention" if lhs_batch else "dense"


def _shapes(eqn) -> str:
  ins = " x ".join("(" + ",".join(map(str, v.aval.shape)) + ")" for v in eqn.invars)
  return f"{ins} -> ({','.join(map(str, eqn.outvars[0].aval.shape))})"


class LocalPeak:
  """The 2048^3 float32 matmul rate (FLOP/s) right now, best of two calls: the yardstick every kernel is timed
  beside, since this machine's speed drifts by up to 2x within minutes."""

  def __init__(self, n: int = 2048):
    self.a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    self.b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    self.fn = jax.jit(jnp.dot)
    self.flops = 2.0 * n ** 3
    jax.block_until_ready(self.fn(self.a, self.b))

  def __call__(self) -> float:
    best = float("inf")
    for _ in range(2):
      t0 = time.perf_counter()
      jax.block_until_ready(self.fn(self.a, self.b))
      best = min(best, time.perf_counter() - t0)
    return self.flops / best


def bench_ceiling(name, var_cfg, vae, sampling, batch, iters, device, top: int, fused: bool) -> None:
  var = var_model.abstract(var_cfg)
  sampler = sampler_lib.Sampler(var, vae, sampling)
  args = sampler._inputs(np.zeros(batch, np.int32), np.zeros(batch, np.uint32), None)
  abstract_states = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), sampler._states)
  jaxpr = jax.make_jaxpr(sampler._run)(abstract_states, *args).jaxpr
  kernels = collect_kernels(jaxpr)
  local_peak = LocalPeak()

  # per kind: its best time alone and its efficiency = its rate over the matmul peak measured right before and
  # after it; per scope the totals of count x seconds, count x FLOPs and count x FLOPs / efficiency (the FLOPs'
  # cost in peak-FLOPs: their ratio is the FLOP-weighted harmonic mean of the efficiencies)
  rows, totals = [], {}
  for (prim, _, _), (eqn, count) in kernels.items():
    before = local_peak()
    seconds = time_kernel(eqn, iters)
    local = max(before, local_peak())
    fl = kernel_flops(eqn)
    eff = fl / seconds / local
    rows.append((count * seconds * (1 - eff), prim, eqn, count, seconds, fl, eff))
    acc = totals.setdefault(_scope(eqn), [0, 0, 0.0, 0.0, 0.0])
    for i, add in enumerate((1, count, count * seconds, count * fl, count * fl / eff)):
      acc[i] += add
  base = {"device": device, "model": name, "batch": batch, "dtype": var_cfg.dtype}
  for lost, prim, eqn, count, seconds, fl, eff in sorted(rows, key=lambda r: r[0], reverse=True)[:top]:
    print(json.dumps({"bench": "kernel", **base, "primitive": prim, "shapes": _shapes(eqn),
                      "dtypes": [str(v.aval.dtype) for v in eqn.invars], "count": count,
                      "s_each": round(seconds, 6), "gflop_per_s": round(fl / seconds / 1e9, 1),
                      "of_local_peak": round(eff, 3), "s_lost_vs_local_peak": round(lost, 3)}), flush=True)

  def record(scope, kinds, instances, seconds, fl, peak_fl, **extra):
    return {"bench": "ceiling", **base, "scope": scope, "kinds": kinds, "instances": instances,
            "kernel_s": round(seconds, 3), "gflop": round(fl / 1e9, 1), "gflop_per_s": round(fl / seconds / 1e9, 1),
            "of_local_peak": round(fl / peak_fl, 3), **extra}

  for scope, acc in totals.items():
    print(json.dumps(record(scope, *acc)), flush=True)
  kinds, instances, seconds, fl, peak_fl = (sum(t[i] for t in totals.values()) for i in range(5))
  if "attention" in totals:  # alone, each attention dot pays for its operand transposes; in the sampler XLA fuses
    # both dots and the softmax into one kernel that reads the cache as stored: bound it by the matmul peak instead
    att = totals["attention"]
    print(json.dumps(record("all, attention at the matmul peak", kinds, instances, seconds - att[2], fl,
                            peak_fl - att[4] + att[3])), flush=True)
  extra = {}
  if fused:
    real = jit_build(lambda: var_model.VAR(var_cfg, rngs=nnx.Rngs(0)))  # float32 parameters at any activation dtype
    s = sampler_lib.Sampler(real, vae, sampling)
    s.compile(batch)
    labels, seeds = np.arange(batch) % var_cfg.num_classes, np.arange(batch) + 1000
    jax.block_until_ready(s(labels, seeds)["images"])
    calls = []
    for _ in range(iters):
      before = local_peak()
      t0 = time.perf_counter()
      jax.block_until_ready(s(labels, seeds)["images"])
      calls.append((time.perf_counter() - t0, max(before, local_peak())))
    fused_s, fused_peak = min(calls)
    extra = {"fused_s": [round(t, 3) for t, _ in calls], "fused_of_local_peak": round(fl / fused_s / fused_peak, 3),
             "kernel_s_over_fused_s": round(seconds / fused_s, 3)}
  print(json.dumps(record("all", kinds, instances, seconds, fl, peak_fl, **extra)), flush=True)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="d16", help="comma-separated var.model presets (d16, d20, d24, d30)")
  p.add_argument("--batch_sizes", default="8")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="transformer activations")
  p.add_argument("--iters", type=int, default=3, help="timed calls per kernel (the best is kept)")
  p.add_argument("--top", type=int, default=12, help="kernel lines printed (the most time lost first)")
  p.add_argument("--fused", action="store_true", help="also time the real fused sampler in the same run")
  p.add_argument("--quick", action="store_true", help="smoke run: tiny VAR + fixture VQVAE, batch 2")
  args = p.parse_args(argv)
  device, _ = device_and_peaks()
  if args.quick:
    models, batches, vae_config, sampling = {"tiny": var_model.preset("tiny")}, [2], VQVAEConfig.preset("t1"), \
        QUICK_SAMPLING
  else:
    models = {m: var_model.preset(m) for m in args.models.split(",") if m}
    batches, vae_config, sampling = [int(b) for b in args.batch_sizes.split(",")], VQVAEConfig(), SAMPLING
  with nnx.use_eager_sharding(False):
    vae = VQVAE(vae_config, rngs=nnx.Rngs(1))
  for name, cfg in models.items():
    if args.dtype != "float32":
      cfg = var_model.VARConfig.from_dict({**cfg.to_dict(), "dtype": args.dtype})
    for batch in batches:
      bench_ceiling(name, cfg, vae, sampling, batch, 1 if args.quick else args.iters, device, args.top,
                    args.fused)


if __name__ == "__main__":
  main()
