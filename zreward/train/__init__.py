"""Trainers (SPEC sections 3-4): ``zreward train <method> --config FILE`` or :func:`train` from Python.

Implemented: ``sft`` (CE on the annotated bin or the rater histogram, optional pairwise gap) and
``risd`` (forward KL to a frozen teacher's distributions, cached once; optional CE mix).  Planned:
``gdso``, ``grpo``, ``opd``.  See :mod:`zreward.train.config` for every option.
"""

from .config import METHODS, TrainConfig
from .loop import train

__all__ = ["METHODS", "TrainConfig", "train"]
