"""zreward: the library users touch -- rubric and score tokens, the reward model wrapper and its
scorer, losses as modules, the downstream reward helpers and the trainers.

The maths lives in :mod:`zreward_kernels`; this package imports it and never the other way round.
Importing ``zreward`` does not import transformers or accelerate: the classes below load them when
first used.
"""

from zreward_kernels import BIN_VALUES, backend_info, gdso_loss, rubric_loss, score_stats

from .downstream import group_rewards, refl_loss
from .heads import RestrictedHead
from .losses import GDSOLoss, RubricLoss
from .model import ZRewardModel
from .rubric import Rubric, ScoreTokens
from .scorer import RewardOutput, RewardScorer, as_reward_fn
from .train import TrainConfig  # the function is zreward.train.train (zreward.train is the subpackage)

__version__ = "0.1.0"

__all__ = ["BIN_VALUES", "GDSOLoss", "RestrictedHead", "RewardOutput", "RewardScorer", "Rubric", "RubricLoss",
           "ScoreTokens", "TrainConfig", "ZRewardModel", "as_reward_fn", "backend_info", "gdso_loss", "group_rewards",
           "refl_loss", "rubric_loss", "score_stats"]
