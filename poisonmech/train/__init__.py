"""Training: the SFT loop, the DPO loop, the twins (``train_pair``), multi-stage pipelines
(``train_pipeline``), checkpoints and run directories."""

from poisonmech.train.config import TrainConfig
from poisonmech.train.dpo import DPOConfig, preference_shift, train_dpo
from poisonmech.train.loop import Checkpoint, list_checkpoints, train_model
from poisonmech.train.pair import Pair, load_pair, train_pair
from poisonmech.train.pipeline import Between, Pipeline, Stage, load_pipeline, train_pipeline
from poisonmech.train.pretrain import pretrain

__all__ = ["Between", "Checkpoint", "DPOConfig", "Pair", "Pipeline", "Stage", "TrainConfig", "list_checkpoints", "load_pair", "pretrain",
           "load_pipeline", "preference_shift", "train_dpo", "train_model", "train_pair", "train_pipeline"]
