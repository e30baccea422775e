"""`make demo`: train the tokenizer and the VAR on the embedded UCI digits on CPU, sample every class, judge
them.

  python demo.py --workdir workdir/demo

Steps (each resumable: re-running continues from the last checkpoints):
  1. prepare the digits as a tfds ArrayRecord dataset in <workdir>/tfds (from scikit-learn's copy; no
  network);
  2. train the multi-scale VQVAE (configs/digits_tokenizer.py: 16x16 digits, downsample 4, patch_nums (1, 2,
  3, 4))
     into <workdir>/tokenizer, exported as the model directory <workdir>/tokenizer/model;
  3. train the class-conditional VAR (configs/digits_var.py: depth 4) on its tokens into <workdir>/var;
  4. sample `--num_per_class` images of every digit with classifier-free guidance `--cfg` (var/sampler.py) and
     write the grid PNG;
  5. judge the samples with var/eval/digits_quality.py: a small classifier trained on the real training digits
     reports the class accuracy of the generated digits (target >= 90%) and a Frechet distance to the real held-out
     digits.
Prints the wall time, final losses, tokenizer PSNR and codebook usage, the grid path and the figures, and
writes them to <workdir>/demo_report.json.
"""

import json
import logging
import pathlib
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "workdir/demo", "Data, checkpoints, models and samples go here.")
_TOKENIZER_STEPS = flags.DEFINE_integer("tokenizer_steps", 300, "Tokenizer training steps.")
_VAR_STEPS = flags.DEFINE_integer("var_steps", 600, "VAR training steps.")
_CFG = flags.DEFINE_float("cfg", 1.5, "Classifier-free guidance scale of the samples (official ramp).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k sampling (0: off).")
_NUM_PER_CLASS = flags.DEFINE_integer("num_per_class", 20, "Samples per digit for the quality report.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  del argv
  t0 = time.time()
  logging.getLogger().setLevel(logging.WARNING)
  import numpy as np

  from configs import digits_tokenizer, digits_var
  from var import train_lib
  from var.digits_builder import prepare
  from var.eval.digits_quality import DigitsJudge
  from var.pretrained import load_pretrained
  from var.sampler import sample_images

  workdir = pathlib.Path(_WORKDIR.value).absolute()
  data_dir = prepare(workdir / "tfds")

  tok_cfg = digits_tokenizer.get_config(f"steps={_TOKENIZER_STEPS.value}")
  tok_cfg.input.data_dir = str(data_dir)
  print(f"[1/4] tokenizer: {tok_cfg.total_steps} steps, batch {tok_cfg.input.batch_size}, "
        f"{tok_cfg.input.resolution}px -> {workdir / 'tokenizer'}", flush=True)
  tok = train_lib.train_and_evaluate(tok_cfg, workdir / "tokenizer")

  var_cfg = digits_var.get_config(f"steps={_VAR_STEPS.value}")
  var_cfg.input.data_dir = str(data_dir)
  var_cfg.tokenizer_dir = tok["model_dir"]
  print(f"[2/4] VAR: depth {var_cfg.model.depth}, width {var_cfg.model.width}, {var_cfg.total_steps} steps, "
        f"batch {var_cfg.input.batch_size} -> {workdir / 'var'}", flush=True)
  var = train_lib.train_and_evaluate(var_cfg, workdir / "var")

  print(f"[3/4] sampling {_NUM_PER_CLASS.value} images of each digit (cfg {_CFG.value}, "
        f"top_k {_TOP_K.value})", flush=True)
  model, _, vae, _ = load_pretrained(var["model_dir"])
  classes = list(range(10))
  t_sample = time.time()
  images = sample_images(model, vae, classes, cfg=_CFG.value, top_k=_TOP_K.value, seed=_SEED.value,
                         num_per_class=_NUM_PER_CLASS.value)  # (10 * n, 16, 16, 3) in [0, 1], class-major
  sample_s = time.time() - t_sample
  labels = np.repeat(np.asarray(classes), _NUM_PER_CLASS.value)
  n = _NUM_PER_CLASS.value
  grid = images.reshape(10, n, *images.shape[1:]).transpose(1, 0, 2, 3, 4).reshape(-1, *images.shape[1:])
  grid_path = train_lib.save_image_grid(grid, workdir / "samples_grid.png", ncols=10)  # one column per digit

  print("[4/4] judging the samples with a classifier trained on the real digits", flush=True)
  judge = DigitsJudge.train(resolution=tok_cfg.input.resolution, seed=0, crop_scale=tok_cfg.input.crop_scale,
                            upsample=tok_cfg.input.upsample)
  quality = judge.report(images, labels, value_range="[0,1]")

  tok_eval, var_eval = tok["eval"], var["eval"]
  report = {
      "wall_s": round(time.time() - t0, 1),
      "tokenizer": {"steps": tok["step"], "train_loss": tok["train"].get("loss"),
                    "heldout_psnr_db": tok_eval["psnr"], "heldout_l1": tok_eval["l1"],
                    "codes_used": tok_eval["codes_used"], "perplexity": tok_eval["perplexity"],
                    "codes_used_per_scale": [tok_eval[f"codes_used/s{i}"] for i in range(4)],
                    "vocab_size": tok_cfg.tokenizer.vocab_size},
      "var": {"steps": var["step"], "train_loss": var["train"].get("loss"), "heldout_loss": var_eval["loss"],
              "heldout_token_acc": var_eval["acc"]},
      "samples": {"grid_png": str(grid_path), "num_per_class": n, "cfg": _CFG.value, "top_k": _TOP_K.value,
                  "sampling_s": round(sample_s, 1)},
      "quality": quality,
  }
  (workdir / "demo_report.json").write_text(json.dumps(report, indent=1))
  per_scale = ", ".join(f"{100 * u:.0f}%" for u in report["tokenizer"]["codes_used_per_scale"])
  print("\n=== var-jax digits demo ===")
  print(f"wall time            {report['wall_s']:.0f} s (2-core CPU)")
  print(f"tokenizer            {tok['step']} steps, final train loss {tok['train']['loss']:.4f}, "
        f"held-out PSNR {tok_eval['psnr']:.2f} dB, codes used {100 * tok_eval['codes_used']:.0f}% of "
        f"{tok_cfg.tokenizer.vocab_size} (perplexity {tok_eval['perplexity']:.1f}; per scale "
        f"{per_scale})")
  print(f"VAR                  {var['step']} steps, final train loss {var['train']['loss']:.4f}, "
        f"held-out loss {var_eval['loss']:.4f}, token accuracy {100 * var_eval['acc']:.1f}%")
  print(f"samples              {grid_path} ({n} per digit, one column per digit, cfg {_CFG.value})")
  print(f"class accuracy       {100 * quality['accuracy']:.1f}% of generated digits recognised as their "
        f"class (target >= 90%; the judge scores {100 * quality['judge_test_accuracy']:.1f}% on real "
        "held-out digits)")
  print(f"Frechet distance     {quality['fd']:.2f} (generated vs real held-out; real-vs-real at the same N: "
        f"{quality['fd_real_same_n']:.2f})")
  print(f"report               {workdir / 'demo_report.json'}")


if __name__ == "__main__":
  app.run(main)
