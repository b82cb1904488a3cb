"""Type and range checks for the parameters of the theory lectures (notebooks 01-03), run in their third cell.

A papermill parameter arrives as whatever Python literal the command line parsed (``-p K 2.5`` is a float,
``-p SEED x`` the string ``"x"``), so every check tests the type before the range, and every failure is one line::

    ValueError: K must be an integer, got 2.5 (float)
    ValueError: ALPHA must be a number, got 'abc' (str)

Size limits that protect memory come from :func:`check_memory` with an estimate of the bytes the exact computation
needs (see ``nca_kit.exact.enumeration_bytes``) against :data:`MEMORY_LIMIT_BYTES`.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["MEMORY_LIMIT_BYTES", "check_bool", "check_int", "check_float", "check_list", "check_memory", "gib"]

# What one exact computation of a lecture may take: the lectures are meant for a laptop or a 2-core CI machine
# shared with other jobs.
MEMORY_LIMIT_BYTES = 1 << 30


def gib(n_bytes: float) -> str:
    """``n_bytes`` as text in GiB (``"1.5 GiB"``) or MiB below one GiB."""
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def _shown(value) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def check_bool(name: str, value) -> bool:
    """``value`` must be ``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {_shown(value)}")
    return value


def check_int(name: str, value, *, low: int | None = None, high: int | None = None, why: str = "") -> int:
    """``value`` must be an ``int`` (not a bool, not a float such as ``2.5`` or ``2.0``) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {_shown(value)}")
    value = int(value)
    _check_range(name, value, low, high, False, why)
    return value


def check_float(name: str, value, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, why: str = "") -> float:
    """``value`` must be a finite real number (an ``int`` is accepted) in ``[low, high]`` (``(low, high]`` with
    ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {_shown(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    _check_range(name, value, low, high, low_open, why)
    return value


def _check_range(name, value, low, high, low_open, why) -> None:
    reason = f" ({why})" if why else ""
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}{reason}, got {value:g}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high:g}{reason}, got {value:g}")


def check_list(name: str, values, item, *, min_len: int = 1, max_len: int = 20, increasing: bool = False) -> list:
    """``values`` must be a list (or tuple) of ``min_len`` to ``max_len`` items, each passing ``item(label, v)``
    (e.g. ``lambda n, v: check_float(n, v, low=0, low_open=True)``); ``increasing``: strictly increasing."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise ValueError(f"{name} must be a list, got {_shown(values)}")
    if not min_len <= len(values) <= max_len:
        raise ValueError(f"{name} must have {min_len} to {max_len} values, got {len(values)}")
    checked = [item(f"{name}[{i}]", v) for i, v in enumerate(values)]
    if increasing and not all(a < b for a, b in zip(checked, checked[1:])):
        raise ValueError(f"{name} must be increasing, got {list(values)}")
    return checked


def check_memory(name: str, need_bytes: float, what: str, limit: int = MEMORY_LIMIT_BYTES) -> None:
    """Refuse a setting whose estimated memory ``need_bytes`` for ``what`` is above ``limit``, naming it."""
    if need_bytes > limit:
        raise ValueError(f"{name} must be smaller: {what} needs about {gib(need_bytes)}, above the "
                         f"{gib(limit)} limit of a lecture")
