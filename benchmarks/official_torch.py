"""Times the official PyTorch VAR (a local checkout of github.com/FoundationVision/VAR) on random weights.

Run by benchmarks/bench_official.py with an interpreter that has torch (this file imports no JAX and nothing of
var-jax, so it runs in a separate venv); by hand:

  /path/to/torch-venv/bin/python benchmarks/official_torch.py --repo /path/to/VAR --what sample --depth 16 --batch 8

--what sample: `VAR.autoregressive_infer_cfg` (cfg 1.5, top-k 900, top-p 0.96, VQVAE decode included), the call
  the official demo and FID script make. --what train: `trainer.VARTrainer.train_step` with the official optimizer
  set-up of train.py (AdamW betas (0.9, 0.95), the no-weight-decay groups of `filter_params`, grad clip 2, fp32,
  no label smoothing): tokenising by the frozen VQVAE, forward, backward, update.
Prints one JSON line: the seconds of each timed call after --warmup untimed ones.
"""

import argparse
import json
import os
import sys
import time


def build(repo: str, depth: int, seed: int):
  sys.path.insert(0, repo)
  import torch
  from models import build_vae_var

  torch.manual_seed(seed)
  vae, var = build_vae_var(device="cpu", patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), V=4096, Cvae=32, ch=160,
                           share_quant_resi=4, num_classes=1000, depth=depth, shared_aln=False, attn_l2_norm=True,
                           flash_if_available=False, fused_if_available=False)
  return vae, var


def time_sample(vae, var, batch: int, iters: int, warmup: int) -> list[float]:
  import torch

  var.eval()
  labels = torch.arange(batch) % 1000
  times = []
  with torch.inference_mode():
    for i in range(warmup + iters):
      t0 = time.perf_counter()
      var.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=i, cfg=1.5, top_k=900, top_p=0.96,
                                   more_smooth=False)
      if i >= warmup:
        times.append(time.perf_counter() - t0)
  return times


def time_train(vae, var, batch: int, iters: int, warmup: int) -> list[float]:
  import builtins

  import torch
  from trainer import VARTrainer
  from utils.amp_sc import AmpOptimizer
  from utils.lr_control import filter_params
  from utils.misc import MetricLogger

  nowd = {"cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start", "start_pos",
          "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul"}  # train.py's list
  # filter_params prints with print(..., force=True): the official launcher installs a print that takes `force`
  plain_print = builtins.print
  builtins.print = lambda *a, force=False, **kw: plain_print(*a, **kw)
  try:
    names, paras, groups = filter_params(var, nowd_keys=nowd)
  finally:
    builtins.print = plain_print
  opt = AmpOptimizer(mixed_precision=0, optimizer=torch.optim.AdamW(groups, lr=1e-4 * batch / 256, weight_decay=0,
                                                                   betas=(0.9, 0.95)),
                     names=names, paras=paras, grad_clip=2.0)
  patch_nums = var.patch_nums
  trainer = VARTrainer(device="cpu", patch_nums=patch_nums, resos=tuple(p * 16 for p in patch_nums), vae_local=vae,
                       var_wo_ddp=var, var=var, var_opt=opt, label_smooth=0.0)
  var.train()
  gen = torch.Generator().manual_seed(0)
  images = torch.rand(batch, 3, 256, 256, generator=gen) * 2 - 1
  labels = torch.randint(0, 1000, (batch,), generator=gen)
  logger = MetricLogger(delimiter="  ")  # its log_iters stay empty: no logging work inside the timed steps
  times = []
  for i in range(warmup + iters):
    t0 = time.perf_counter()
    # it / g_it 1: past the step-0 logging and tensorboard branches; prog_si -1: the full pyramid
    trainer.train_step(it=1, g_it=1, stepping=True, metric_lg=logger, tb_lg=None, inp_B3HW=images, label_B=labels,
                       prog_si=-1, prog_wp_it=1.0)
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return times


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repo", required=True, help="a checkout of the official VAR repository")
  p.add_argument("--what", choices=["sample", "train"], required=True)
  p.add_argument("--depth", type=int, default=16)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--iters", type=int, default=1)
  p.add_argument("--warmup", type=int, default=0)
  p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
  args = p.parse_args()
  if not os.path.isfile(os.path.join(args.repo, "models", "var.py")):
    p.error(f"--repo {args.repo!r} is not a checkout of the official VAR repository (no models/var.py)")
  import torch

  if args.threads:
    torch.set_num_threads(args.threads)
  t0 = time.perf_counter()
  vae, var = build(args.repo, args.depth, seed=0)
  build_s = time.perf_counter() - t0
  fn = time_sample if args.what == "sample" else time_train
  times = fn(vae, var, args.batch, args.iters, args.warmup)
  print(json.dumps({"official": args.what, "depth": args.depth, "batch": args.batch, "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "build_s": round(build_s, 2),
                    "seconds": [round(t, 3) for t in times]}), flush=True)


if __name__ == "__main__":
  main()
