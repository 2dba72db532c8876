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
