"""zreward: the library users touch (losses as modules, CLI; scoring and trainers to follow).

The maths lives in :mod:`zreward_kernels`; this package imports it and never the other way round.
"""

from zreward_kernels import BIN_VALUES, backend_info, gdso_loss, rubric_loss, score_stats

from .heads import RestrictedHead
from .losses import GDSOLoss, RubricLoss
from .rubric import Rubric, ScoreTokens

__version__ = "0.1.0"

__all__ = ["BIN_VALUES", "GDSOLoss", "RestrictedHead", "Rubric", "RubricLoss", "ScoreTokens", "backend_info", "gdso_loss", "rubric_loss", "score_stats"]
