"""Test-time search on a digits model: class accuracy and Frechet distance by the digits judge (which the search
never sees), and the cost, for every method at the same seeds.

  python -m benchmarks.bench_search --model workdir/demo/var/model --reward workdir/digits_reward \\
      [--per_class 50] [--cfgs 0,1.5] [--methods plain,bon2,bon4,bon8,tts1,tts2,tts4,reject4] [--crop_scale 1.0] \\
      [--potential value] [--draw replacement|distinct] [--quick]

The reward is the digits reward classifier (python -m var.rewards train-digits-classifier), its feature map the
TTS-VAR clustering features; the judge is var/eval/digits_quality.py's independent MLP. Requested image i of
every method uses seed --seed + i (candidate j: + j * search.SEED_STRIDE), so plain sampling is candidate 0 of
every Best-of-N. Prints one JSON line per (cfg, method) and a markdown table; `token_forwards_x` is the
transformer token-forwards relative to plain sampling (CFG rows included), `wall_s` the sampling time after
compilation.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from var import pretrained, rewards, search
from var import sampler as sampler_lib
from var.eval.digits_quality import DigitsJudge
from var.plan import ScalePlan

DEFAULT_METHODS = ("plain", "bon2", "bon4", "bon8", "tts1", "tts2", "tts4", "reject4")


def _parse_method(name: str) -> tuple[str, int]:
  for method in ("plain", "bon", "tts", "reject", "is"):
    if name.startswith(method) and (method == "plain" or name[len(method):].isdigit()):
      return method, 1 if method == "plain" else int(name[len(method):])
  raise ValueError(f"method {name!r}: use plain, bonN, ttsN, isN or rejectM (e.g. bon8)")


def run(model_dir: str, reward_dir: str, *, per_class: int = 50, cfgs=(0.0, 1.5), methods=DEFAULT_METHODS,
        seed: int = 0, batch: int = 10, top_k: int = 0, top_p: float = 0.0, crop_scale: float = 1.0,
        lam: float = 10.0, potential: str = "value", schedule=search.DEFAULT_SCHEDULE,
        draw: str = "replacement") -> list[dict]:
  """Samples `per_class` images of every class per (cfg, method) and judges them; returns the result rows.

  `batch` requested images per sampler call (each with its candidates); `crop_scale` is the generator's input
  crop (configs/common.py), with which the judge sees the real digits."""
  var, var_config, vae, vae_config = pretrained.load_pretrained(model_dir)
  num_classes, patch_nums = var_config.num_classes, var_config.patch_nums
  clf = rewards.classifier_for_model(reward_dir, num_classes, vae_config.image_size)
  judge = DigitsJudge.train(resolution=vae_config.image_size, seed=0, crop_scale=crop_scale)
  labels = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
  seeds = (seed + np.arange(labels.shape[0])).astype(np.uint32)
  n = labels.shape[0]
  if n % batch:
    raise ValueError(f"{n} requested images are not a multiple of --batch {batch}")
  rows = []
  for cfg in cfgs:
    sampling = sampler_lib.SamplingConfig(cfg=cfg, top_k=top_k, top_p=top_p)
    plain_forwards = search.token_forwards(ScalePlan.plain(len(patch_nums), batch, cfg), patch_nums)
    for name in methods:
      method, m = _parse_method(name)
      if method == "plain":
        s, forwards = sampler_lib.Sampler(var, vae, sampling), plain_forwards
        compile_s = s.compile(batch)
      else:
        kw = {}
        if method == "tts":
          kw = dict(features=clf.tokens, lam=lam, potential=potential, schedule=tuple(schedule), draw=draw)
        elif method == "is":
          kw = dict(lam=lam)
        s = search.SearchSampler(var, vae, sampling, search.SearchSpec(method, m, clf.reward, **kw))
        forwards = s.token_forwards(batch)
        compile_s = s.compile(batch)
      t0 = time.perf_counter()
      images = [np.asarray(jax.device_get(s(labels[i:i + batch], seeds[i:i + batch])["images"]))
                for i in range(0, n, batch)]
      wall = time.perf_counter() - t0
      q = judge.report(np.concatenate(images), labels, value_range="[0,1]")
      label = name + (f"-{draw}" if method == "tts" and draw != "replacement" else "")
      row = {"cfg": cfg, "method": label, "accuracy": round(q["accuracy"], 4), "fd": round(q["fd"], 3),
             "fd_real_same_n": round(q["fd_real_same_n"], 3), "token_forwards_x": round(forwards / plain_forwards, 2),
             "wall_s": round(wall, 2), "compile_s": round(compile_s, 1), "num_images": n,
             "judge_test_accuracy": round(q["judge_test_accuracy"], 4)}
      print(json.dumps(row), flush=True)
      rows.append(row)
  return rows


def table(rows: list[dict]) -> str:
  """The rows as a markdown table."""
  lines = ["| cfg | method | class accuracy | Frechet distance | token-forwards | wall s |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['cfg']:g} | {r['method']} | {100 * r['accuracy']:.1f}% | {r['fd']:.2f} | "
                 f"{r['token_forwards_x']:.2f}x | {r['wall_s']:.1f} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="digits model directory (VQVAE + VAR)")
  p.add_argument("--reward", required=True, help="digits reward classifier directory")
  p.add_argument("--per_class", type=int, default=50)
  p.add_argument("--cfgs", default="0,1.5", help="comma-separated guidance scales")
  p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
  p.add_argument("--batch", type=int, default=10, help="requested images per sampler call")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--crop_scale", type=float, default=1.0,
                 help="the generator's input crop_scale (configs/digits_*: 1.0): the judge sees the real digits so")
  p.add_argument("--schedule", default=None, help="TTS-VAR schedule (default: the 13-scale one, mapped)")
  p.add_argument("--potential", default="value")
  p.add_argument("--draw", default="replacement", choices=search.DRAWS, help="TTS-VAR resampling draw")
  p.add_argument("--quick", action="store_true", help="2 per class, cfg 1.5, plain/bon2/tts1/reject4 (a smoke run)")
  args = p.parse_args(argv)
  per_class, cfgs, methods = args.per_class, [float(c) for c in args.cfgs.split(",")], args.methods.split(",")
  if args.quick:
    per_class, cfgs, methods = 2, [1.5], ["plain", "bon2", "tts1", "reject4"]
  rows = run(args.model, args.reward, per_class=per_class, cfgs=cfgs, methods=methods, seed=args.seed,
             batch=args.batch, potential=args.potential, crop_scale=args.crop_scale, draw=args.draw,
             schedule=search.parse_schedule(args.schedule) if args.schedule else search.DEFAULT_SCHEDULE)
  print(table(rows))


if __name__ == "__main__":
  main()
