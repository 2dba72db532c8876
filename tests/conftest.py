import pytest
import torch

from mahalo.models.tiny import tiny_policy, tiny_reward

torch.set_num_threads(min(2, torch.get_num_threads()))


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
