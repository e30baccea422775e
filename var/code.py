"""CoDe, collaborative decoding (specs/ACCELERATION.md section 5): a large drafter VAR draws the first N scales, a
small refiner VAR on the same tokenizer draws the rest.

The sampling loop itself is var/sampler.py: a `ScalePlan` whose steps switch `model` from "drafter" to "refiner"
at scale N makes the refiner prefill its own KV cache with one block-causal forward over the `cum[N]` tokens drawn
so far (its own class/SOS token, its own word embedding of the drafter's next-scale inputs, its own level/position
embeddings), then continue with cached steps. This module adds what makes that a feature:

* `code_plan(patch_nums, batch, draft_steps, cfg, temperatures)`: the plan (N = 0 refiner only, N = S drafter only);
* `code_temperatures(num_scales)` and `PRESETS`: CoDe's sampling options (top_k 600, top_p 0.95 demo / 0.96 FID,
  temperature 1.1 on the early scales, 1.0 on the late ones). The sampler masks the untempered CFG logits with
  top-k/top-p and divides by the temperature afterwards, which is CoDe's order;
* `code_sampler(drafter, refiner, vae, ...)`: a `var.sampler.Sampler` over {"drafter": ..., "refiner": ...};
* `load_pair(drafter_dir, refiner_dir)`: two model directories, checked to share the tokenizer (patch_nums,
  vocabulary, z channels, classes, tokenizer config and a checksum of the tokenizer weights).

  models, vae, _ = load_pair("models/var_d30", "models/var_d16")
  sampler = code_sampler(models["drafter"], models["refiner"], vae, draft_steps=8, batch=64, sampling="fid")
  out = sampler(labels, seeds)  # {'images': (64, 256, 256, 3), 'tokens': (64, 680), 'f_hat': ...}
"""

from __future__ import annotations

import hashlib
import operator
import os
from collections.abc import Sequence

import numpy as np
from flax import nnx

from var.plan import ScalePlan, ScaleStep
from var.sampler import Sampler, SamplerHooks, SamplingConfig

DRAFTER, REFINER = "drafter", "refiner"

# CoDe's sampling options (spec 5.2): the demo script and the FID run. The per-scale temperatures are part of the
# plan (code_temperatures), so the SamplingConfig's own temperature stays 1.0.
PRESETS = {
  "demo": SamplingConfig(cfg=4.0, top_k=600, top_p=0.95),
  "fid": SamplingConfig(cfg=1.5, top_k=600, top_p=0.96),
}

# CoDe's temperature schedule for the 10-scale 256px schedule: 1.1 on the first 7 scales, 1.0 on the last 3.
HOT_TEMPERATURE = 1.1
HOT_FRACTION = 0.7


def code_temperatures(num_scales: int, hot: float = HOT_TEMPERATURE) -> tuple[float, ...]:
  """CoDe's per-scale temperatures: `hot` on the first round(0.7 S) scales, 1.0 after.

  For the 10-scale 256px (and 512px) schedule this is exactly CoDe's list (1.1 for 7 scales, then 1.0 for 3). CoDe
  only ships that schedule; for other schedules we keep the same fraction of early scales hot (e.g. 3 of 4)."""
  if num_scales < 1:
    raise ValueError(f"num_scales={num_scales} must be >= 1")
  n_hot = int(round(HOT_FRACTION * num_scales))
  return (float(hot),) * n_hot + (1.0,) * (num_scales - n_hot)


def sampling_preset(name: str) -> SamplingConfig:
  """CoDe's SamplingConfig preset by name: 'demo' (cfg 4, top_k 600, top_p 0.95) or 'fid' (cfg 1.5, top_k 600,
  top_p 0.96)."""
  if name not in PRESETS:
    raise ValueError(f"unknown CoDe sampling preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name]


def _draft_steps(draft_steps, num_scales: int, patch_nums) -> int:
  if isinstance(draft_steps, bool):
    raise ValueError(f"draft_steps={draft_steps!r} must be an integer in 0..{num_scales}")
  try:
    n = operator.index(draft_steps)
  except TypeError:
    raise ValueError(f"draft_steps={draft_steps!r} must be an integer in 0..{num_scales}") from None
  if not 0 <= n <= num_scales:
    raise ValueError(f"draft_steps={n} is out of range for the {num_scales}-scale schedule {tuple(patch_nums)}: "
                     f"use 0..{num_scales} (the drafter draws scales 0..N-1, the refiner N..{num_scales - 1}; "
                     f"0 = refiner only, {num_scales} = drafter only; CoDe uses 6..9 on the 256px schedule)")
  return n


def code_plan(patch_nums: Sequence[int], batch: int, draft_steps: int, cfg: float = 1.5,
              temperatures: Sequence[float] | None = None) -> ScalePlan:
  """The CoDe plan: scales 0..N-1 run model "drafter", scales N..S-1 model "refiner" (N = draft_steps).

  cfg only decides whether the CFG rows run (cfg != 0), as in `ScalePlan.plain`; temperatures (one per scale,
  e.g. `code_temperatures(S)`) override the sampler's temperature per scale, None keeps it everywhere. Compose
  with other techniques by `plan.replace(si, ...)` on the refiner's steps."""
  s = len(patch_nums)
  n = _draft_steps(draft_steps, s, patch_nums)
  if temperatures is None:
    temps = (None,) * s
  else:
    temps = tuple(float(t) for t in temperatures)
    if len(temps) != s:
      raise ValueError(f"got {len(temps)} temperatures for the {s}-scale schedule {tuple(patch_nums)}; give one "
                       "per scale (e.g. code_temperatures(num_scales)) or None")
    bad = [t for t in temps if not t > 0]
    if bad:
      raise ValueError(f"temperatures {bad} must be > 0")
  return ScalePlan(tuple(ScaleStep(batch=batch, model=DRAFTER if si < n else REFINER, cfg_on=cfg != 0,
                                   temperature=temps[si]) for si in range(s)))


def check_pair(drafter_config, refiner_config) -> None:
  """Raises a ValueError naming the first field (patch_nums, vocab_size, z_channels, num_classes) on which two
  VAR configs differ: a drafter and a refiner must read and write the same token maps and classes."""
  for field, what in (("patch_nums", "patch_nums"), ("vocab_size", "vocabulary"), ("z_channels", "z channels"),
                      ("num_classes", "classes")):
    a, b = getattr(drafter_config, field), getattr(refiner_config, field)
    if a != b:
      raise ValueError(f"the drafter and the refiner differ in {what} ({field} {a} vs {b}); CoDe pairs two VARs "
                       "trained on the same tokenizer (e.g. var_d30 + var_d16 on vae_ch160v4096z32)")


def code_sampler(drafter, refiner, vae, *, draft_steps: int, batch: int, sampling: SamplingConfig | str = "fid",
                 temperatures: Sequence[float] | str | None = "code", hooks: SamplerHooks | None = None,
                 mesh=None, return_logits: bool = False) -> Sampler:
  """A `var.sampler.Sampler` running CoDe: the drafter on scales 0..N-1, the refiner (which prefills its cache at
  the hand-over) on scales N..S-1, for `batch` samples per call.

  sampling: a SamplingConfig or a preset name ('fid', 'demo'); temperatures: 'code' (CoDe's per-scale schedule,
  `code_temperatures`), a sequence (one per scale) or None (the SamplingConfig's temperature everywhere)."""
  check_pair(drafter.config, refiner.config)
  if isinstance(sampling, str):
    sampling = sampling_preset(sampling)
  patch_nums = drafter.config.patch_nums
  if isinstance(temperatures, str):
    if temperatures != "code":
      raise ValueError(f"temperatures={temperatures!r}: use 'code', a sequence of floats or None")
    temperatures = code_temperatures(len(patch_nums))
  plan = code_plan(patch_nums, batch, draft_steps, sampling.cfg, temperatures)
  return Sampler({DRAFTER: drafter, REFINER: refiner}, vae, sampling, plan=plan, hooks=hooks, mesh=mesh,
                 return_logits=return_logits)


# ----------------------------------------------------------------------------------------------------------------
# A drafter/refiner pair from two model directories

def tokenizer_checksum(vae) -> str:
  """sha256 over the tokenizer's parameters (paths, dtypes, shapes and values, in path order): equal for the same
  weights however they were saved."""
  h = hashlib.sha256()
  flat = sorted(((tuple(str(p) for p in path), v.get_value()) for path, v in
                 nnx.to_flat_state(nnx.state(vae, nnx.Param))), key=lambda kv: kv[0])
  for path, value in flat:
    a = np.ascontiguousarray(np.asarray(value))
    h.update(repr((path, a.dtype.str, a.shape)).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def with_dtype(var, config, dtype: str | None):
  """The same weights with another activation dtype (a config field, so the model is rebuilt abstractly)
  -> (VAR, VARConfig); no-op when dtype is None or already the model's."""
  if not dtype or dtype == config.dtype:
    return var, config
  from var.model import VAR

  config = config.__class__(**{**config.to_dict(), "dtype": dtype})
  with nnx.use_eager_sharding(False):
    fresh = nnx.eval_shape(lambda: VAR(config, rngs=nnx.Rngs(0)))
  nnx.update(fresh, nnx.state(var, nnx.Param))
  return fresh, config


def check_shared_tokenizer(dir_a: str | os.PathLike, dir_b: str | os.PathLike,
                           names: tuple[str, str] = (DRAFTER, REFINER)):
  """Raises a ValueError unless two model directories hold the same tokenizer (config and weights checksum);
  returns the first directory's (VQVAE, VQVAEConfig). `names` say what the directories are in the error."""
  from var import pretrained

  where = f"{names[0]} {os.fspath(dir_a)} and {names[1]} {os.fspath(dir_b)}"
  tok_a, tok_b = (pretrained.read_config(d)["tokenizer"] for d in (dir_a, dir_b))
  diff = sorted(k for k in set(tok_a) | set(tok_b) if tok_a.get(k) != tok_b.get(k))
  if diff:
    raise ValueError(f"{where} have different tokenizer configs (fields {diff}: "
                     f"{[(tok_a.get(k), tok_b.get(k)) for k in diff]}); CoDe needs both VARs on the same tokenizer")
  vae, vae_config = pretrained.load_tokenizer(dir_a)
  sums = tokenizer_checksum(vae), tokenizer_checksum(pretrained.load_tokenizer(dir_b)[0])
  if sums[0] != sums[1]:
    raise ValueError(f"{where} have the same tokenizer config but different tokenizer weights (checksum "
                     f"{sums[0][:12]} vs {sums[1][:12]}); CoDe needs both VARs trained on the same tokenizer")
  return vae, vae_config


def load_pair(drafter_dir: str | os.PathLike, refiner_dir: str | os.PathLike, *, dtype: str | None = None):
  """Loads a CoDe pair from two model directories -> ({"drafter": VAR, "refiner": VAR}, VQVAE, VQVAEConfig).

  The two directories must share the tokenizer: their VARs must agree on patch_nums, vocabulary, z channels and
  classes, and their tokenizers on the config and the weights (checksum); otherwise a ValueError names the
  mismatch. dtype ('float32' / 'bfloat16') overrides both models' activation dtype."""
  from var import pretrained
  from var.model import VARConfig

  configs = {}
  for role, directory in ((DRAFTER, drafter_dir), (REFINER, refiner_dir)):
    meta = pretrained.read_config(directory)
    if not isinstance(meta.get("var"), dict):
      raise ValueError(f"the {role} directory {directory} holds no VAR transformer (tokenizer only)")
    configs[role] = VARConfig.from_dict(meta["var"])
  try:
    check_pair(configs[DRAFTER], configs[REFINER])
  except ValueError as e:
    raise ValueError(f"drafter {os.fspath(drafter_dir)} and refiner {os.fspath(refiner_dir)}: {e}") from None
  vae, vae_config = check_shared_tokenizer(drafter_dir, refiner_dir)
  models = {}
  for role, directory in ((DRAFTER, drafter_dir), (REFINER, refiner_dir)):
    var, config = pretrained.load_var(directory)
    models[role], _ = with_dtype(var, config, dtype)
  return models, vae, vae_config
