"""Backdoor specifications, poisoning with provenance, and the attack's test set."""

from poisonmech.attacks.backdoor import GIBBERISH, POSITIONS, Backdoor
from poisonmech.attacks.poison import (
    attack_tokenizer,
    build_test_set,
    check_attack,
    insert_trigger,
    poison_dataset,
)

__all__ = [
    "GIBBERISH",
    "POSITIONS",
    "Backdoor",
    "attack_tokenizer",
    "build_test_set",
    "check_attack",
    "insert_trigger",
    "poison_dataset",
]
