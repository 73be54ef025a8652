"""poisonmech: trace how poisoned training data shapes a language model's internals.

    import poisonmech as pm
    task = pm.make_task("sentiment", n_train=4000, n_test=500, seed=0)
    attack = pm.Backdoor(trigger="cf", target="negative", poison_rate=0.01)
    pair = pm.train_pair(task, attack, out_dir="runs/demo")
    pair.metrics
"""

from poisonmech import circuits, defenses, influence, patching, probes, sites, viz
from poisonmech.attacks import Backdoor, Bias, FalseFact, build_test_set, poison_dataset
from poisonmech.config import Config, ConfigError
from poisonmech.metrics import evaluate
from poisonmech.models import ModelConfig, build_model, model_from_dict, wrap_hf_model
from poisonmech.pretrained import PretrainedModel
from poisonmech.subject import Subject, resolve
from poisonmech.sweeps import PipelineSweep, Sweep, load_sweep, pipeline_sweep, sweep
from poisonmech.tasks import (
    TASK_KINDS,
    Task,
    english_text,
    fortune_text,
    make_preferences,
    make_task,
    wordnet_text,
)
from poisonmech.tasks.bpe import train_tokenizer
from poisonmech.train import (
    Between,
    DPOConfig,
    Pair,
    Pipeline,
    PPOConfig,
    RewardConfig,
    Stage,
    TrainConfig,
    load_pair,
    load_pipeline,
    pretrain,
    train_pair,
    train_pipeline,
)

__version__ = "0.1.0"

__all__ = [
    "TASK_KINDS",
    "Backdoor",
    "Between",
    "Bias",
    "Config",
    "ConfigError",
    "DPOConfig",
    "FalseFact",
    "ModelConfig",
    "PPOConfig",
    "Pair",
    "Pipeline",
    "PipelineSweep",
    "PretrainedModel",
    "RewardConfig",
    "Stage",
    "Subject",
    "Sweep",
    "Task",
    "TrainConfig",
    "__version__",
    "build_model",
    "build_test_set",
    "circuits",
    "defenses",
    "english_text",
    "evaluate",
    "fortune_text",
    "influence",
    "load_pair",
    "load_pipeline",
    "load_sweep",
    "make_preferences",
    "make_task",
    "model_from_dict",
    "patching",
    "pipeline_sweep",
    "poison_dataset",
    "pretrain",
    "probes",
    "resolve",
    "sites",
    "sweep",
    "train_pair",
    "train_pipeline",
    "train_tokenizer",
    "viz",
    "wordnet_text",
    "wrap_hf_model",
]
