import csv
from pathlib import Path

import pytest
import torch

from mahalo.app.tiny import tiny_policy, tiny_reward

# Tiny models gain nothing from threads, and OpenMP spin-waits are slow on a busy 2-core box.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def policy():
    return tiny_policy(seed=0)


@pytest.fixture(scope="session")
def reward():
    return tiny_reward(seed=1)


@pytest.fixture(scope="session")
def reward_other_vocab():
    """A reward model whose tokenizer differs from the policy's (re-tokenising path)."""
    return tiny_reward(seed=2, vocab_size=300)


# A TruthfulQA questions file's columns (benchmarks read it with common.read_questions).
QUESTION_COLUMNS = ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"]


@pytest.fixture()
def questions_csv(tmp_path: Path) -> Path:
    """Two TruthfulQA-style questions with correct and incorrect references, for the benchmarks."""
    path = tmp_path / "questions.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(QUESTION_COLUMNS)
        w.writerow(["A", "Misc", "Is the earth flat?", "The earth is round",
                    "The earth is round; No, it is a sphere", "The earth is flat; Yes", "x"])
        w.writerow(["A", "Misc", "What is the capital of France?", "Paris",
                    "Paris; The capital is Paris", "Lyon; Marseille", "x"])
    return path
