"""metrics.jsonl / metrics.csv: rewinding on resume, a growing csv header, a line torn by a crash."""

from __future__ import annotations

import csv
import json
import math

from dtrain.training.metrics import MetricsLog, read_records


def csv_rows(path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def fill(log: MetricsLog, last_step: int = 40) -> None:
    log.event("start", 0, world_size=1)
    for step in range(5, last_step + 1, 5):
        log.log({"step": step, "epoch": 0, "loss": 1.0 / step, "lr": 0.001}, "train")
        if step % 10 == 0:
            log.log({"step": step, "epoch": 0, "val_loss": 2.0 / step}, "eval")
            log.event("checkpoint", step, path=f"step_{step:09d}", bytes=10)


def test_rewind_drops_records_after_the_resume_step_from_jsonl_and_csv(tmp_path):
    log = MetricsLog(tmp_path)
    fill(log)
    before = read_records(log.jsonl)
    dropped = log.rewind(20)
    after = read_records(log.jsonl)
    assert dropped == len([r for r in before if r["step"] > 20]) > 0
    assert after == [r for r in before if r["step"] <= 20], "the kept lines stay as they were, in order"
    assert {r.get("event") for r in after} >= {"start", "checkpoint"}
    _, rows = csv_rows(log.csv)
    assert [int(r["step"]) for r in rows] == [5, 10, 10, 15, 20, 20]
    assert all("event" not in r for r in rows)

    # Writing goes on after the rewind as one continuous run.
    log.event("resume", 20, world_size=1)
    log.log({"step": 25, "epoch": 0, "loss": 0.1, "lr": 0.001}, "train")
    assert [r["step"] for r in read_records(log.jsonl)][-2:] == [20, 25]
    assert [int(r["step"]) for r in csv_rows(log.csv)[1]][-1] == 25


def test_rewind_on_a_new_log_object_after_a_restart(tmp_path):
    fill(MetricsLog(tmp_path))
    log = MetricsLog(tmp_path)  # what a resumed process sees
    log.rewind(10)
    log.log({"step": 15, "epoch": 0, "loss": 0.5, "lr": 0.001}, "train")
    assert max(r["step"] for r in read_records(log.jsonl)) == 15
    _, rows = csv_rows(log.csv)
    assert [int(r["step"]) for r in rows] == [5, 10, 10, 15]


def test_rewind_to_a_step_past_the_end_drops_nothing(tmp_path):
    log = MetricsLog(tmp_path)
    fill(log)
    before = log.jsonl.read_text()
    assert log.rewind(1000) == 0
    assert log.jsonl.read_text() == before


def test_csv_header_grows_when_new_keys_appear(tmp_path):
    log = MetricsLog(tmp_path)
    log.log({"step": 1, "epoch": 0, "loss": 0.9}, "train")
    header, _ = csv_rows(log.csv)
    assert header[:3] == ["step", "epoch", "kind"] and "loss" in header and "val_loss" not in header
    log.log({"step": 2, "epoch": 0, "val_loss": 0.8, "accuracy": 0.5}, "eval")
    log.log({"step": 3, "epoch": 0, "loss": 0.7}, "train")
    header, rows = csv_rows(log.csv)
    assert {"loss", "val_loss", "accuracy"} <= set(header)
    assert [r["kind"] for r in rows] == ["train", "eval", "train"]
    assert rows[0]["val_loss"] == "" and rows[1]["val_loss"] == "0.8" and rows[2]["loss"] == "0.7"


def test_non_finite_values_stay_valid_json(tmp_path):
    log = MetricsLog(tmp_path)
    log.log({"step": 1, "epoch": 0, "loss": math.nan, "grad": math.inf}, "train")
    line = log.jsonl.read_text().splitlines()[0]
    record = json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert record["loss"] == "nan" and record["grad"] == "inf"


def test_torn_last_line_is_tolerated(tmp_path):
    log = MetricsLog(tmp_path)
    fill(log, last_step=20)
    good = read_records(log.jsonl)
    with open(log.jsonl, "a") as f:
        f.write('{"step": 25, "epoch": 0, "lo')  # the process died mid-write
    assert read_records(log.jsonl) == good

    resumed = MetricsLog(tmp_path)
    resumed.rewind(20)
    resumed.event("resume", 20)
    resumed.log({"step": 25, "epoch": 0, "loss": 0.1, "lr": 0.001}, "train")
    lines = resumed.jsonl.read_text().splitlines()
    assert all(json.loads(line) for line in lines), "no torn line may survive the rewind"
    assert [r["step"] for r in read_records(resumed.jsonl)][-2:] == [20, 25]
    _, rows = csv_rows(resumed.csv)
    assert int(rows[-1]["step"]) == 25


def test_reset_forgets_an_earlier_run(tmp_path):
    log = MetricsLog(tmp_path)
    fill(log)
    log.reset()
    assert not log.jsonl.exists() and not log.csv.exists()
    log.log({"step": 1, "epoch": 0, "loss": 1.0}, "train")
    assert len(read_records(log.jsonl)) == 1


def test_disabled_log_writes_nothing(tmp_path):
    log = MetricsLog(tmp_path, enabled=False)
    fill(log)
    assert log.rewind(5) == 0
    assert list(tmp_path.iterdir()) == []
