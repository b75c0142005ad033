"""The benchmark suite runs end to end (tiny sizes) and ends with its JSON result line.

Only the shape of the result is checked: tests never assert on wall-clock figures.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import child_env

REPO = Path(__file__).resolve().parents[1]
# CONTRACT section 5, plus the figures printed beside them.
KEYS = ("loop_overhead_ratio", "sync_save_vs_raw_fsync_ratio", "sync_save_vs_disk_ratio", "sync_save_vs_raw_ratio",
        "async_blocking_ratio", "checkpoint_overhead_ratio", "checkpoint_overhead_sync_ratio", "resume_skip_ratio",
        "resume_startup_ratio", "goodput_ratio", "goodput_plain_accelerate", "sharded_save_vs_full_ratio",
        "sharded_save_peak_memory_ratio", "sharded_full_save_peak_memory_ratio", "verify_vs_read_ratio",
        "sync_save_vs_raw_fsync_ratio_1g", "sync_save_vs_disk_ratio_1g", "store_commit_vs_upload_ratio",
        "goodput_tiered_ratio", "goodput_persistent_only")
# With tiny sizes on a busy machine a job may not get past its start-up before it is killed: 0 is a valid goodput.
# A save that allocates no new pages leaves the peak RSS where it was: 0 is a valid extra peak.
MAY_BE_ZERO = ("goodput_ratio", "goodput_plain_accelerate", "goodput_tiered_ratio", "goodput_persistent_only",
               "sharded_save_peak_memory_ratio", "sharded_full_save_peak_memory_ratio")


@pytest.mark.slow
def test_benchmarks_quick_run_ends_with_json_ratios(tmp_path):
    env = child_env()
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick"], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=480,
                          start_new_session=True)
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
            assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
            assert value > 0 or (key in MAY_BE_ZERO and value == 0), (key, value)
    assert "summary" in proc.stdout


SHARDED_KEYS = ("sharded_save_vs_full_ratio", "sharded_save_peak_memory_ratio", "sharded_full_save_peak_memory_ratio",
                "sharded_save_mb_per_s", "sharded_full_save_mb_per_s", "sharded_save_extra_peak_mb",
                "sharded_full_save_extra_peak_mb", "sharded_full_state_bytes")


@pytest.mark.slow
def test_sharded_benchmark_quick_run_launches_two_ranks_and_ends_with_json(tmp_path):
    env = child_env()
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_sharded.py"), "--quick",
                           "--workdir", str(tmp_path)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=240, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in SHARDED_KEYS:
        assert key in result, key
        value = result[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), (key, value)
    assert "sharded checkpoint commit" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # its work directory is gone


def test_gpu_check_without_a_gpu_says_so_and_fails(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: benchmarks/gpu_check.py would run for real")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], cwd=tmp_path,
                          env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert "no CUDA GPU" in proc.stdout
