"""zreward._json: what the package writes is JSON that strict parsers read."""

import json
import math

import numpy as np
import torch

from zreward._json import dumps, finite_or_none


def _strict(word):
    raise AssertionError(f"{word} is not JSON")


def test_non_finite_values_become_null_everywhere():
    obj = {"a": float("nan"), "b": [1.5, float("inf"), -math.inf], "c": (np.float32("nan"), np.float64(2.5)),
           "d": {"e": np.array([1.0, np.nan]), "f": np.int64(3), "g": np.bool_(True)}, "h": "NaN", "i": None}
    text = dumps(obj, indent=1)
    back = json.loads(text, parse_constant=_strict)
    assert back == {"a": None, "b": [1.5, None, None], "c": [None, 2.5], "d": {"e": [1.0, None], "f": 3, "g": True},
                    "h": "NaN", "i": None}
    assert type(back["d"]["f"]) is int and finite_or_none(np.float32(0.25)) == 0.25


def test_default_handler_output_is_cleaned_too():
    """evaluate and the demo pass default=float for objects json does not know (a 0-d tensor): a NaN
    one must come out null, not raise or write NaN."""
    text = dumps({"x": torch.tensor(float("nan")), "y": torch.tensor(0.5)}, default=float)
    assert json.loads(text, parse_constant=_strict) == {"x": None, "y": 0.5}
