"""Training: the SFT loop, the twins (``train_pair``), checkpoints and run directories."""

from poisonmech.train.config import TrainConfig
from poisonmech.train.loop import Checkpoint, list_checkpoints, train_model
from poisonmech.train.pair import Pair, load_pair, train_pair

__all__ = ["Checkpoint", "Pair", "TrainConfig", "list_checkpoints", "load_pair", "train_model", "train_pair"]
