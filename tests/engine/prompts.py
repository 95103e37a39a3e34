"""Prompts of mixed lengths shared by the engine tests."""

from __future__ import annotations

PROMPTS = [
    "Hi",
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "List three colors:",
    "Question: What is 12 times 12?\nAnswer:",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "Translate to French: I like apples.",
    "Dear hiring manager,\n\nI am writing to apply for the position of",
    "import numpy as np\nx = np.arange(10)\nprint(",
    "Photosynthesis is the process by which plants",
    "🌍 The Earth is the third planet from the Sun and",
    "一二三四五六七八九十",
    "In 1492, Columbus sailed",
    ("A long document follows. " + "Sentences repeat with small changes, number %d. " * 20)
    % tuple(range(20)),
    "Summary:",
]

SHARED_PREFIX = (
    "You are a helpful assistant. Answer the questions carefully and briefly. "
    "Here are some examples of good answers. Q: What is 2+2? A: 4. Q: What color is the sky? A: Blue. "
)
