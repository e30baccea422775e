"""bfloat16 sampling against float32 on a trained model: how many tokens change, and the digits judge (JSON lines).

  python -m benchmarks.bench_bf16 --model_dir workdir/eval_model/var/model [--num_per_class 50] [--cfgs 1.5,0]

The bfloat16 path is the sampler's: transformer activations and KV cache in bfloat16 (float32 parameters); the
embeddings, the head, the logits, the top-k/top-p masking and the draw, the tokenizer (resampling, f_hat, decode)
in float32. Both paths draw from the same per-sample seeds (sample i: seed + i), so with identical logits they
draw identical tokens; once a token differs, the later scales see another input and diverge further. Reported
per cfg: the fraction of differing tokens per scale and overall, the fraction of samples with every token equal,
the first differing scale, and the digits judge's class accuracy of both (`var.eval.digits_quality`, trained on
the real digits at the model's resolution, crop_scale 1.0 as the evaluation model was trained).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

from benchmarks.bench_sample import with_dtype


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model_dir", default="workdir/eval_model/var/model", help="a var-jax model directory (digits)")
  p.add_argument("--num_per_class", type=int, default=50)
  p.add_argument("--cfgs", default="1.5,0")
  p.add_argument("--top_k", type=int, default=0, help="0 = off (the evaluation report's setting)")
  p.add_argument("--top_p", type=float, default=0.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch_size", type=int, default=100)
  p.add_argument("--crop_scale", type=float, default=1.0, help="the judge's crop_scale: the model's training crop")
  args = p.parse_args(argv)

  from var import sampler as sampler_lib
  from var.eval import digits_quality as dq
  from var.pretrained import load_pretrained

  var32, var_config, vae, vae_config = load_pretrained(args.model_dir)
  var16 = with_dtype(var32, "bfloat16")
  classes = var_config.num_classes
  labels = np.repeat(np.arange(classes, dtype=np.int32), args.num_per_class)
  seeds = (args.seed + np.arange(labels.shape[0])).astype(np.uint32)
  sizes = [pn * pn for pn in var_config.patch_nums]
  bounds = np.cumsum([0] + sizes)
  t0 = time.perf_counter()
  judge = dq.default_judge(vae_config.image_size, crop_scale=args.crop_scale)
  judge_s = time.perf_counter() - t0

  for cfg in (float(c) for c in args.cfgs.split(",")):
    sampling = sampler_lib.SamplingConfig(cfg=cfg, top_k=args.top_k, top_p=args.top_p)
    out = {}
    for name, var, kv in (("float32", var32, None), ("bfloat16", var16, "bfloat16")):
      s = sampler_lib.Sampler(var, vae, sampling, kv_dtype=kv, return_logits=True)
      tokens, images, logit_dtypes = [], [], set()
      t0 = time.perf_counter()
      for start in range(0, labels.shape[0], args.batch_size):
        r = s(labels[start:start + args.batch_size], seeds[start:start + args.batch_size])
        tokens.append(np.asarray(r["tokens"]))
        images.append(np.asarray(r["images"]))
        logit_dtypes.add(str(r["logits"].dtype))
      out[name] = dict(tokens=np.concatenate(tokens), images=np.concatenate(images), logit_dtypes=logit_dtypes,
                       seconds=time.perf_counter() - t0)
    diff = out["float32"]["tokens"] != out["bfloat16"]["tokens"]  # (N, L)
    per_scale = [float(diff[:, a:b].mean()) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    any_scale = np.stack([diff[:, a:b].any(1) for a, b in zip(bounds[:-1], bounds[1:], strict=True)], 1)  # (N, S)
    first = np.where(any_scale.any(1), any_scale.argmax(1), -1)
    rec = {"bench": "bf16_sampling", "model_dir": args.model_dir, "num_images": int(labels.shape[0]), "cfg": cfg,
           **dataclasses.asdict(sampling), "patch_nums": list(var_config.patch_nums),
           "tokens_changed": round(float(diff.mean()), 4), "tokens_changed_per_scale": [round(v, 4) for v in per_scale],
           "samples_changed_at_scale": [round(float(v), 4) for v in any_scale.mean(0)],
           "samples_identical": round(float((first < 0).mean()), 4),
           "first_changed_scale_histogram": [int((first == si).sum()) for si in range(len(sizes))],
           "pixels_max_abs_diff": round(float(np.abs(out["float32"]["images"] - out["bfloat16"]["images"]).max()), 4),
           "logits_dtype": sorted(out["bfloat16"]["logit_dtypes"]), "judge_resolution": vae_config.image_size,
           "judge_test_accuracy": round(float(judge.test_accuracy), 4), "judge_train_s": round(judge_s, 1)}
    for name in ("float32", "bfloat16"):
      rec[f"accuracy_{name}"] = round(judge.accuracy(out[name]["images"], labels, "[0,1]"), 4)
      rec[f"wall_s_with_compile_{name}"] = round(out[name]["seconds"], 2)
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
  main()
