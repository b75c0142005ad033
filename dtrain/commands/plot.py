"""`dtrain plot OUTPUT_DIR`: training and eval curves from metrics.jsonl, with the run's events marked.

Interrupts and resumes are vertical lines, committed checkpoints are ticks along the bottom, and the best
checkpoint is a star on the monitored eval curve. Rendering is headless (Agg); matplotlib is an optional extra
(`pip install 'dtrain[plot]'`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dtrain.checkpoint.location import run_checkpoints
from dtrain.checkpoint.resolve import best_checkpoint_metric
from dtrain.errors import UsageError
from dtrain.training.metrics import read_records

TRAIN_SKIP = {"step", "epoch", "kind", "lr", "steps_per_second", "samples_seen"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("dtrain plot needs matplotlib, which is not installed; "
                         "install it with: pip install 'dtrain[plot]'") from None
    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [float(p[1]) for p in points]


def plot_run(output_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draws a run's curves into `out` (default OUTPUT_DIR/metrics.png); returns the file's path."""
    output_dir = Path(output_dir)
    records = read_records(output_dir / "metrics.jsonl")
    if not records:
        raise UsageError(f"{output_dir / 'metrics.jsonl'} is missing or empty; accepted: a run's output dir")
    plt = _pyplot()
    train = [r for r in records if r.get("kind") == "train"]
    events = [r for r in records if "event" in r]
    has_lr = any("lr" in r for r in train)
    fig, axes = plt.subplots(2 if has_lr else 1, 1, figsize=(10, 7 if has_lr else 5), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]} if has_lr else None)
    _draw_metrics(axes[0][0], train, [r for r in records if r.get("kind") == "eval"], events, output_dir)
    if has_lr:
        lr_ax = axes[1][0]
        lr_ax.plot(*_series(train, "lr"), color="tab:gray")
        lr_ax.set_ylabel("learning rate")
        lr_ax.grid(True, alpha=0.3)
        _mark_events(lr_ax, events, legend=False)
    axes[-1][0].set_xlabel("optimizer step")
    fig.tight_layout()
    out = Path(out) if out else output_dir / "metrics.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _draw_metrics(ax, train: list[dict[str, Any]], evals: list[dict[str, Any]], events: list[dict[str, Any]],
                  output_dir: Path) -> None:
    """Training and eval curves, the run's events and the best checkpoint, on one axis."""
    train_keys = sorted({k for r in train for k in r} - TRAIN_SKIP)
    for key in train_keys:
        ax.plot(*_series(train, key), label=f"train {key}", linewidth=1.2)
    for key in sorted({k for r in evals for k in r} - {"step", "epoch", "kind"}):
        ax.plot(*_series(evals, key), "o-", label=f"eval {key}", markersize=3, linewidth=1.2)
    _mark_events(ax, events)
    best = best_checkpoint_metric(run_checkpoints(output_dir))
    if best is not None and isinstance(best["value"], (int, float)):
        step, metric, value = best["step"], best["metric"], float(best["value"])
        ax.plot([step], [value], marker="*", markersize=18, color="gold", markeredgecolor="black", zorder=5,
                linestyle="none", label=f"best checkpoint ({metric} {value:.4g} @ {step})")
    if all(v > 0 for key in train_keys for v in _series(train, key)[1]) and train_keys:
        ax.set_yscale("log")  # losses span orders of magnitude early on
    ax.set_ylabel("metric")
    ax.set_title(f"{output_dir}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)


def _mark_events(ax, events: list[dict[str, Any]], legend: bool = True) -> None:
    """Interrupts (red dashed, a red triangle on top), resumes (green dotted, a green triangle a little lower,
    so both show when a run resumed where it stopped), checkpoint commits (ticks along the bottom)."""
    styles = {"interrupt": ("tab:red", "--", "v", 0.97), "resume": ("tab:green", ":", ">", 0.91),
              "early_stop": ("tab:purple", "-.", "x", 0.97)}
    labelled: set[str] = set()
    for event in events:
        name = event.get("event")
        if name in styles:
            color, line, marker, height = styles[name]
            label = name if legend and name not in labelled else None
            labelled.add(name)
            ax.axvline(event["step"], color=color, linestyle=line, linewidth=1.5, alpha=0.8, label=label)
            ax.plot([event["step"]], [height], marker=marker, color=color, markersize=9, linestyle="none",
                    transform=ax.get_xaxis_transform())
    saves = sorted({e["step"] for e in events if e.get("event") == "checkpoint"})
    if saves:
        ax.plot(saves, [0.02] * len(saves), "|", color="tab:blue", markersize=12, markeredgewidth=2,
                transform=ax.get_xaxis_transform(), label="checkpoint" if legend else None)


def plot_command(args) -> None:
    print(f"wrote {plot_run(args.output_dir, args.out)}")
