"""The benchmark suite runs end to end (tiny sizes) and ends with its JSON result line.

Only the shape of the result is checked: tests never assert on wall-clock figures.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from conftest import child_env

REPO = Path(__file__).resolve().parents[1]
KEYS = ("loop_overhead_ratio", "sync_save_vs_raw_ratio", "async_blocking_ratio", "resume_skip_ratio")


def test_benchmarks_quick_run_ends_with_json_ratios(tmp_path):
    env = child_env()
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick"], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    assert isinstance(result, dict)
    for key in KEYS:
        assert key in result, key
        value = result[key]
        if value is None:
            # Only the async ratio may be missing, and only while dtrain cannot save asynchronously.
            assert key == "async_blocking_ratio" and result.get("async_supported") is False, (key, result)
        else:
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
    assert "summary" in proc.stdout
