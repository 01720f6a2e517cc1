"""Showing strings that come from files on a terminal without letting them drive the terminal.

A codebook's metadata is whatever its writer put there. Printed raw, an ESC sequence can clear the
screen or move the cursor, a carriage return or newline can forge a line of a report, and a bidi
override can make text read differently from what it is. :func:`safe_text` makes such characters
visible as escapes; ordinary printable Unicode (accents, CJK, emoji) is kept as is.
"""

from __future__ import annotations

import unicodedata
from typing import Any

# Control (C0, DEL, C1), format (bidi overrides, zero-width characters, soft hyphen), lone
# surrogates (which cannot even be written as UTF-8), and the line and paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escape(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def safe_text(s: str) -> str:
    """``s`` with every control, format, surrogate and line/paragraph separator character written
    as a visible ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN`` escape; the result is one line."""
    if s.isascii() and s.isprintable():  # the common case: nothing to escape
        return s
    return "".join(_escape(ch) if unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch for ch in s)


def is_number(value: Any) -> bool:
    """True for an int or float that is not a bool (JSON ``true`` reads as a Python int too)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def show(value: Any, spec: str = "") -> str:
    """``value`` formatted with ``spec`` when it is a number, else its ``str`` made safe by
    :func:`safe_text`: a report line built from file values never fails and never carries controls."""
    if spec and is_number(value):
        try:
            return format(value, spec)
        except (ValueError, OverflowError):  # e.g. an integer-only spec given a float
            pass
    return safe_text(str(value))


__all__ = ["is_number", "safe_text", "show"]
