"""Many prompts in flight: batch composition never changes an answer; results stream back."""

import pytest

from mahalo import guided_generate, guided_generate_many
from tests.helpers import response_ids_of

PROMPTS = [f"Question {i}: {topic}?" for i, topic in enumerate(
    ["Is the earth flat", "Why is the sky blue", "Hi", "What is water", "Name a cat", "Tell me a story",
     "Where is Paris", "How do dogs sleep", "Is it true", "Why"])]


def _run(policy, prms, prompts, **kw):
    return dict(guided_generate_many(policy, prms, prompts, **kw))


@pytest.mark.parametrize("options", [
    dict(strategy="step_best_of_n", num_candidates=3, step="sentence", min_step_tokens=2),
    dict(strategy="step_beam", beam_width=2, num_candidates=2, step="max_tokens", min_step_tokens=0, max_step_tokens=5),
    dict(strategy="dvts", beam_width=2, num_candidates=2, step="max_tokens", min_step_tokens=0, max_step_tokens=4),
    dict(strategy="best_of_n", num_candidates=3),
    dict(strategy="sample"),
])
def test_batch_composition_never_changes_an_answer(policy, reward, options):
    prms = {"truth": reward, "len": lambda p, r: -len(r) / 50}
    kw = dict(max_new_tokens=24, normalize="zscore", seed=5, **options)
    alone = _run(policy, prms, PROMPTS, max_prompts=1, **kw)
    for max_prompts in (3, 8):
        batched = _run(policy, prms, PROMPTS, max_prompts=max_prompts, **kw)
        assert sorted(batched) == list(range(len(PROMPTS)))
        for i in range(len(PROMPTS)):
            assert batched[i].token_ids == alone[i].token_ids, (max_prompts, i)
            assert batched[i].scores == pytest.approx(alone[i].scores, abs=1e-4)
    single = guided_generate(policy, prms, PROMPTS[4], **kw)
    assert single.token_ids == alone[4].token_ids


def test_results_stream_as_they_finish_and_rows_are_bounded(policy, reward):
    """With room for 3 prompts, a short answer frees its rows for the next prompt at the next
    step; results come back in finishing order, each with its input index."""
    order = [i for i, _ in guided_generate_many(policy, {"truth": reward}, PROMPTS, max_prompts=3, max_new_tokens=20,
                                                 num_candidates=2, step="max_tokens", min_step_tokens=0,
                                                 max_step_tokens=4, stop_token_ids=[16])]
    assert sorted(order) == list(range(len(PROMPTS)))
    with pytest.raises(ValueError, match="max_rows \\(4\\) is below the 6 rows one prompt needs"):
        next(guided_generate_many(policy, {"truth": reward}, PROMPTS, max_rows=4, num_candidates=6))


def test_a_failing_prompt_does_not_stop_the_others(policy, reward):
    prompts = ["Hi", "word " * 2000, "", "Why"]
    out = dict(guided_generate_many(policy, {"truth": reward}, prompts, errors="return", max_prompts=4,
                                    max_new_tokens=8))
    assert isinstance(out[1], ValueError) and "exceeds the policy's context" in str(out[1])
    assert isinstance(out[2], ValueError) and "prompt is empty" in str(out[2])
    assert out[0].token_ids == guided_generate(policy, {"truth": reward}, "Hi", max_new_tokens=8).token_ids
    assert out[3].text is not None
    with pytest.raises(ValueError, match="prompt is empty"):  # errors="raise": the first failure raises
        dict(guided_generate_many(policy, {"truth": reward}, prompts, max_new_tokens=8))


def test_candidate_paths_and_stats_per_prompt(policy, reward):
    out = _run(policy, {"truth": reward}, PROMPTS[:4], max_prompts=4, strategy="step_beam", beam_width=2,
               num_candidates=2, max_new_tokens=16, step="max_tokens", min_step_tokens=0, max_step_tokens=4)
    for res in out.values():
        ended = [response_ids_of(res, s, i) for s, st in enumerate(res.steps)
                 for i, c in enumerate(st.candidates) if c.end != "step"]
        assert res.token_ids in ended
        assert 0 < res.stats.policy_tokens <= res.stats.policy_tokens_padded
        assert 0 < res.stats.prm_tokens <= res.stats.prm_tokens_padded and res.stats.steps == len(res.steps)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_memory_stays_flat_over_200_prompts(policy, reward):
    """Finished prompts leave nothing behind: the KV caches stay bounded and the process RSS does
    not grow from prompt 50 to prompt 200."""
    from mahalo.config import config_from_options
    from mahalo.engine.build import controller_of
    from mahalo.engine.scheduler import schedule

    cfg = config_from_options(num_candidates=2, max_new_tokens=16, step="max_tokens", min_step_tokens=0,
                              max_step_tokens=4, max_prompts=8)
    controller = controller_of(policy, {"truth": reward}, cfg)
    prompts = (f"Question {i} about {'cats ' * (i % 7)}?" for i in range(200))
    rss, held, done = {}, [], 0
    for _, res in schedule(controller, prompts, max_prompts=8):
        done += 1
        assert not isinstance(res, ValueError)
        held.append(controller.held_tokens())
        if done in (50, 200):
            rss[done] = _rss_mb()
    assert done == 200 and controller.held_tokens() == 0 and not controller.kv.row.in_use
    from mahalo.chat import generation_prompt_ids

    longest = max(len(generation_prompt_ids(policy[1], [{"role": "user", "content": f"Question {i} about "
                                                                          f"{'cats ' * (i % 7)}?"}])) for i in range(7))
    assert max(held) <= 8 * (longest + 16 + 2 * 4)  # 8 prompts: each its prompt, 1 beam of <= 16, 2 rows of <= 4
    assert rss[200] - rss[50] < 40, rss


def test_rows_that_ended_their_step_leave_the_forward_and_change_nothing(policy, reward):
    """Rows that ended their step wait without being fed (each forward feeds only decoding rows,
    and the prompt's next step starts as soon as its own rows have all ended); answers stay those
    of each prompt alone."""
    from mahalo.config import config_from_options
    from mahalo.engine.build import controller_of
    from mahalo.engine.scheduler import schedule

    kw = dict(strategy="step_best_of_n", num_candidates=4, max_new_tokens=30, step="sentence", min_step_tokens=1,
              max_step_tokens=12, stop_token_ids=list(range(16, 56)), seed=2)  # 1 in 8 tokens ends a response
    alone = _run(policy, {"truth": reward}, PROMPTS, max_prompts=1, **kw)
    controller = controller_of(policy, {"truth": reward}, config_from_options(**kw))
    controller.counters.trace = []
    batched = dict(schedule(controller, PROMPTS, max_prompts=8))
    assert all(batched[i].token_ids == alone[i].token_ids for i in range(len(PROMPTS)))
    trace = controller.counters.trace
    assert all(t["rows_fed"] <= t["rows_held"] for t in trace)
    assert any(t["rows_fed"] < t["rows_held"] for t in trace)  # some rows waited, unfed
    for res in batched.values():
        assert res.stats.policy_tokens <= res.stats.policy_tokens_padded


def test_engine_fed_from_threads_gives_the_same_answers(policy, reward):
    """Prompts submitted over time from several threads (a Ray replica's concurrent batches) get
    the answers guided_generate_many gives; a bad prompt fails alone; close() drains."""
    import threading

    from mahalo.config import config_from_options
    from mahalo.engine.controller import Controller
    from mahalo.engine.scheduler import Engine
    from mahalo.policy import as_policy
    from mahalo.rewards import as_reward

    kw = dict(max_new_tokens=24, seed=3, num_candidates=3, step="sentence", min_step_tokens=2)
    prms = {"truth": reward}
    expected = _run(policy, prms, PROMPTS, **kw)
    cfg = config_from_options(None, **kw)
    engine = Engine(Controller(as_policy(policy), {"truth": as_reward(reward, "truth")}, cfg), max_prompts=3)
    got: dict[int, object] = {}

    def caller(indices):
        futures = {i: engine.submit(PROMPTS[i]) for i in indices}
        got.update({i: f.result(timeout=120) for i, f in futures.items()})

    threads = [threading.Thread(target=caller, args=(range(k, len(PROMPTS), 3),)) for k in range(3)]
    for t in threads:
        t.start()
    bad = engine.submit("")
    for t in threads:
        t.join()
    assert isinstance(bad.result(timeout=60), ValueError)
    assert sorted(got) == list(range(len(PROMPTS)))
    for i in range(len(PROMPTS)):
        assert got[i].token_ids == expected[i].token_ids, i
    late = engine.submit(PROMPTS[0])
    engine.close()
    assert late.result(timeout=0).token_ids == expected[0].token_ids
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit("Hi")


def test_engine_hands_a_crash_to_every_waiting_caller(policy, reward, monkeypatch):
    from mahalo.config import config_from_options
    from mahalo.engine.controller import Controller
    from mahalo.engine.scheduler import Engine
    from mahalo.policy import as_policy

    controller = Controller(as_policy(policy), {}, config_from_options(None, strategy="sample", max_new_tokens=8))
    monkeypatch.setattr(controller, "tick", lambda: (_ for _ in ()).throw(MemoryError("out of memory")))
    engine = Engine(controller, max_prompts=4)
    futures = [engine.submit(p) for p in PROMPTS[:3]]
    for f in futures:
        with pytest.raises(MemoryError, match="out of memory"):
            f.result(timeout=60)
    with pytest.raises(RuntimeError, match="stopped \\(out of memory\\)"):
        engine.submit("Hi")


def _engine(policy, rewards, **options):
    from mahalo.config import config_from_options
    from mahalo.engine.controller import Controller
    from mahalo.engine.scheduler import Engine
    from mahalo.policy import as_policy
    from mahalo.rewards import as_reward

    cfg = config_from_options(None, **options)
    controller = Controller(as_policy(policy), {k: as_reward(v, k) for k, v in rewards.items()}, cfg)
    return Engine(controller, max_prompts=8), cfg


SEARCHES = [
    ({"strategy": "step_best_of_n", "num_candidates": 3, "weights": {"truth": 1.0}}, ["truth"]),
    ({"strategy": "step_beam", "num_candidates": 2, "beam_width": 2, "weights": {"helpful": 1.0}}, ["helpful"]),
    ({"strategy": "best_of_n", "num_candidates": 3, "weights": {"truth": 1.0, "helpful": 0.5},
      "normalize": "zscore"}, ["truth", "helpful"]),
    ({"strategy": "sample", "temperature": 0.7, "top_k": 0, "top_p": 0.9}, []),
    ({"strategy": "dvts", "num_candidates": 2, "beam_width": 2, "seed": 9, "weights": {"truth": 1.0}}, ["truth"]),
]


def test_prompts_with_different_searches_share_a_batch_and_answer_as_alone(policy, reward):
    """Each prompt brings its own strategy, N, B, weights, sampling and seed (a server's requests):
    in one batch each gets exactly what guided_generate gives it alone, guided by its own
    objectives only (the others are not even scored for it)."""
    from mahalo.app.tiny import tiny_reward

    helpful = tiny_reward(seed=2)
    base = dict(max_new_tokens=24, step="max_tokens", min_step_tokens=0, max_step_tokens=6)
    engine, cfg = _engine(policy, {"truth": reward, "helpful": helpful}, **base)
    from mahalo.config import config_from_options

    prompts = ["Is the earth flat?", "Why is the sky blue?", "Name a cat.", "Do dogs like walks?", "Hi!"]
    futures = []
    for (opts, objectives), prompt in zip(SEARCHES, prompts):
        plan = engine.controller.plan(config_from_options(cfg, **opts), objectives)
        futures.append(engine.submit(prompt, plan))
    got = [f.result(timeout=120) for f in futures]
    engine.close()
    for (opts, objectives), prompt, res in zip(SEARCHES, prompts, got):
        alone = guided_generate(policy, {n: {"truth": reward, "helpful": helpful}[n] for n in objectives}, prompt,
                                **base, **opts)
        assert res.token_ids == alone.token_ids, opts
        assert set(res.scores) == set(objectives)
        assert res.scores == pytest.approx(alone.scores, abs=1e-6)
        assert res.stats.prm_tokens == alone.stats.prm_tokens  # no cost for objectives it does not use


def test_engine_streams_accepted_steps_and_drops_cancelled_prompts(policy, reward):
    import threading

    base = dict(strategy="step_best_of_n", num_candidates=2, max_new_tokens=30, step="max_tokens",
                min_step_tokens=0, max_step_tokens=5, weights={"truth": 1.0})
    engine, cfg = _engine(policy, {"truth": reward}, **base)
    seen = []
    res = engine.submit("Is the earth flat?", on_step=seen.append).result(timeout=60)
    assert len(seen) == len(res.steps) - 1 >= 2  # every step but the last, which ends the answer
    for a, b in zip(seen, seen[1:]):
        assert b.startswith(a)
    assert res.text.startswith(seen[-1])
    # a prompt cancelled in flight leaves the batch; the engine goes on with the others
    gate = threading.Event()
    first = engine.submit("Why?", on_step=lambda _: gate.set())
    assert gate.wait(30)
    engine.cancel(first)
    assert first.cancelled()
    other = engine.submit("Is the earth flat?").result(timeout=60)
    assert other.token_ids == res.token_ids
    assert engine.pending == 0 and engine.controller.in_flight == 0
    engine.close()
