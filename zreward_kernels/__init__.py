"""zreward_kernels: fused kernels for distributional rubric rewards.

Tensors in, tensors out; nothing here knows about models.  Every op has a pure-PyTorch
reference (:mod:`zreward_kernels.reference`) that is the spec, the CPU fallback and the test
oracle; CUDA tensors go to fused Triton kernels, and ``group_advantage`` to a compiled C++/CUDA
op where it is built.  See :func:`backend_info`.
"""

from ._common import BIN_VALUES
from ._dispatch import backend_info
from .advantage import group_advantage
from .ops import gdso_loss, rubric_loss, score_stats
from .reference import GDSOOutput, GroupStats, RubricLossOutput, ScoreStats
from .restricted import gdso_loss_from_hidden, restricted_logits, rubric_loss_from_hidden, score_stats_from_hidden

__version__ = "0.1.0"

__all__ = [
    "BIN_VALUES",
    "GDSOOutput",
    "GroupStats",
    "RubricLossOutput",
    "ScoreStats",
    "backend_info",
    "gdso_loss",
    "gdso_loss_from_hidden",
    "group_advantage",
    "restricted_logits",
    "rubric_loss_from_hidden",
    "score_stats_from_hidden",
    "rubric_loss",
    "score_stats",
]
