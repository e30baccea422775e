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
3. `prune`: None runs every token of the scale. A `PruneStep` (FastVAR: keep count, pruned layers, restoration
   cache scale) makes the loop call `hooks.scale_forward` instead of the plain cached forward for this scale.
4. `kv_capacity`: None keeps the whole cache. A per-layer tuple of ints = the number of cached tokens each layer
   keeps AFTER this scale (ScaleKV). The loop calls `hooks.compress_kv(cache, lens, si, step)`, which returns the
   cache with every layer's kept tokens first; the loop then tracks every layer's static valid length, writes the
   next scale's keys/values right after them and masks the unused slots.
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
  """FastVAR cached token pruning at one scale: forward `keep` of the scale's tokens in `layers`, restore the
  rest from the branch outputs cached at scale `cache_scale`."""
  keep: int
  layers: tuple[int, ...]
  cache_scale: int


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


@dataclasses.dataclass(frozen=True)
class ScalePlan:
  steps: tuple[ScaleStep, ...]

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
    return ScalePlan(tuple(steps))

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
      if step.prune is not None and (hooks is None or hooks.scale_forward is None):
        raise ValueError(f"{where}: prune={step.prune} needs SamplerHooks.scale_forward (e.g. from a FastVAR "
                         "module)")
      if step.kv_capacity is not None:
        if len(step.kv_capacity) != depths[step.model]:
          raise ValueError(f"{where}: kv_capacity has {len(step.kv_capacity)} entries for a "
                           f"{depths[step.model]}-layer model")
        if hooks is None or hooks.compress_kv is None:
          raise ValueError(f"{where}: kv_capacity needs SamplerHooks.compress_kv (e.g. from a ScaleKV module)")
      if step.temperature is not None and not step.temperature > 0:
        raise ValueError(f"{where}: temperature {step.temperature} must be > 0 (or None for the sampler's)")
      if step.select is not None:
        if not 1 <= step.select.keep <= step.batch:
          raise ValueError(f"{where}: select keeps {step.select.keep} of {step.batch} candidates")
        if hooks is None or step.select.kind not in hooks.select:
          raise ValueError(f"{where}: select kind {step.select.kind!r} has no function in SamplerHooks.select")
