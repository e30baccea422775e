"""The digits evaluation model: a class-conditional VAR + tokenizer on the embedded UCI digits with 7 scales,
trained once on a CPU, for benchmarks that need a trained model (e.g. the inference-technique benchmark).

  python -m var.eval.eval_model --workdir workdir/eval_model   # trains if missing, then prints the report

From Python::

  from var.eval.eval_model import ensure_eval_model
  model_dir = ensure_eval_model("workdir/eval_model")     # trained once, then reused
  model, var_config, vae, vae_config = var.pretrained.load_pretrained(model_dir)

Stages (configs/digits_eval_tokenizer.py, configs/digits_eval_var.py): 16x16 digits, an 8x8 latent and
patch_nums (1, 2, 3, 4, 5, 6, 8). Each stage is skipped when its exported model directory exists, and resumes
from its checkpoints when a previous run was killed.

The quality report (`quality_report`) gives the tokenizer's held-out PSNR and 8x8-grid Frechet distance beside
real-vs-real, and for the samples at each cfg the judge's class accuracy and their 8x8-grid Frechet distance
beside a real sample of the same N (var/eval/digits_quality.py).
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from var.eval import digits_quality as dq

NUM_CLASSES = 10


def _exported(model_dir: pathlib.Path) -> bool:
  return (model_dir / "config.json").exists()


def ensure_eval_model(workdir, *, tokenizer_arg: str = "", var_arg: str = "") -> pathlib.Path:
  """Trains the tokenizer, then the VAR, into `workdir` unless their model directories exist; returns the model
  directory (`<workdir>/var/model`, loadable by `var.pretrained.load_pretrained`).

  tokenizer_arg / var_arg: config arguments (e.g. "steps=20,batch=16") for the two stages; a model trained
  once is reused whatever they say, so use a fresh workdir when changing them.
  """
  from configs import digits_eval_tokenizer, digits_eval_var
  from var import train_lib
  from var.digits_builder import prepare

  workdir = pathlib.Path(workdir).absolute()
  tok_dir, var_dir = workdir / "tokenizer" / "model", workdir / "var" / "model"
  if _exported(var_dir):
    return var_dir
  data_dir = prepare(workdir / "tfds")
  if not _exported(tok_dir):
    tok_cfg = digits_eval_tokenizer.get_config(tokenizer_arg)
    tok_cfg.input.data_dir = data_dir
    print(f"[eval model 1/2] tokenizer: patch_nums {tok_cfg.tokenizer.patch_nums}, {tok_cfg.total_steps} steps "
          f"-> {workdir / 'tokenizer'}", flush=True)
    train_lib.train_and_evaluate(tok_cfg, workdir / "tokenizer")
  var_cfg = digits_eval_var.get_config(var_arg)
  var_cfg.input.data_dir = data_dir
  var_cfg.tokenizer_dir = str(tok_dir)
  print(f"[eval model 2/2] VAR: depth {var_cfg.model.depth}, width {var_cfg.model.width}, "
        f"{var_cfg.total_steps} steps -> {workdir / 'var'}", flush=True)
  return pathlib.Path(train_lib.train_and_evaluate(var_cfg, workdir / "var")["model_dir"])


def sample_report(model, vae, *, cfg: float, num_per_class: int = 20, seed: int = 0, top_k: int = 0,
                  top_p: float = 0.0, judge: dq.DigitsJudge | None = None) -> tuple[dict, np.ndarray]:
  """Samples `num_per_class` images of every digit (class-major) and judges them (DigitsJudge.report: class
  accuracy, 8x8-grid and feature Frechet distances beside real samples of the same N).

  Returns (report dict with cfg, top_k, top_p and sampling_s added, images (N, R, R, 3) in [0, 1]).
  """
  from var.sampler import sample_images

  judge = judge or dq.default_judge(vae.config.image_size)
  start = time.perf_counter()
  images = sample_images(model, vae, list(range(NUM_CLASSES)), cfg=cfg, top_k=top_k, top_p=top_p, seed=seed,
                         num_per_class=num_per_class)
  seconds = time.perf_counter() - start
  labels = np.repeat(np.arange(NUM_CLASSES), num_per_class)
  report = judge.report(images, labels, value_range="[0,1]")
  report.update(cfg=cfg, top_k=top_k, top_p=top_p, sampling_s=round(seconds, 1))
  return report, images


def quality_report(model_dir, *, cfgs=(1.5, 0.0), num_per_class: int = 20, seed: int = 0) -> dict:
  """The evaluation model's figures: {"tokenizer": dq.tokenizer_report, "samples": {"cfg<x>": sample_report}}."""
  from var.pretrained import load_pretrained

  model, _, vae, _ = load_pretrained(model_dir)
  out = {"model_dir": str(model_dir), "tokenizer": dq.tokenizer_report(vae), "samples": {}}
  for cfg in cfgs:
    out["samples"][f"cfg{cfg:g}"] = sample_report(model, vae, cfg=cfg, num_per_class=num_per_class, seed=seed)[0]
  return out


def format_report(report: dict) -> str:
  """The quality report as a few readable lines."""
  tok = report["tokenizer"]
  used = ", ".join(f"{100 * u:.0f}%" for u in tok["codes_used_per_scale"])
  lines = [
    f"tokenizer   patch_nums {tok['patch_nums']}, vocab {tok['vocab_size']}: held-out PSNR "
    f"{tok['psnr_db']:.2f} dB, mean error {tok['grid_mae_levels']:.2f} grey levels (of 16)",
    f"            8x8-grid Frechet distance of reconstructions {tok['fd']:.1f} (real-vs-real {tok['fd_real']:.1f}, "
    f"ratio {tok['fd'] / tok['fd_real']:.2f}); codes used per scale {used}",
  ]
  for name, s in report["samples"].items():
    lines.append(
      f"samples     {name}: judge accuracy {100 * s['accuracy']:.1f}%, 8x8-grid Frechet distance {s['fd']:.1f} "
      f"(real-vs-real at N={s['num_images']}: {s['fd_real_same_n']:.1f}, ratio "
      f"{s['fd'] / s['fd_real_same_n']:.2f})")
  return "\n".join(lines)


def main(argv):
  del argv
  from absl import flags

  f = flags.FLAGS
  start = time.time()
  model_dir = ensure_eval_model(f.workdir, tokenizer_arg=f.tokenizer_arg, var_arg=f.var_arg)
  train_s = time.time() - start
  report = quality_report(model_dir, num_per_class=f.num_per_class)
  report["ensure_s"] = round(train_s, 1)
  path = pathlib.Path(f.workdir) / "eval_model_report.json"
  path.write_text(json.dumps(report, indent=1))
  print(f"\n=== digits evaluation model: {model_dir} ===")
  print(format_report(report))
  print(f"report      {path} (ensure_eval_model took {train_s:.0f} s)")


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("workdir", "workdir/eval_model", "Data, checkpoints and the exported models go here.")
  flags.DEFINE_string("tokenizer_arg", "", "Config argument of configs/digits_eval_tokenizer.py (first run only).")
  flags.DEFINE_string("var_arg", "", "Config argument of configs/digits_eval_var.py (first run only).")
  flags.DEFINE_integer("num_per_class", 20, "Samples per digit for the report.")
  app.run(main)
