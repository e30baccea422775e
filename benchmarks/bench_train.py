"""Training throughput of one VAR train step at 256px, tokenising included (JSON lines).

  python -m benchmarks.bench_train                       # tiny, d8, d16; batch 8; float32; random weights
  python -m benchmarks.bench_train --models d8 --steps 5 --dtype bfloat16 --out benchmarks/results.jsonl
  python -m benchmarks.bench_train --models d8 --tokenise_once   # also the step on token input, same run

Each step is the real jitted train step of var/train_lib.py on random weights: the frozen official-size VQVAE
(vae_ch160v4096z32 architecture) turns a batch of 256x256 images into 680 tokens, then the VAR forward +
backward (class dropout, drop path) and the AdamW update. One line per model: compile time, median step time,
images/s, tokens/s (batch * 680 / step), and for d8 the speed-up over the official PyTorch trainer measured on
the same 2-core CPU machine kind (fp32, random weights, batch 8, tokenising included: 16.6 s per step, 0.48
images/s). `--tokenise_once` times the same compiled step on the tokens of the same images (the tokenise-once
input of var/token_data.py: no encoder, no code search) right after, and adds `step_s_tokens` and the ratio
`tokenise_once_speedup` = step_s / step_s_tokens.
"""

import json
import time

from absl import app, flags

_MODELS = flags.DEFINE_list("models", ["tiny", "d8", "d16"], "tiny (depth 2, width 128) or dN (official).")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch size.")
_RESOLUTION = flags.DEFINE_integer("resolution", 256, "Image side (256: patch_nums 1..16, 680 tokens).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per model (after one warm-up step).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Activations: float32 or bfloat16 (params stay float32).")
_OUT = flags.DEFINE_string("out", None, "Append the JSON lines to this file as well.")
_TOKENISE_ONCE = flags.DEFINE_bool("tokenise_once", False, "Also time the step on token input (same images' "
                                   "tokens), in the same run.")

# the official PyTorch VAR trainer: d8, batch 8, 256px, fp32, 2-core CPU, tokenising included
OFFICIAL_D8_STEP_S = 16.6


def bench_config(model: str, batch: int, dtype: str, resolution: int = 256):
  """A digits_var-shaped config with the official 256px recipe and the requested model."""
  from configs import digits_var

  c = digits_var.get_config()
  c.dtype = dtype
  c.total_steps = 1000
  c.input.resolution = resolution
  c.input.batch_size = batch
  c.model = c.model.__class__(dict(depth=2, width=128, num_heads=2, num_classes=1000, patch_nums=(),
                                   drop_path_rate=0.0, init_adaln_gamma=1e-3))
  if model != "tiny":
    depth = int(model.lstrip("d"))
    c.model = c.model.__class__(dict(depth=depth, num_classes=1000, patch_nums=(),
                                     drop_path_rate=0.1 * depth / 24, init_adaln_gamma=1e-3))
  c.optim.warmup_steps = 10
  return c


def run_one(model: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from tokenizer.vqvae import VQVAEConfig
  from var import sharding as shd
  from var import train_lib

  config = bench_config(model, _BATCH.value, _DTYPE.value, _RESOLUTION.value)
  tok_config = VQVAEConfig.preset("vqvae_256")
  mesh = shd.make_mesh((-1, 1, 1))
  t0 = time.perf_counter()
  setup = train_lib.make_setup(config, mesh, tok_config=tok_config)
  init_s = time.perf_counter() - t0
  rng = np.random.default_rng(0)
  res = _RESOLUTION.value
  batch = {"image": rng.uniform(-1, 1, (_BATCH.value, res, res, 3)).astype(np.float32),
           "label": rng.integers(0, 1000, (_BATCH.value,)).astype(np.int32)}
  prog = (np.int32(-1), np.float32(1.0))

  def timed(state, gbatch):
    t0 = time.perf_counter()
    compiled = setup.train_step.lower(state, gbatch, *prog).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, gbatch, *prog)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(_STEPS.value):
      t0 = time.perf_counter()
      state, metrics = compiled(state, gbatch, *prog)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
    return state, metrics, compile_s, times

  with jax.set_mesh(mesh):
    gbatch = shd.shard_batch(batch, mesh)
    token_batch = None
    if _TOKENISE_ONCE.value:  # the same images' tokens, before the steps donate the state
      tokens = jax.jit(lambda state, images: jnp.concatenate(
          nnx.merge(setup.graphdef, state).tokenizer.img_to_idx(images), axis=1))(setup.state, gbatch["image"])
      token_batch = shd.shard_batch({"tokens": np.asarray(tokens), "label": batch["label"]}, mesh)
    state, metrics, compile_s, times = timed(setup.state, gbatch)
    if token_batch is not None:
      state, token_metrics, compile_tokens_s, token_times = timed(state, token_batch)
  step_s = float(np.median(times))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.state["model"]))
  seq = sum(p * p for p in tok_config.patch_nums)
  out = {"bench": "train_step", "model": model, "params": n_params, "batch": _BATCH.value, "resolution": res,
         "tokens_per_image": seq, "dtype": _DTYPE.value, "devices": jax.device_count(),
         "platform": jax.devices()[0].platform, "init_s": round(init_s, 2), "compile_s": round(compile_s, 2),
         "step_s": round(step_s, 3), "step_s_all": [round(t, 3) for t in times],
         "images_per_s": round(_BATCH.value / step_s, 3),
         "tokens_per_s": round(_BATCH.value * seq / step_s, 1),
         "loss": float(metrics["loss"])}
  if token_batch is not None:
    step_tokens_s = float(np.median(token_times))
    out.update(compile_tokens_s=round(compile_tokens_s, 2), step_s_tokens=round(step_tokens_s, 3),
               step_s_tokens_all=[round(t, 3) for t in token_times],
               images_per_s_tokens=round(_BATCH.value / step_tokens_s, 3),
               tokenise_once_speedup=round(step_s / step_tokens_s, 2), loss_tokens=float(token_metrics["loss"]))
  if model == "d8" and _BATCH.value == 8 and res == 256:
    out["official_step_s"] = OFFICIAL_D8_STEP_S
    out["speedup_vs_official"] = round(OFFICIAL_D8_STEP_S / step_s, 2)
    if token_batch is not None:
      out["speedup_vs_official_tokens"] = round(OFFICIAL_D8_STEP_S / step_tokens_s, 2)
  return out


def main(argv):
  del argv
  for model in _MODELS.value:
    line = json.dumps(run_one(model))
    print(line, flush=True)
    if _OUT.value:
      with open(_OUT.value, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
  app.run(main)
