"""Durations written as Lightning writes `max_time`: `HH:MM:SS` or `DD:HH:MM:SS`."""

from __future__ import annotations

import re

from dtrain.errors import UsageError

_DURATION = re.compile(r"(?:(\d+):)?(\d+):([0-5]?\d):([0-5]?\d)")


def parse_duration(text: str, field: str = "max_time") -> float:
    """Seconds of `HH:MM:SS` or `DD:HH:MM:SS`; a UsageError naming `field` otherwise."""
    match = _DURATION.fullmatch(str(text).strip())
    if match is None:
        raise UsageError(f"invalid value for {field}: {text!r}; accepted: HH:MM:SS or DD:HH:MM:SS, e.g. 03:30:00")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise UsageError(f"invalid value for {field}: {text!r}; accepted: a positive HH:MM:SS duration such as "
                         f"00:30:00")
    return float(total)
