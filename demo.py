"""`make demo`: train the tokenizer and the VAR on the embedded UCI digits on CPU, sample every class, judge
them against the real digits.

  python demo.py --workdir workdir/demo

Steps (each resumable: re-running continues from the last checkpoints):
  1. prepare the digits as a tfds ArrayRecord dataset in <workdir>/tfds (from scikit-learn's copy; no
     network);
  2. train the multi-scale VQVAE (configs/digits_tokenizer.py: 16x16 digits, downsample 2, patch_nums (1, 2, 4,
     8)) into <workdir>/tokenizer, exported as the model directory <workdir>/tokenizer/model;
  3. train the class-conditional VAR (configs/digits_var.py: depth 4) on its tokens into <workdir>/var;
  4. sample `--num_per_class` images of every digit with classifier-free guidance `--cfg` (var/sampler.py) and
     write the grid PNG (64px tiles, one captioned column per digit) and a side-by-side PNG of real held-out
     digits, their reconstructions and samples;
  5. judge with var/eval/digits_quality.py: the tokenizer's held-out PSNR and the 8x8-grid Frechet distance of
     its reconstructions; the samples' class accuracy (a classifier trained on the real training digits; target
     >= 98%) and their 8x8-grid Frechet distance, each beside the distance of real digits at the same N.
Prints the wall time and the table, and writes it to <workdir>/demo_report.json.
"""

import json
import logging
import pathlib
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "workdir/demo", "Data, checkpoints, models and samples go here.")
_TOKENIZER_STEPS = flags.DEFINE_integer("tokenizer_steps", 600, "Tokenizer training steps.")
_VAR_STEPS = flags.DEFINE_integer("var_steps", 600, "VAR training steps.")
_CFG = flags.DEFINE_float("cfg", 1.5, "Classifier-free guidance scale of the samples (official ramp).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k sampling (0: off).")
_NUM_PER_CLASS = flags.DEFINE_integer("num_per_class", 20, "Samples per digit for the quality report.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def _side_by_side(vae, images, labels, per_class: int, path):
  """Rows = digits; columns = `per_class` real held-out digits, their reconstructions, then samples."""
  import numpy as np

  from var import data, train_lib
  from var.eval import digits_quality as dq

  real, real_labels = data.digits_images("test", images.shape[1])
  rows = []
  for c in range(10):
    pick = real[np.flatnonzero(real_labels == c)[:per_class]]
    rec = dq.reconstruct(vae, pick)[0]
    rows.append(np.concatenate([pick / 255.0, rec, images[labels == c][:per_class]]))
  captions = ["real"] * per_class + ["recon"] * per_class + ["VAR"] * per_class
  return train_lib.save_image_grid(np.concatenate(rows), path, ncols=3 * per_class, scale=4, captions=captions)


def main(argv):
  del argv
  t0 = time.time()
  logging.getLogger().setLevel(logging.WARNING)
  import numpy as np

  from configs import digits_tokenizer, digits_var
  from var import train_lib
  from var.digits_builder import prepare
  from var.eval import digits_quality as dq
  from var.eval.eval_model import sample_report
  from var.pretrained import load_pretrained

  workdir = pathlib.Path(_WORKDIR.value).absolute()
  data_dir = prepare(workdir / "tfds")

  tok_cfg = digits_tokenizer.get_config(f"steps={_TOKENIZER_STEPS.value}")
  tok_cfg.input.data_dir = str(data_dir)
  print(f"[1/4] tokenizer: {tok_cfg.total_steps} steps, batch {tok_cfg.input.batch_size}, "
        f"{tok_cfg.input.resolution}px, patch_nums {tok_cfg.tokenizer.patch_nums} -> {workdir / 'tokenizer'}",
        flush=True)
  tok = train_lib.train_and_evaluate(tok_cfg, workdir / "tokenizer")

  var_cfg = digits_var.get_config(f"steps={_VAR_STEPS.value}")
  var_cfg.input.data_dir = str(data_dir)
  var_cfg.tokenizer_dir = tok["model_dir"]
  print(f"[2/4] VAR: depth {var_cfg.model.depth}, width {var_cfg.model.width}, {var_cfg.total_steps} steps, "
        f"batch {var_cfg.input.batch_size} -> {workdir / 'var'}", flush=True)
  var = train_lib.train_and_evaluate(var_cfg, workdir / "var")

  n = _NUM_PER_CLASS.value
  print(f"[3/4] sampling {n} images of each digit (cfg {_CFG.value}, top_k {_TOP_K.value})", flush=True)
  model, _, vae, _ = load_pretrained(var["model_dir"])
  judge = dq.DigitsJudge.train(resolution=tok_cfg.input.resolution, seed=0, crop_scale=tok_cfg.input.crop_scale,
                               upsample=tok_cfg.input.upsample)
  quality, images = sample_report(model, vae, cfg=_CFG.value, top_k=_TOP_K.value, num_per_class=n,
                                  seed=_SEED.value, judge=judge)  # images (10 * n, 16, 16, 3), class-major
  labels = np.repeat(np.arange(10), n)
  grid = images.reshape(10, n, *images.shape[1:]).transpose(1, 0, 2, 3, 4).reshape(-1, *images.shape[1:])
  grid_path = train_lib.save_image_grid(grid, workdir / "samples_grid.png", ncols=10, scale=4,
                                        captions=[f"digit {c}" for c in range(10)])  # one column per digit
  compare_path = _side_by_side(vae, images, labels, min(n, 4), workdir / "real_recon_samples.png")

  print("[4/4] judging the tokenizer and the samples against the real digits", flush=True)
  tok_quality = dq.tokenizer_report(vae, resolution=tok_cfg.input.resolution, upsample=tok_cfg.input.upsample)

  var_eval = var["eval"]
  report = {
      "wall_s": round(time.time() - t0, 1),
      "tokenizer": {"steps": tok["step"], "train_loss": tok["train"].get("loss"), **tok_quality},
      "var": {"steps": var["step"], "train_loss": var["train"].get("loss"), "heldout_loss": var_eval["loss"],
              "heldout_token_acc": var_eval["acc"]},
      "samples": {"grid_png": str(grid_path), "real_recon_samples_png": str(compare_path), "num_per_class": n},
      "quality": quality,
  }
  (workdir / "demo_report.json").write_text(json.dumps(report, indent=1))
  t = report["tokenizer"]
  per_scale = ", ".join(f"{100 * u:.0f}%" for u in t["codes_used_per_scale"])
  print("\n=== var-jax digits demo ===")
  print(f"wall time              {report['wall_s']:.0f} s")
  print(f"tokenizer              {tok['step']} steps, patch_nums {t['patch_nums']}, {t['vocab_size']} codes: "
        f"held-out PSNR {t['psnr_db']:.2f} dB (mean error {t['grid_mae_levels']:.2f} of 16 grey levels)")
  print(f"  codebook use         per scale {per_scale} of the codes on held-out digits")
  print(f"VAR                    {var['step']} steps, held-out loss {var_eval['loss']:.4f}, token accuracy "
        f"{100 * var_eval['acc']:.1f}%")
  print(f"class accuracy         {100 * quality['accuracy']:.1f}% of {len(labels)} samples recognised as their "
        f"digit (target >= 98%; the judge scores {100 * quality['judge_test_accuracy']:.1f}% on real held-out "
        "digits)")
  print("Frechet distance on the 8x8 grid (grey levels, vs the real held-out digits; real digits at the same N):")
  print(f"  reconstructions      {t['fd']:8.1f}   real {t['fd_real']:6.1f}   ratio {t['fd'] / t['fd_real']:.2f} "
        "(target <= 2)")
  print(f"  samples (cfg {_CFG.value:g})     {quality['fd']:8.1f}   real {quality['fd_real_same_n']:6.1f}   ratio "
        f"{quality['fd'] / quality['fd_real_same_n']:.2f} (target <= 3)")
  print(f"pictures               {grid_path}\n                       {compare_path}")
  print(f"report                 {workdir / 'demo_report.json'}")


if __name__ == "__main__":
  app.run(main)
