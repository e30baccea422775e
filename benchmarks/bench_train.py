"""Training throughput of one VAR train step at 256px, tokenising included (JSON lines).

  python -m benchmarks.bench_train                       # tiny, d8, d16; batch 8; float32; random weights
  python -m benchmarks.bench_train --models d8 --steps 5 --dtype bfloat16 --out benchmarks/results.jsonl
  python -m benchmarks.bench_train --models d8 --tokenise_once   # also the step on token input, same run

Each step is the real jitted train step of var/train_lib.py on random weights: the frozen official-size VQVAE
(vae_ch160v4096z32 architecture) turns a batch of 256x256 images into 680 tokens, then the VAR forward +
backward (class dropout, drop path) and the AdamW update. One line per model: compile time, median step time,
images/s, tokens/s (batch * 680 / step); the official PyTorch trainer in the same run: benchmarks/bench_official.py.
`--tokenise_once` times the same compiled step on the tokens of the same images (the tokenise-once
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


class StepTimer:
  """The real jitted VAR train step of `model` at (batch, resolution), compiled once for image input and (with
  tokenise_once) once for token input; each `time_images()` / `time_tokens()` call runs one step on the same batch
  (the state is threaded through, as in training) and returns its seconds."""

  def __init__(self, model: str, batch: int, dtype: str = "float32", resolution: int = 256,
               tokenise_once: bool = False):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from tokenizer.vqvae import VQVAEConfig
    from var import sharding as shd
    from var import train_lib

    self.model, self.batch, self.dtype, self.resolution = model, batch, dtype, resolution
    config = bench_config(model, batch, dtype, resolution)
    self.tok_config = VQVAEConfig.preset("vqvae_256")
    self.mesh = shd.make_mesh((-1, 1, 1))
    t0 = time.perf_counter()
    setup = train_lib.make_setup(config, self.mesh, tok_config=self.tok_config)
    self.init_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    images = {"image": rng.uniform(-1, 1, (batch, resolution, resolution, 3)).astype(np.float32),
              "label": rng.integers(0, 1000, (batch,)).astype(np.int32)}
    self.prog = (np.int32(-1), np.float32(1.0))
    with jax.set_mesh(self.mesh):
      self.batches = {"images": shd.shard_batch(images, self.mesh)}
      if tokenise_once:  # the same images' tokens, before the steps donate the state
        tokenise = jax.jit(lambda state, x: jnp.concatenate(
            nnx.merge(setup.graphdef, state).tokenizer.img_to_idx(x), axis=1))
        tokens = tokenise(setup.state, self.batches["images"]["image"])
        self.batches["tokens"] = shd.shard_batch({"tokens": np.asarray(tokens), "label": images["label"]}, self.mesh)
      self.compiled, self.compile_s = {}, {}
      for kind, b in self.batches.items():
        t0 = time.perf_counter()
        self.compiled[kind] = setup.train_step.lower(setup.state, b, *self.prog).compile()
        self.compile_s[kind] = time.perf_counter() - t0
    self.state, self.metrics = setup.state, {}
    self.n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.state["model"]))
    self.seq = sum(p * p for p in self.tok_config.patch_nums)

  def _time(self, kind: str) -> float:
    import jax

    with jax.set_mesh(self.mesh):
      t0 = time.perf_counter()
      self.state, metrics = self.compiled[kind](self.state, self.batches[kind], *self.prog)
      jax.block_until_ready(metrics)
    self.metrics[kind] = metrics
    return time.perf_counter() - t0

  def time_images(self) -> float:
    return self._time("images")

  def time_tokens(self) -> float:
    return self._time("tokens")


def run_one(model: str) -> dict:
  import jax
  import numpy as np

  timer = StepTimer(model, _BATCH.value, _DTYPE.value, _RESOLUTION.value, _TOKENISE_ONCE.value)
  timer.time_images()  # warm-up
  times = [timer.time_images() for _ in range(_STEPS.value)]
  if _TOKENISE_ONCE.value:
    timer.time_tokens()
    token_times = [timer.time_tokens() for _ in range(_STEPS.value)]
  step_s, res = float(np.median(times)), _RESOLUTION.value
  out = {"bench": "train_step", "model": model, "params": timer.n_params, "batch": _BATCH.value, "resolution": res,
         "tokens_per_image": timer.seq, "dtype": _DTYPE.value, "devices": jax.device_count(),
         "platform": jax.devices()[0].platform, "init_s": round(timer.init_s, 2),
         "compile_s": round(timer.compile_s["images"], 2),
         "step_s": round(step_s, 3), "step_s_all": [round(t, 3) for t in times],
         "images_per_s": round(_BATCH.value / step_s, 3),
         "tokens_per_s": round(_BATCH.value * timer.seq / step_s, 1),
         "loss": float(timer.metrics["images"]["loss"])}
  if _TOKENISE_ONCE.value:
    step_tokens_s = float(np.median(token_times))
    out.update(compile_tokens_s=round(timer.compile_s["tokens"], 2), step_s_tokens=round(step_tokens_s, 3),
               step_s_tokens_all=[round(t, 3) for t in token_times],
               images_per_s_tokens=round(_BATCH.value / step_tokens_s, 3),
               tokenise_once_speedup=round(step_s / step_tokens_s, 2),
               loss_tokens=float(timer.metrics["tokens"]["loss"]))
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
