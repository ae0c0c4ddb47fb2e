"""Strict JSON for the files and prints zreward writes (metrics, predictions, logs, results).

Python's :mod:`json` writes a NaN or an infinity as the bare words ``NaN`` / ``Infinity``, which are
not JSON (RFC 8259): JavaScript's ``JSON.parse`` refuses the whole file over one of them (checked
with Node), as do other parsers that follow the standard (``jq`` 1.6 happens to read them as null).
Metrics have such values where they are undefined (a PLCC over fewer than five items, HPA without a
comparable pair, ``grad_norm`` of a run that does not clip), so every writer here goes through
:func:`dumps` / :func:`dump`, which write ``null`` for them.  Read back with ``json.loads``, such a
value is ``None``.  numpy scalars and arrays become plain numbers and lists.
"""

from __future__ import annotations

import json
import math
from typing import IO, Any

import numpy as np

__all__ = ["finite_or_none", "dumps", "dump"]


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None``, recursively through dicts, lists
    and tuples (tuples become lists, as JSON has them); numpy scalars and arrays become Python numbers
    and lists.  Anything else is returned as it is."""
    if isinstance(obj, float):  # also np.float64, a float subclass
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_or_none(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return finite_or_none(float(obj))
    return obj


def _kwargs(kwargs: dict) -> dict:
    default = kwargs.get("default")
    if default is not None:  # what it makes of an unknown object (float(a 0-d tensor)) is cleaned too
        kwargs = dict(kwargs, default=lambda o: finite_or_none(default(o)))
    return kwargs


def dumps(obj: Any, **kwargs) -> str:
    """:func:`json.dumps` of :func:`finite_or_none` ``(obj)``; ``allow_nan=False`` (nothing non-finite
    can remain).  ``kwargs`` go to :func:`json.dumps` (``indent``, ``default``, ...)."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **_kwargs(kwargs))


def dump(obj: Any, f: IO[str], **kwargs) -> None:
    """:func:`json.dump` of :func:`finite_or_none` ``(obj)`` to ``f``, as :func:`dumps`."""
    json.dump(finite_or_none(obj), f, allow_nan=False, **_kwargs(kwargs))
