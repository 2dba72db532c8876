"""Bad input raises ValueError with a message that names the problem."""

import math

import pytest
import torch

from mahalo import guided_generate
from mahalo.config import SamplingConfig
from mahalo.sampling import child_stream, filter_logits, root_stream, sample_tokens


@pytest.mark.parametrize("options, message", [
    ({"strategy": "greedy_search"}, "unknown strategy 'greedy_search'"),
    ({"num_candidates": 0}, "num_candidates \\(N\\) must be an integer >= 1"),
    ({"beam_width": 0}, "beam_width \\(B\\) must be an integer >= 1"),
    ({"weights": {"truth": -1.0}}, "weight of objective 'truth' must be a finite number >= 0"),
    ({"weights": {"truth": math.inf}}, "must be a finite number"),
    ({"weights": {"truth": math.nan}}, "must be a finite number"),
    ({"weights": {"helpful": 1.0}}, "weights name unknown objective\\(s\\) \\['helpful'\\]"),
    ({"temperature": -0.5}, "temperature must be"),
    ({"top_p": 0.0}, "top_p must be in"),
    ({"step": "paragraph"}, "unknown step boundary 'paragraph'"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"normalize": "minmax"}, "normalize must be one of"),
    ({"beam": 2}, "unknown option\\(s\\) \\['beam'\\]"),
    ({"stop_token_ids": [-1]}, "stop_token_ids must be a list of token ids"),
    ({"stop_token_ids": "2"}, "stop_token_ids must be a list of token ids"),
    ({"length_penalty": float("inf")}, "length_penalty must be a finite number"),
    ({"dedupe": "yes"}, "dedupe must be true or false"),
    ({"strategy": "dvts", "beam_width": 0}, "beam_width \\(B\\) must be an integer >= 1"),
])
def test_bad_options(policy, reward, options, message):
    with pytest.raises(ValueError, match=message):
        guided_generate(policy, {"truth": reward}, "Hi", **options)


def test_prompt_longer_than_context(reward):
    from mahalo.app.tiny import tiny_policy
    short = tiny_policy(max_position_embeddings=64)
    with pytest.raises(ValueError, match="exceeds the policy's context \\(64 tokens\\)"):
        guided_generate(short, {"truth": reward}, "word " * 200, max_new_tokens=8)


@pytest.mark.parametrize("prompt", ["", "   ", [], [{"content": "x"}]])
def test_bad_prompt(policy, prompt):
    with pytest.raises(ValueError, match="prompt|chat message"):
        guided_generate(policy, {}, prompt)


def test_bad_models(policy):
    with pytest.raises(ValueError, match="policy must be"):
        guided_generate("gpt2", {}, "Hi")
    with pytest.raises(ValueError, match="objective 'truth'"):
        guided_generate(policy, {"truth": 3}, "Hi")
    with pytest.raises(ValueError, match="no reward adapter accepts LlamaForCausalLM"):
        guided_generate(policy, {"truth": policy}, "Hi")


def test_top_k_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k2 = filter_logits(logits, SamplingConfig(top_k=2))
    assert torch.isinf(k2[0, 2:]).all() and torch.isfinite(k2[0, :2]).all()
    p = filter_logits(logits, SamplingConfig(top_k=0, top_p=0.8))
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()
    streams, positions = torch.arange(20), torch.zeros(20, dtype=torch.long)
    draws = sample_tokens(logits.expand(20, 4), SamplingConfig(top_k=1), streams, positions)
    assert draws.tolist() == [0] * 20
    assert int(sample_tokens(logits, SamplingConfig(temperature=0), streams[:1], positions[:1])) == 0


def test_top_k_fast_path_matches_masked_distribution():
    """Sampling among the top-k draws from the same distribution as masking the full vocabulary."""
    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 2
    cfg = SamplingConfig(temperature=0.7, top_k=5, top_p=0.9)
    expected = torch.softmax(filter_logits(logits, cfg), -1)[0]
    streams = torch.tensor([root_stream(s) for s in range(20000)])
    for draws in (sample_tokens(logits.expand(20000, 50), cfg, streams, torch.zeros(20000, dtype=torch.long)),
                  sample_tokens(logits.expand(20000, 50), cfg, streams[:1].expand(20000), torch.arange(20000))):
        freq = torch.bincount(draws, minlength=50).double() / draws.numel()
        assert set(draws.unique().tolist()) <= set(expected.nonzero()[:, 0].tolist())
        assert (freq - expected.double()).abs().max() < 0.015


def test_full_vocabulary_path_draws_the_same_tokens_as_top_k():
    """The noise of a token depends on its id, not its rank: top-k on and off agree where the
    k best hold all the mass."""
    torch.manual_seed(0)
    logits = torch.randn(64, 30)
    logits[:, 5:] = float("-inf")
    streams, positions = torch.tensor([root_stream(s) for s in range(64)]), torch.arange(64)
    fast = sample_tokens(logits, SamplingConfig(top_k=5), streams, positions)
    full = sample_tokens(logits, SamplingConfig(top_k=0), streams, positions)
    assert torch.equal(fast, full) and len(set(fast.tolist())) > 1


def test_streams_are_independent_of_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(8, 40)
    streams, positions = torch.tensor([child_stream(root_stream(3), c) for c in range(8)]), torch.arange(8) + 11
    together = sample_tokens(logits, SamplingConfig(), streams, positions)
    alone = [int(sample_tokens(logits[i:i + 1], SamplingConfig(), streams[i:i + 1], positions[i:i + 1]))
             for i in range(8)]
    assert together.tolist() == alone
    assert child_stream(12345, 0) == 12345 and child_stream(12345, 1) != child_stream(12345, 2)
