"""ScalePlan: the static, per-scale decisions the sampling loop (var/sampler.py) reads at every scale.

Contract
--------
A `ScalePlan` is a tuple of `ScaleStep`s, one per scale of the model's `patch_nums`, built from Python values
BEFORE tracing (everything in it is hashable and static: it is part of the jit cache key). Inference techniques
contribute fields to the plan and supply the data-dependent parts as pure functions (`SamplerHooks`); the loop is
never rewritten for them. Per scale `si` the loop does, in this order:

1. `model`: runs the transformer named `step.model` (a key of the models given to the sampler; "main" by
   default). When the model differs from the previous scale's, the new model first PREFILLS its own KV cache with
   one block-causal forward over every token so far (the CoDe drafter -> refiner hand-over), then continues with
   cached steps.
2. `cfg_on`: True runs 2B rows (cond rows 0..B-1, then uncond rows B..2B-1) and mixes the logits with the CFG ramp;
   False runs only the B cond rows (their logits are used as is). Once off it stays off (the uncond cache rows are
   not maintained any more; SkipVAR's "cond-only tail").
3. `prune`: None runs every token of the scale. A `PruneStep` (FastVAR, var/pruning.py) forwards only `keep` of
   the scale's tokens in the layers [first, last) (pivotal token selection before each sub-layer; the other
   tokens get the same layer's branch output recorded at scale `cache_scale`, area-upsampled), and those layers
   append only the kept tokens' keys/values to their cache. `skip=True` (a prune ratio of 1) runs no transformer
   at the scale and draws no tokens (its tokens read -1); only trailing scales can be skipped, the image is the
   decode of f_hat after the last executed scale.
4. `kv_capacity`: None keeps the whole cache. A per-layer tuple of ints = the number of cached tokens each layer
   keeps AFTER this scale (ScaleKV, var/kvcompress.py, options in `ScalePlan.kv`): right after a layer's
   attention, its cache [held ; this scale] is cut to that many tokens (the observation window always kept, the
   rest by score, per row and head). Every layer's cache is an array of exactly its own length: layers of equal
   length form one run, scanned over its own stacked cache; nothing is masked.
5. `select`: None keeps all candidates. A `SelectStep(kind, keep)` calls `hooks.select[kind](ctx, key)` after the
   scale; it returns `keep` row indices, or `(indices, carry)` where `carry` is a pytree of per-candidate arrays
   (leading axis = the current batch; e.g. a reward history) that the loop gathers with the rows and hands to the
   next select as `ctx['carry']` (None before the first). The loop gathers every per-candidate array (f_hat, next
   input, tokens, labels, seeds, cache rows idx and B + idx of every model). TTS-VAR's descending batch is
   exactly this.
6. `batch`: the number of candidates FORWARDED at this scale. It may only change right after a select step and
   must equal the previous step's `select.keep`.
7. `temperature`: None uses `SamplingConfig.temperature`; a float overrides it at this scale (CoDe's per-scale
   temperatures). Either way it divides the top-k/top-p-masked logits.

`ScalePlan.plain(...)` is the official sampler: one model, full cache, no pruning, fixed batch, CFG on every
scale (off everywhere for cfg == 0, which is numerically the same as the official always-on branch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class PruneStep:
  """FastVAR cached token pruning at one scale: forward `keep` of the scale's tokens in the layers
  [first, last), restore the rest from the branch outputs recorded at scale `cache_scale`."""
  keep: int
  first: int
  last: int
  cache_scale: int

  @property
  def layers(self) -> range:
    return range(self.first, self.last)


@dataclasses.dataclass(frozen=True)
class KVOptions:
  """How ScaleKV scores the cached tokens (spec ACCELERATION.md 2.4; var/kvcompress.py).

  scorer 'paper': softmax attention weights of the true queries (the paper); 'reference': raw logits of the
  un-normalised queries (the official code). pooling 'avg' (the paper) | 'max' (the official code), kernel odd."""
  scorer: str = "paper"
  pooling: str = "avg"
  kernel: int = 5

  def __post_init__(self):
    if self.scorer not in ("paper", "reference"):
      raise ValueError(f"kv scorer {self.scorer!r}: use 'paper' or 'reference'")
    if self.pooling not in ("avg", "max"):
      raise ValueError(f"kv pooling {self.pooling!r}: use 'avg' or 'max'")
    if self.kernel < 1 or self.kernel % 2 == 0:
      raise ValueError(f"kv pooling kernel {self.kernel} must be a positive odd number")


@dataclasses.dataclass(frozen=True)
class SelectStep:
  """Candidate selection after a scale: `kind` names a function in `SamplerHooks.select`; `keep` candidates
  survive."""
  kind: str
  keep: int


@dataclasses.dataclass(frozen=True)
class ScaleStep:
  """The static decisions of one scale (see the module docstring for how the loop applies them)."""
  batch: int
  model: str = "main"
  cfg_on: bool = True
  prune: PruneStep | None = None
  kv_capacity: tuple[int, ...] | None = None
  select: SelectStep | None = None
  temperature: float | None = None
  skip: bool = False


@dataclasses.dataclass(frozen=True)
class ScalePlan:
  steps: tuple[ScaleStep, ...]
  kv: KVOptions = KVOptions()

  def __len__(self) -> int:
    return len(self.steps)

  def __getitem__(self, si: int) -> ScaleStep:
    return self.steps[si]

  @property
  def batch(self) -> int:
    """Candidates at the first scale (= rows of the inputs: labels, seeds)."""
    return self.steps[0].batch

  @property
  def out_batch(self) -> int:
    """Images returned: the last step's batch after its selection."""
    last = self.steps[-1]
    return last.select.keep if last.select else last.batch

  @property
  def models(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s.model for s in self.steps))

  @classmethod
  def plain(cls, num_scales: int, batch: int, cfg: float = 1.5) -> ScalePlan:
    """The official sampler's plan."""
    return cls(tuple(ScaleStep(batch=batch, cfg_on=cfg != 0) for _ in range(num_scales)))

  def replace(self, si: int, **fields) -> ScalePlan:
    """A copy with the given fields of step si changed."""
    steps = list(self.steps)
    steps[si] = dataclasses.replace(steps[si], **fields)
    return dataclasses.replace(self, steps=tuple(steps))

  def validate(self, patch_nums: Sequence[int], depths: dict[str, int], hooks=None) -> None:
    """Raises a ValueError naming the bad step and the fix when the plan cannot run."""
    if len(self.steps) != len(patch_nums):
      raise ValueError(f"the plan has {len(self.steps)} steps but the model has {len(patch_nums)} scales "
                       f"(patch_nums {tuple(patch_nums)}); build one ScaleStep per scale")
    seen_off = False
    for si, (step, pn) in enumerate(zip(self.steps, patch_nums, strict=True)):
      where = f"plan step {si} (pn={pn})"
      if step.batch < 1:
        raise ValueError(f"{where}: batch {step.batch} must be >= 1")
      if si > 0:
        prev = self.steps[si - 1]
        expected = prev.select.keep if prev.select else prev.batch
        if step.batch != expected:
          raise ValueError(f"{where}: batch {step.batch} but the previous step leaves {expected} candidates; the "
                           "batch only changes through a SelectStep on the previous scale")
      if step.model not in depths:
        raise ValueError(f"{where}: model {step.model!r} not given to the sampler (models: {sorted(depths)})")
      if seen_off and step.cfg_on:
        raise ValueError(f"{where}: cfg_on switches back on after being off; the uncond cache rows are gone")
      seen_off |= not step.cfg_on
      if step.skip:
        if si == 0:
          raise ValueError(f"{where}: scale 0 cannot be skipped (nothing would be drawn)")
        if any(not later.skip for later in self.steps[si + 1:]):
          raise ValueError(f"{where}: only trailing scales can be skipped (a later scale is not); skip every "
                           "scale from here on, or prune this one with a ratio < 1")
        if step.prune or step.kv_capacity or step.select:
          raise ValueError(f"{where}: a skipped scale runs nothing; drop its prune / kv_capacity / select")
      if step.prune is not None:
        self._validate_prune(si, step, pn, depths[step.model], where)
      if step.kv_capacity is not None:
        if len(step.kv_capacity) != depths[step.model]:
          raise ValueError(f"{where}: kv_capacity has {len(step.kv_capacity)} entries for a "
                           f"{depths[step.model]}-layer model")
        if si == len(self.steps) - 1:
          raise ValueError(f"{where}: no compression after the last scale (nothing reads that cache); drop it")
        if min(step.kv_capacity) < 1:
          raise ValueError(f"{where}: kv_capacity {step.kv_capacity} has a capacity below 1")
      if step.temperature is not None and not step.temperature > 0:
        raise ValueError(f"{where}: temperature {step.temperature} must be > 0 (or None for the sampler's)")
      if step.select is not None:
        if not 1 <= step.select.keep <= step.batch:
          raise ValueError(f"{where}: select keeps {step.select.keep} of {step.batch} candidates")
        if hooks is not None and step.select.kind not in hooks.select:  # None: hooks come later
          raise ValueError(f"{where}: select kind {step.select.kind!r} has no function in SamplerHooks.select")

  def _validate_prune(self, si: int, step: ScaleStep, pn: int, depth: int, where: str) -> None:
    p = step.prune
    if not 0 <= p.first < p.last <= depth:
      raise ValueError(f"{where}: pruned layers {p.first}:{p.last} are outside the {depth}-layer model; use "
                       f"A:B with 0 <= A < B <= {depth}")
    if not 1 <= p.keep <= pn * pn:
      raise ValueError(f"{where}: prune keeps {p.keep} of {pn * pn} tokens; keep 1..{pn * pn} (skip the scale "
                       "to keep none)")
    cs = p.cache_scale
    if not 0 < cs < si:
      raise ValueError(f"{where}: prune cache scale {cs} must be an earlier scale > 0 (the scale whose branch "
                       "outputs restore the pruned tokens)")
    src = self.steps[cs]
    if src.prune is not None or src.skip:
      raise ValueError(f"{where}: prune cache scale {cs} is itself pruned or skipped; its branch outputs must "
                       "come from a full forward")
    if any(self.steps[j].model != step.model for j in range(cs, si + 1)):
      raise ValueError(f"{where}: the prune cache scale {cs} must be run by the same model with no model switch "
                       "in between")
    for j in range(si):
      other = self.steps[j].prune
      if other is not None and (other.cache_scale, other.first, other.last) != (cs, p.first, p.last):
        raise ValueError(f"{where}: every pruned scale must share one cache scale and layer range (scale {j} "
                         f"uses {other.cache_scale} / {other.first}:{other.last})")


def build(config, batch: int, *, cfg: float = 1.5, kv_budget=None, kv_options: KVOptions = KVOptions(),
          prune=None, prune_layers=None, prune_cache_scale: int | None = None, model: str = "main") -> ScalePlan:
  """A plan from technique options, validated before anything is compiled.

  config: the VARConfig (patch_nums, depth); batch: candidates; cfg: 0 turns the uncond rows off.
  kv_budget (ScaleKV): None (full cache) | "10%" / 0.1 (of the longest re-read prefix) | a token count | a
    budget JSON path (var.kvcompress: uniform or calibrated drafter/refiner capacities).
  prune (FastVAR): None | "default" (var.pruning.default_schedule) | {scale index: ratio} | "SCALE:RATIO,...";
    ratio 0 leaves a scale unpruned, 1 skips it (trailing scales only).
  prune_layers: "A:B" or (A, B), the pruned layers [A, B) (default: the schedule's, else every layer);
  prune_cache_scale: the scale whose branch outputs restore pruned tokens (default: the one before the first
    pruned scale).

  e.g. build(var.config, 8, kv_budget="10%", prune={8: 0.5, 9: 0.75})."""
  plan = ScalePlan.plain(len(config.patch_nums), batch, cfg)
  plan = dataclasses.replace(plan, steps=tuple(dataclasses.replace(s, model=model) for s in plan.steps))
  return apply_techniques(plan, config, model=model, kv_budget=kv_budget, kv_options=kv_options, prune=prune,
                          prune_layers=prune_layers, prune_cache_scale=prune_cache_scale)


def apply_techniques(plan: ScalePlan, config, *, model: str = "main", kv_budget=None,
                     kv_options: KVOptions = KVOptions(), prune=None, prune_layers=None,
                     prune_cache_scale: int | None = None, depths: dict[str, int] | None = None) -> ScalePlan:
  """Adds ScaleKV capacities and FastVAR pruning (options as in `build`) to the steps of `model` (config: that
  model's VARConfig): e.g. the refiner phase of a CoDe plan. Pruned scales and their cache scale must be the
  model's; the KV budget applies to the model's scales only. Validated (depths: every model of the plan)."""
  from var import kvcompress, pruning

  patch_nums, depth = tuple(config.patch_nums), config.depth
  num_scales = len(patch_nums)
  mine = [si for si in range(num_scales) if plan[si].model == model]
  if not mine:
    raise ValueError(f"the plan runs no scale with model {model!r} (models: {plan.models})")
  plan = dataclasses.replace(plan, kv=kv_options)
  if kv_budget is not None:
    budget = kvcompress.parse_budget(kv_budget)
    if budget.path is not None:
      caps = kvcompress.load_budgets(budget.path, depth, patch_nums)
    else:
      caps = kvcompress.uniform_capacities(patch_nums, depth, budget)
    for si, cap in caps.items():
      if si in mine and si + 1 in mine:  # only caches the same model reads on
        plan = plan.replace(si, kv_capacity=tuple(int(c) for c in cap))
  if prune is not None:
    if prune == "default":
      sched = pruning.default_schedule(patch_nums, depth)
      ratios = sched["ratios"]
      layers = pruning.parse_layers(prune_layers, depth) if prune_layers is not None else sched["layers"]
      cache_scale = sched["cache_scale"] if prune_cache_scale is None else prune_cache_scale
    else:
      ratios = pruning.parse_prune(prune)
      layers = pruning.parse_layers(prune_layers, depth)
      cache_scale = prune_cache_scale
    for si in ratios:
      if not 0 <= si < num_scales:
        raise ValueError(f"prune scale {si} is out of range: the model has scales 0..{num_scales - 1} "
                         f"(patch_nums {patch_nums})")
      if si == 0:
        raise ValueError("prune scale 0 cannot be pruned (its single map is what every later scale builds on); "
                         "prune later scales")
      if si not in mine:
        raise ValueError(f"prune scale {si} is run by model {plan[si].model!r}, not {model!r}; prune scales "
                         f"{mine[0]}..{mine[-1]}")
    pruned = sorted(si for si, r in ratios.items() if r > 0)
    if pruned:
      if cache_scale is None:
        cache_scale = pruned[0] - 1
      if not 0 < cache_scale < num_scales:
        raise ValueError(f"prune cache scale {cache_scale} is out of range: use a scale in 1..{pruned[0] - 1}")
      if cache_scale in pruned:
        raise ValueError(f"prune cache scale {cache_scale} is itself pruned; the cache scale must run every token "
                         "(use a scale before the first pruned one)")
      if cache_scale > pruned[0]:
        raise ValueError(f"prune cache scale {cache_scale} comes after the pruned scale {pruned[0]}; use a scale "
                         f"before it (e.g. {pruned[0] - 1})")
    for si in pruned:
      pn = patch_nums[si]
      if ratios[si] >= 1.0:
        plan = plan.replace(si, skip=True, kv_capacity=None)
      else:
        keep = pruning.keep_count(pn * pn, ratios[si])
        plan = plan.replace(si, prune=PruneStep(keep=keep, first=layers[0], last=layers[1], cache_scale=cache_scale))
    last_run = max((si for si in range(num_scales) if not plan[si].skip), default=0)
    if last_run < num_scales - 1 and plan[last_run].kv_capacity is not None:
      plan = plan.replace(last_run, kv_capacity=None)  # nothing reads the cache after the last executed scale
  plan.validate(patch_nums, depths or {model: depth})
  return plan
