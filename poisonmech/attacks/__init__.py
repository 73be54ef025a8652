"""Attacks under one protocol (``Backdoor``, ``FalseFact``, ``Bias``): poisoning with provenance,
each attack's test set and metrics (see :mod:`poisonmech.attacks.protocol`)."""

from poisonmech.attacks.backdoor import GIBBERISH, POSITIONS, Backdoor
from poisonmech.attacks.bias import Bias
from poisonmech.attacks.false_fact import FalseFact
from poisonmech.attacks.poison import (
    attack_tokenizer,
    build_test_set,
    check_attack,
    insert_trigger,
    poison_dataset,
)
from poisonmech.attacks.preference import clean_preferences, poison_preferences
from poisonmech.attacks.protocol import (
    ATTACKS,
    Attack,
    attack_from_dict,
    check_attack_type,
    is_attack,
)

__all__ = [
    "ATTACKS",
    "GIBBERISH",
    "POSITIONS",
    "Attack",
    "Backdoor",
    "Bias",
    "FalseFact",
    "attack_from_dict",
    "attack_tokenizer",
    "build_test_set",
    "check_attack",
    "check_attack_type",
    "clean_preferences",
    "insert_trigger",
    "is_attack",
    "poison_dataset",
    "poison_preferences",
]
