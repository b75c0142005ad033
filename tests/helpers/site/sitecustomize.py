"""Test-only start-up hooks for child processes (on PYTHONPATH only when a test asks for them).

- DTRAIN_TEST_HIDE_MODULES=a,b: those modules cannot be imported (simulates a missing optional extra).
- DTRAIN_TEST_PAUSE_AT_STEP=N: the trainer waits after optimizer step N until a signal has arrived, so a test
  can interrupt a tiny (fast) run at a known step; then it goes on as usual (agree, save, stop).
"""

import os
import sys

for _name in filter(None, os.environ.get("DTRAIN_TEST_HIDE_MODULES", "").split(",")):
    sys.modules[_name] = None  # `import name` now raises ImportError

if os.environ.get("DTRAIN_TEST_PAUSE_AT_STEP") and sys.argv and sys.argv[0].endswith("train.py"):
    import time

    from dtrain.training.trainer import Trainer

    _pause_at = int(os.environ["DTRAIN_TEST_PAUSE_AT_STEP"])
    _original = Trainer._after_optimizer_step

    def _after_optimizer_step(self, epoch_done):
        if self.state.global_step == _pause_at:
            (self.output_dir / f"paused-rank{self.accelerator.process_index}").touch()
            deadline = time.monotonic() + 120
            while not self.interrupts.requested and time.monotonic() < deadline:
                time.sleep(0.05)
        return _original(self, epoch_done)

    Trainer._after_optimizer_step = _after_optimizer_step
