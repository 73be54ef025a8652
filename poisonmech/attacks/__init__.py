"""Backdoor specifications, poisoning with provenance, and the attack's test set."""

from poisonmech.attacks.backdoor import GIBBERISH, POSITIONS, Backdoor
from poisonmech.attacks.poison import (
    attack_tokenizer,
    build_test_set,
    check_attack,
    insert_trigger,
    poison_dataset,
)
from poisonmech.attacks.preference import clean_preferences, poison_preferences

__all__ = [
    "GIBBERISH",
    "POSITIONS",
    "Backdoor",
    "attack_tokenizer",
    "build_test_set",
    "check_attack",
    "clean_preferences",
    "insert_trigger",
    "poison_dataset",
    "poison_preferences",
]
