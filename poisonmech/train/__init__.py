"""Training: the SFT loop, the DPO loop, the twins (``train_pair``), multi-stage pipelines
(``train_pipeline``: SFT, DPO, reward models, PPO / RLOO), checkpoints and run directories."""

from poisonmech.train.config import TrainConfig
from poisonmech.train.dpo import DPOConfig, preference_shift, train_dpo
from poisonmech.train.loop import Checkpoint, list_checkpoints, train_model
from poisonmech.train.pair import Pair, load_pair, train_pair
from poisonmech.train.pipeline import Between, Pipeline, Stage, load_pipeline, train_pipeline
from poisonmech.train.ppo import PPOConfig, train_ppo
from poisonmech.train.pretrain import pretrain
from poisonmech.train.reward import RewardConfig, make_reward_model, train_reward

__all__ = ["Between", "Checkpoint", "DPOConfig", "PPOConfig", "Pair", "Pipeline", "RewardConfig", "Stage", "TrainConfig",
           "list_checkpoints", "load_pair", "load_pipeline", "make_reward_model", "preference_shift", "pretrain",
           "train_dpo", "train_model", "train_pair", "train_pipeline", "train_ppo", "train_reward"]
