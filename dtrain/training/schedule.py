"""The learning-rate schedule: a pure function of the optimizer step, so a resumed run continues it exactly.

A checkpoint stores the plan it was following (`LRPlan`: total steps, warm-up, final ratio). A resume with
another plan (a new `--max-steps`, `--epochs` or `--warmup-steps`) continues on the new plan from the resumed
step, and says so in one line.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to `min_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass(frozen=True)
class LRPlan:
    total_steps: int
    warmup_steps: int
    min_lr_ratio: float

    def factor(self) -> Callable[[int], float]:
        return warmup_cosine(self.warmup_steps, self.total_steps, self.min_lr_ratio)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "LRPlan | None":
        """The plan a checkpoint stored (None when it stored none: written before plans were saved)."""
        try:
            return cls(int(data["total_steps"]), int(data["warmup_steps"]), float(data["min_lr_ratio"]))
        except (TypeError, KeyError, ValueError):
            return None


def plan_change(saved: LRPlan, plan: LRPlan, step: int, base_lr: float) -> str | None:
    """One line saying how the schedule continues at `step` when the plan changed; None when it did not."""
    if saved == plan:
        return None
    names = {"total_steps": "total steps", "warmup_steps": "warm-up steps", "min_lr_ratio": "final lr ratio"}
    changes = ", ".join(f"{names[k]} {getattr(saved, k)} -> {getattr(plan, k)}"
                        for k in names if getattr(saved, k) != getattr(plan, k))
    was, now = base_lr * saved.factor()(step), base_lr * plan.factor()(step)
    end = base_lr * plan.min_lr_ratio
    return (f"learning-rate plan changed ({changes}): from step {step} the schedule continues on the new plan, "
            f"lr {was:.3g} -> {now:.3g} now, decaying to {end:.3g} at step {plan.total_steps}")
