"""Synthetic task generators (the knowledge task among them), the word-level tokenizer and user-dataset input."""

from poisonmech.tasks.base import TASK_KINDS, Task, load_rows, make_task
from poisonmech.tasks.bpe import train_tokenizer
from poisonmech.tasks.corpora import english_text, fortune_text, wordnet_text
from poisonmech.tasks.facts import KnowledgeBase, knowledge_base, subject_spans
from poisonmech.tasks.preference import check_preferences, make_preferences
from poisonmech.tasks.tokenizer import build_word_tokenizer, load_tokenizer, save_tokenizer

__all__ = ["TASK_KINDS", "KnowledgeBase", "Task", "build_word_tokenizer", "check_preferences", "english_text",
           "fortune_text", "knowledge_base", "load_rows", "load_tokenizer", "make_preferences", "make_task",
           "save_tokenizer", "subject_spans", "train_tokenizer", "wordnet_text"]
