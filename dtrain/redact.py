"""Credentials never leave the process: URIs are redacted wherever dtrain records or prints them.

A URI such as `s3://key:secret@host/bucket` or `ftp://user:pass@host/dir` is written `s3://key:***@host/bucket`
(a userinfo without a password, `https://token@host`, becomes `https://***@host`), and the value of a query
parameter whose name says it is a secret (`?token=`, `&X-Amz-Signature=`, `?access_key=`, `&sig=`, ...) becomes
`***`. The passwords of every URI redacted so far are also replaced wherever they appear alone, since some
libraries repeat a URI without its scheme in their error messages (fsspec's memory filesystem keeps
`/user:pass@bucket` as the path).

Only copies are redacted: the in-memory config keeps its credentials, which the run needs.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from typing import Any

MASK = "***"
# scheme://userinfo@ where userinfo runs to the last '@' of the authority (a password may hold '@').
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s]*)@")
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;][^=&#\s]*(?:secret|token|signature|password|passwd|pwd|credential|access[_-]?key|api[_-]?key"
    r"|private[_-]?key|session|sig|auth)[^=&#\s]*=)(?P<value>[^&#\s'\"]*)", re.IGNORECASE)
_MIN_LITERAL = 4  # shorter passwords are not replaced on their own: they would mask ordinary words
_seen_passwords: set[str] = set()


def _mask_userinfo(match: re.Match) -> str:
    user, has_password, password = match.group("userinfo").partition(":")
    secret = password if has_password else user  # a lone user field is often a token itself
    if len(secret) >= _MIN_LITERAL and secret != MASK:
        _seen_passwords.add(secret)
    return f"{match.group('scheme')}{user}:{MASK}@" if has_password else f"{match.group('scheme')}{MASK}@"


def redact_uri(text: Any) -> Any:
    """`text` with every URI's userinfo and secret query values masked (non-strings are returned as they are)."""
    if not isinstance(text, str):
        return text
    text = _USERINFO.sub(_mask_userinfo, text)
    text = _SECRET_PARAM.sub(lambda m: m.group("name") + MASK, text)
    for password in sorted(_seen_passwords, key=len, reverse=True):  # a copy: other threads may add to it
        text = text.replace(password, MASK)
    return text


def redact_values(value: Any) -> Any:
    """A copy of a nested structure (dicts, lists, tuples) with every string in it redacted, keys included."""
    if isinstance(value, dict):
        return {redact_uri(k): redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(v) for v in value)
    return redact_uri(value)


def remember_secrets(value: Any) -> None:
    """Learns the passwords of the URIs in `value` (e.g. a config's dict) before anything could print them."""
    redact_values(value)


def install() -> None:
    """Redacts every log message and uncaught traceback of this process from now on (idempotent)."""
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "redacts", False):
        def redacting_factory(*args, **kwargs) -> logging.LogRecord:
            record = factory(*args, **kwargs)
            original = record.getMessage
            record.getMessage = lambda: redact_uri(original())  # what every formatter prints
            return record

        redacting_factory.redacts = True
        logging.setLogRecordFactory(redacting_factory)
    hook = sys.excepthook
    if not getattr(hook, "redacts", False):
        def redacting_hook(kind, value, tb) -> None:
            sys.stderr.write(redact_uri("".join(traceback.format_exception(kind, value, tb))))

        redacting_hook.redacts = True
        sys.excepthook = redacting_hook
