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


class LearningRate:
    """The learning rate as a pure function of the optimizer step, set into the optimizer's param groups right
    before each optimizer step (as nanoGPT does): whatever a checkpoint or a scheduler left in the optimizer, step
    S always trains with `initial_lr * plan(S)`, so a resume with another plan needs no repair.

    Each param group's `initial_lr` is its base rate (torch's schedulers keep it under the same name, so the
    optimizer state of a checkpoint carries it). A scheduler may still be prepared for Accelerate's checkpoint
    layout; it computes the same values.
    """

    def __init__(self, optimizer, plan: LRPlan):
        self.optimizer = optimizer
        self.plan = plan
        self._factor = plan.factor()
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def at(self, step: int) -> list[float]:
        """The learning rate of each param group for optimizer step `step` (0-based)."""
        return [group["initial_lr"] * self._factor(step) for group in self.optimizer.param_groups]

    def apply(self, step: int) -> None:
        """Sets the rates of optimizer step `step` into the param groups."""
        for group, lr in zip(self.optimizer.param_groups, self.at(step)):
            group["lr"] = lr

    def planned(self, step: int) -> list[float]:
        """The rates of the next two steps (for the resume certificate: a changed plan shows here)."""
        return [*self.at(step), *self.at(step + 1)]

    def state_dict(self) -> dict[str, Any]:
        return self.plan.to_dict()

    def load_state_dict(self, saved: Any, step: int) -> str | None:
        """Continues from a checkpoint's plan at `step`; returns the one line to say when the plan changed
        (the new plan goes on from `step`), else None."""
        saved_plan = LRPlan.from_dict(saved)
        if saved_plan is None:
            return None  # written before plans were saved
        base = self.optimizer.param_groups[0]["initial_lr"]
        return plan_change(saved_plan, self.plan, step, base)
