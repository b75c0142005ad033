"""Helpers shared by the benchmark scripts: paths, alternation, medians, tables, the JSON result line."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # import dtrain from this checkout, also when run as `python benchmarks/x.py`

def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds) to check that it works")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where models live (default cpu)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per side (default: by size)")
    return parser


def add_threads_flag(parser: argparse.ArgumentParser, sides: str = "both sides") -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help=f"torch CPU threads for {sides} (default 1: robust when other processes share the "
                             f"cores; 0 = torch's default)")


def chosen_spec(args: argparse.Namespace, quick: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """The sizes a run uses: `quick` with --quick, else `full`; --repeats (when given) overrides theirs. Sets up
    the device and threads the flags ask for, when the parser has those flags."""
    if getattr(args, "device", None):
        check_device(args.device)
    if getattr(args, "threads", None) is not None:
        set_threads(args.threads)
    spec = dict(quick if args.quick else full)
    if getattr(args, "repeats", None):
        spec["repeats"] = args.repeats
    return spec


def median(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread(values: Sequence[float]) -> str:
    """min..max of the repeats, for the table."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{fmt(min(values))}..{fmt(max(values))}"


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def alternate(sides: Sequence[tuple[str, Callable[[], Any]]], repeats: int,
              between: Callable[[], None] | None = None) -> dict[str, list[Any]]:
    """Runs every side `repeats` times, interleaved, rotating the order each round (A B, B A, A B ...),
    so slow drifts of the machine (thermal, other tenants, page cache) hit every side alike."""
    results: dict[str, list[Any]] = {name: [] for name, _ in sides}
    for round_ in range(repeats):
        shift = round_ % len(sides)
        order = list(sides[shift:]) + list(sides[:shift])
        for name, run in order:
            if between is not None:
                between()
            results[name].append(run())
    return results


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]], notes: Sequence[str] = ()) -> str:
    """A plain-text table: numbers right-aligned, text left-aligned."""
    numeric = [[not isinstance(c, str) or _looks_numeric(c) for c in row] for row in rows]
    cells = [[str(h) for h in header]] + [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [f"== {title} ==", line, "| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)) + " |", line]
    for row, nums in zip(cells[1:], numeric):
        out.append("| " + " | ".join(c.rjust(w) if num and j else c.ljust(w)
                                      for j, (c, w, num) in enumerate(zip(row, widths, nums))) + " |")
    out.append(line)
    out += [f"  {n}" for n in notes]
    return "\n".join(out)


def _looks_numeric(text: str) -> bool:
    return bool(text) and (text[0].isdigit() or text[0] in "-.<>=" or text in ("n/a",))


def machine() -> dict[str, Any]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    try:
        import accelerate

        info["accelerate"] = accelerate.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def emit(result: dict[str, Any]) -> None:
    """Prints the machine-readable result as the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(result, default=str), flush=True)


def check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmark: --device cuda asked for, but no CUDA GPU is available here")


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def set_threads(threads: int) -> None:
    """Pins torch's intra-op threads (0 = leave torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def threads_note() -> str:
    import torch

    return f"{torch.get_num_threads()} of {os.cpu_count()} cores"
