"""Sample images from a var-jax model directory (VQVAE + VAR transformer).

  python sample.py --checkpoint models/var_d16 --classes 207,360 --num_per_class 4 --out out/samples
  python sample.py --checkpoint models/var_d16 --num_per_class 50 --cfg 1.5 --top_k 900 --top_p 0.96 \\
                   --batch_size 64 --out out/fid50k          # 50 per class over all classes: the FID protocol
  python sample.py --checkpoint models/var_d16 --classes 1000 --image photo.png --mask 0.1,0.1,0.8,0.8 \\
                   --edit outpaint --out out/edit            # zero-shot out-painting (class 1000 = null class)

Writes OUT/grid.png (every sample), OUT/images/NNNNNN_classCCC.png and OUT/samples.npz (ADM-style: arr_0 uint8
NHWC, arr_1 labels). The sampler is compiled once ahead of time (persistent compilation cache on) and then run
over batches of --batch_size, which must be a multiple of the number of devices (the batch is split over all
devices). Sample i uses seed --seed + i, so images do not depend on --batch_size or the device count.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from var.sampler import sample_images  # noqa: F401  (the Python entry point: training loop, demo)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python sample.py", description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True, help="model directory (var/pretrained.py; python -m var.convert)")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--classes", default=None, help="comma-separated class ids (num_classes = unconditional); "
                 "default: every class")
  p.add_argument("--num_per_class", type=int, default=1, help="samples per listed class")
  p.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale (ramped over the scales)")
  p.add_argument("--top_k", type=int, default=900, help="keep the k most likely tokens (0 = off)")
  p.add_argument("--top_p", type=float, default=0.96, help="nucleus sampling mass (0 = off)")
  p.add_argument("--temperature", type=float, default=1.0, help="divides the filtered logits")
  p.add_argument("--more_smooth", action="store_true", help="official Gumbel-softmax smoothing (visuals, not FID)")
  p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
  p.add_argument("--batch_size", type=int, default=None, help="samples per step, split over all devices "
                 "(default: min(N, 32) rounded up to the device count)")
  p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                 help="activation dtype of the transformer (default: as saved)")
  p.add_argument("--image", default=None, help="image to edit (zero-shot in/out-painting; resized to the model's "
                 "resolution)")
  p.add_argument("--mask", default=None, help="box y0,x0,y1,x1 in [0, 1] image fractions for --image")
  p.add_argument("--edit", default="outpaint", choices=["outpaint", "inpaint"],
                 help="outpaint: keep the image inside the box; inpaint: regenerate the box")
  p.add_argument("--kv_budget", default=None, help="ScaleKV KV-cache budget: a percentage of the longest re-read "
                 "prefix (10%%), a token count, or a budget JSON from python -m var.kvcompress calibrate")
  p.add_argument("--kv_scorer", default="paper", choices=["paper", "reference"],
                 help="ScaleKV scores: softmax weights of the true queries (paper) or raw logits (official code)")
  p.add_argument("--kv_pooling", default="avg", choices=["avg", "max"], help="ScaleKV score pooling (kernel 5)")
  p.add_argument("--kv_dtype", default=None, choices=["float32", "bfloat16"],
                 help="KV-cache dtype (default: the activation dtype); bfloat16 halves the cache bytes")
  p.add_argument("--decode_dtype", default=None, choices=["float32", "bfloat16"],
                 help="activation dtype of the final VQVAE decode (default: the tokenizer's, float32); bfloat16 is "
                 "faster and changes pixels slightly, never tokens")
  p.add_argument("--prune", default=None, help="FastVAR: SCALE:RATIO,... (scale indices; ratio 1 skips a trailing "
                 "scale) or 'default' for the measured schedule of the model's patch_nums")
  p.add_argument("--prune_layers", default=None, help="FastVAR pruned layers A:B (default: every layer)")
  p.add_argument("--prune_cache_scale", type=int, default=None,
                 help="FastVAR restoration scale (default: the scale before the first pruned one)")
  p.add_argument("--refiner", default=None, help="CoDe: model directory of a small refiner VAR on the same "
                 "tokenizer as --checkpoint (the drafter); the drafter draws the first --draft_steps scales")
  p.add_argument("--draft_steps", type=int, default=None, help="CoDe: scales drawn by the drafter (0..S; default "
                 "S - 2, i.e. 8 on the 256px schedule)")
  p.add_argument("--code_temperatures", action="store_true", help="CoDe's per-scale temperatures (1.1 on the "
                 "first 70%% of the scales, then 1.0) instead of --temperature")
  p.add_argument("--grid_cols", type=int, default=None, help="columns of grid.png (default: num_per_class, or 8)")
  p.add_argument("--grid_scale", type=int, default=None, help="nearest-neighbour upscaling of grid.png tiles "
                 "(default: the smallest factor giving tiles of at least 64 px); grid.txt names each row's classes")
  p.add_argument("--compilation_cache", default=os.path.expanduser("~/.cache/var-jax/jax"),
                 help="persistent XLA compilation cache directory ('' = off)")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  p.add_argument("--search", default=None, choices=["tts", "bon", "is", "reject"],
                 help="test-time search (var/search.py): TTS-VAR, Best-of-N, importance or rejection sampling; "
                 "writes only the chosen image of each requested one")
  p.add_argument("--search_n", type=int, default=None, help="tts: final candidates N per image (default 1); "
                 "bon / is / reject: samples per image (default 4)")
  p.add_argument("--reward", default=None, help="classifier:DIR (python -m var.rewards train-digits-classifier) | "
                 "inception[:WEIGHTS] (default $VARJAX_INCEPTION_WEIGHTS) | module:function")
  p.add_argument("--features", default=None, help="tts clustering features: classifier[:DIR] | inception[:WEIGHTS] "
                 "| module:function (default: the reward's)")
  p.add_argument("--potential", default=None, help="tts resampling potential: value (default), diff, sum, max, topkK")
  p.add_argument("--lambda", dest="lam", type=float, default=None,
                 help="tts / is: weights exp(lambda * potential) (default 10)")
  p.add_argument("--search_schedule", default=None, help="tts candidates per group after each scale, x N (default "
                 "8,8,6,6,6,4,2,2,2,1,1,1,1 mapped onto the model's scales)")
  p.add_argument("--resample_draw", default=None, choices=["replacement", "distinct"],
                 help="tts resampling: i.i.d. with replacement as the paper (default; a candidate drawn twice goes on "
                 "as two with their own random streams) or distinct candidates (without replacement)")
  return p


def _parse_classes(text: str | None, num_classes: int) -> list[int]:
  if text is None:
    return list(range(num_classes))
  try:
    classes = [int(c) for c in text.split(",") if c.strip()]
  except ValueError as e:
    raise ValueError(f"--classes {text!r} must be comma-separated integers, e.g. 207,360") from e
  bad = [c for c in classes if not 0 <= c <= num_classes]
  if bad or not classes:
    raise ValueError(f"--classes {text!r}: class ids {bad} out of range; this model has classes 0..{num_classes - 1} "
                     f"(and {num_classes} = unconditional)")
  return classes


def _parse_box(text: str) -> tuple[float, ...]:
  try:
    box = tuple(float(v) for v in text.split(","))
  except ValueError:
    box = ()
  if len(box) != 4:
    raise ValueError(f"--mask {text!r} must be four numbers y0,x0,y1,x1 in [0, 1], e.g. 0.1,0.1,0.8,0.8")
  return box


def _load_image(path: str, size: int) -> np.ndarray:
  """(size, size, 3) float32 in [-1, 1]: centre crop to a square, then resize (bicubic)."""
  from PIL import Image

  img = Image.open(path).convert("RGB")
  w, h = img.size
  s = min(w, h)
  img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size),
                                                                                           Image.BICUBIC)
  return np.asarray(img, np.float32) / 127.5 - 1.0


def run(args: argparse.Namespace) -> dict:
  """Samples per the parsed arguments; returns a summary dict (paths, timings, sampler trace count)."""
  import jax

  if args.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

  from flax import nnx
  from PIL import Image

  from var import editing, pretrained, sampler
  from var import sharding as shd

  if args.num_per_class < 1:
    raise ValueError(f"--num_per_class {args.num_per_class} must be >= 1")
  if args.refiner is None and (args.draft_steps is not None or args.code_temperatures):
    raise ValueError("--draft_steps and --code_temperatures are CoDe options: give the refiner with --refiner DIR")
  if args.grid_scale is not None and args.grid_scale < 1:
    raise ValueError(f"--grid_scale {args.grid_scale} must be >= 1 (an integer upscaling factor)")
  if (args.image is None) != (args.mask is None):
    raise ValueError("--image and --mask go together (zero-shot editing needs both)")
  box = _parse_box(args.mask) if args.mask else None
  meta = pretrained.read_config(args.checkpoint)
  if not isinstance(meta.get("var"), dict):
    raise ValueError(f"{args.checkpoint} holds no VAR transformer (tokenizer only); convert one with "
                     "python -m var.convert --var var_dXX.pth or train one")
  num_classes = int(meta["var"].get("num_classes", 1000))
  classes = _parse_classes(args.classes, num_classes)
  vocab = int(meta["var"].get("vocab_size", 4096))
  if args.top_k > vocab:
    raise ValueError(f"--top_k {args.top_k} exceeds the model's vocabulary of {vocab} tokens; use --top_k <= {vocab} "
                     "(0 = off)")
  labels = np.repeat(np.asarray(classes, np.int32), args.num_per_class)
  n = labels.shape[0]
  devices = jax.device_count()
  batch = args.batch_size or -(-min(n, 32) // devices) * devices
  if batch % devices:
    raise ValueError(f"--batch_size {batch} is not divisible by the {devices} devices; use a multiple of {devices}")
  if args.refiner is None:
    plan = _build_plan(args, meta["var"], batch)  # technique options are checked before anything loads or compiles
  else:
    plan = _build_code_plan(args, meta["var"], batch)
  sampling = sampler.SamplingConfig(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                                    temperature=args.temperature, more_smooth=args.more_smooth)

  t0 = time.perf_counter()
  if args.refiner is not None:  # CoDe: --checkpoint is the drafter
    from var import code

    var, vae, vae_config = code.load_pair(args.checkpoint, args.refiner, dtype=args.dtype)
  else:
    var, var_config, vae, vae_config = pretrained.load_pretrained(args.checkpoint)
  if args.refiner is None and args.dtype and args.dtype != var_config.dtype:
    from var.model import VAR

    var_config = var_config.__class__(**{**var_config.to_dict(), "dtype": args.dtype})
    with nnx.use_eager_sharding(False):
      fresh = nnx.eval_shape(lambda: VAR(var_config, rngs=nnx.Rngs(0)))
    nnx.update(fresh, nnx.state(var, nnx.Param))
    var = fresh
  load_s = time.perf_counter() - t0
  edit_args = None
  if args.image is not None:
    size = vae_config.image_size
    img = jax.numpy.asarray(_load_image(args.image, size))[None]
    p = vae_config.patch_nums[-1]
    mask = editing.outpaint_mask(p, box) if args.edit == "outpaint" else editing.inpaint_mask(p, box)
    one = editing.edit_inputs(vae, img, mask)
    edit_args = {k: np.repeat(np.asarray(v), batch, axis=0) for k, v in one.items()}

  mesh = shd.make_mesh((devices, 1, 1)) if devices > 1 else None
  from var import search

  spec = search.spec_from_args(args, num_classes=num_classes, image_size=vae_config.image_size,
                               num_scales=len(vae_config.patch_nums))
  if spec is None:
    s = sampler.Sampler(var, vae, sampling, mesh=mesh, plan=plan, kv_dtype=args.kv_dtype,
                        decode_dtype=args.decode_dtype)
  else:
    if args.refiner is not None:
      raise ValueError("--search does not combine with --refiner in sample.py; use the Python API "
                       "(var.search.compose) or drop one of them")
    techniques = None
    if plan is not None:  # ScaleKV / FastVAR under the search's per-scale batches and selections
      from var import plan as plan_lib

      techniques = lambda p: plan_lib.apply_techniques(  # noqa: E731
        p, var.config, kv_budget=args.kv_budget, prune=args.prune, prune_layers=args.prune_layers,
        prune_cache_scale=args.prune_cache_scale,
        kv_options=plan_lib.KVOptions(scorer=args.kv_scorer, pooling=args.kv_pooling))
    s = search.SearchSampler(var, vae, sampling, spec, mesh=mesh, techniques=techniques, kv_dtype=args.kv_dtype,
                             decode_dtype=args.decode_dtype)
  compile_s = s.compile(batch, edit=edit_args is not None)

  seeds = (args.seed + np.arange(n)).astype(np.uint32)
  images = []
  starts = range(0, n, batch)
  if not args.no_progress:
    from tqdm import tqdm

    starts = tqdm(starts, desc=f"sampling {n} images", unit="batch")
  t1 = time.perf_counter()
  for start in starts:
    lab, sd = labels[start:start + batch], seeds[start:start + batch]
    pad = batch - lab.shape[0]
    if pad:  # the last batch is padded to the compiled size; padding samples are dropped
      lab, sd = np.concatenate([lab, np.repeat(lab[-1:], pad)]), np.concatenate([sd, np.repeat(sd[-1:], pad)])
    out = s(lab, sd, edit_args)
    images.append(np.asarray(jax.device_get(out["images"]))[:batch - pad])
  images = np.concatenate(images)
  sample_s = time.perf_counter() - t1

  os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
  u8 = np.clip(np.round(images * 255), 0, 255).astype(np.uint8)  # (N, H, W, 3)
  for i, (im, c) in enumerate(zip(u8, labels, strict=True)):
    Image.fromarray(im).save(os.path.join(args.out, "images", f"{i:06d}_class{c:04d}.png"))
  np.savez(os.path.join(args.out, "samples.npz"), arr_0=u8, arr_1=labels.astype(np.int64))
  cols = args.grid_cols or (args.num_per_class if args.num_per_class > 1 else min(n, 8))
  grid_path = _save_grid(u8, os.path.join(args.out, "grid.png"), cols, args.grid_scale)
  _save_grid_legend(labels, os.path.join(args.out, "grid.txt"), cols)
  return {"num_images": n, "batch_size": batch, "devices": devices, "load_s": load_s, "compile_s": compile_s,
          "sample_s": sample_s, "images_per_s": n / sample_s, "grid": grid_path, "trace_count": s.trace_count,
          "npz": os.path.join(args.out, "samples.npz")}


def _build_plan(args: argparse.Namespace, var_meta: dict, batch: int):
  """The ScalePlan of the technique flags (None = the plain sampler)."""
  from var import plan as plan_lib
  from var.model import VARConfig

  if args.kv_budget is None and args.prune is None:
    if args.prune_layers is not None or args.prune_cache_scale is not None:
      raise ValueError("--prune_layers / --prune_cache_scale need --prune")
    return None
  config = VARConfig.from_dict(var_meta)
  return plan_lib.build(config, batch, cfg=args.cfg, kv_budget=args.kv_budget, prune=args.prune,
                        prune_layers=args.prune_layers, prune_cache_scale=args.prune_cache_scale,
                        kv_options=plan_lib.KVOptions(scorer=args.kv_scorer, pooling=args.kv_pooling))


def _build_code_plan(args: argparse.Namespace, drafter_meta: dict, batch: int):
  """CoDe's plan (drafter --checkpoint, refiner --refiner), with ScaleKV / FastVAR applied in the refiner phase."""
  from var import code, pretrained
  from var import plan as plan_lib
  from var.model import VARConfig

  drafter = VARConfig.from_dict(drafter_meta)
  refiner_meta = pretrained.read_config(args.refiner).get("var")
  if not isinstance(refiner_meta, dict):
    raise ValueError(f"--refiner {args.refiner} holds no VAR transformer")
  refiner = VARConfig.from_dict(refiner_meta)
  patch_nums = drafter.patch_nums
  draft_steps = len(patch_nums) - 2 if args.draft_steps is None else args.draft_steps
  temps = code.code_temperatures(len(patch_nums)) if args.code_temperatures else None
  plan = code.code_plan(patch_nums, batch, draft_steps, args.cfg, temps)
  if args.kv_budget is None and args.prune is None:
    return plan
  return plan_lib.apply_techniques(plan, refiner, model=code.REFINER, kv_budget=args.kv_budget, prune=args.prune,
                                   prune_layers=args.prune_layers, prune_cache_scale=args.prune_cache_scale,
                                   kv_options=plan_lib.KVOptions(scorer=args.kv_scorer, pooling=args.kv_pooling),
                                   depths={code.DRAFTER: drafter.depth, code.REFINER: refiner.depth})


def _save_grid(u8: np.ndarray, path: str, cols: int, scale: int | None = None) -> str:
  from PIL import Image

  if scale is None:  # small images (16px digits) become tiles a person can see
    scale = max(1, -(-64 // min(u8.shape[1:3])))
  u8 = u8.repeat(scale, axis=1).repeat(scale, axis=2)
  n, h, w, _ = u8.shape
  rows = -(-n // cols)
  grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, np.uint8)
  for i, im in enumerate(u8):
    r, c = divmod(i, cols)
    grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = im
  Image.fromarray(grid).save(path)
  return path


def _save_grid_legend(labels: np.ndarray, path: str, cols: int) -> str:
  """grid.txt: one line per row of grid.png naming the classes of its tiles (the grid's caption)."""
  rows = [labels[i:i + cols] for i in range(0, len(labels), cols)]
  lines = [f"row {r}: classes {','.join(str(int(c)) for c in row)}" for r, row in enumerate(rows)]
  with open(path, "w") as f:
    f.write("grid.png, left to right, top to bottom\n" + "\n".join(lines) + "\n")
  return path


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    summary = run(args)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from e
  print(f"wrote {summary['num_images']} images to {args.out} (grid {summary['grid']}, {summary['npz']}): "
        f"compile {summary['compile_s']:.1f}s, {summary['images_per_s']:.3f} images/s on {summary['devices']} "
        "device(s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
