"""The shared-prefix cache and its cascade attention compute what a plain forward computes, and
the token-level engine gives every prompt the tokens of the lockstep, unshared engine."""

import json
import random

import pytest
import torch

from mahalo import decode, guided_generate_many
from mahalo.app.tiny import tiny_policy, tiny_reward
from mahalo.cascade import BEAM, PROMPT, ROOT, ROW, Item
from mahalo.policy import HFPolicy
from tests.helpers import prompt_ids

TOL = 1e-5
NONE = (-1, 0)


def _plain(model, ids: list[int]) -> torch.Tensor:
    """What a user computes: the logits after ``ids``, one plain forward, no cache."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_every_level_and_item_kind_equals_a_plain_forward(style):
    """Random paths through every operation the engine uses: a root prefix shared by two prompts,
    chunked prefills packed with decode tokens, rows on beams, copy-on-write beams, multi-token
    items written after a row (a reward head's suffix) and on a scratch row cut back into its
    beam. Each output equals a plain forward of the tokens it has seen, to 1e-5."""
    model, tok = tiny_policy(style=style)
    policy = HFPolicy(model, tok)
    kv = policy.shared_kv()
    rng = random.Random(0)
    system = prompt_ids(tok, [{"role": "system", "content": "You answer briefly and truthfully."},
                              {"role": "user", "content": "x"}])[:12]
    prompts = [system + prompt_ids(tok, f"Question {i}: why?")[3:] for i in range(3)]
    root = kv.root.alloc()
    slots = [kv.prompt.alloc() for _ in prompts]
    worst = 0.0

    def check(items, expected):
        nonlocal worst
        hidden, _ = policy.run(kv, items)
        got = policy.logits(hidden)
        for g, ids in zip(got, expected):
            worst = max(worst, float((g - _plain(model, ids)).abs().max()))

    # the root (shared) in two chunks, then each prompt's rest; the first prompt's rest packed with the root's end
    check([Item(system[:5], 0, (ROOT, root, 0), (NONE,) * 4)], [system[:5]])
    check([Item(system[5:], 5, (ROOT, root, 5), (NONE,) * 4, out="none"),
           Item(prompts[0][12:], 12, (PROMPT, slots[0], 0), ((root, 12), NONE, NONE, NONE))], [prompts[0]])
    check([Item(p[12:], 12, (PROMPT, s, 0), ((root, 12), NONE, NONE, NONE)) for p, s in zip(prompts[1:], slots[1:])],
          prompts[1:])
    # rows: (prompt index, beam slot, beam ids, row slot, row ids)
    rows = [[i, -1, [], kv.row.alloc(), []] for i in (0, 0, 1, 2, 2, 2)]

    def reads(r):
        i, b, bids, _, _ = r
        return ((root, 12), (slots[i], len(prompts[i]) - 12), (b, len(bids)), NONE)

    def full(r):
        return prompts[r[0]] + r[2] + r[4]

    for tick in range(12):
        items, expected = [], []
        for r in rows:
            t = rng.randrange(3, len(tok))
            items.append(Item([t], len(full(r)), (ROW, r[3], len(r[4])), reads(r)))
            r[4].append(t)
            expected.append(full(r))
        check(items, expected)
        if tick in (3, 7):  # rows 0, 2 and 3 survive; row 3's beam is kept twice (copy-on-write)
            beams = []
            for r in (rows[0], rows[2], rows[3], rows[3]):
                b = kv.beam.alloc()
                if r[1] >= 0:
                    kv.beam.copy(b, 0, kv.beam, r[1], 0, len(r[2]))
                kv.beam.copy(b, len(r[2]), kv.row, r[3], 0, len(r[4]))
                beams.append((r[0], b, r[2] + r[4]))
            for r in rows:
                kv.row.release(r[3])
            rows = [[i, b, ids, kv.row.alloc(), []] for i, b, ids in beams for _ in range(2)]
    # a reward head's suffix after each row, and on a scratch row cut back inside its beam
    suffix = [rng.randrange(3, len(tok)) for _ in range(3)]
    check([Item(suffix, len(full(r)), (ROW, r[3], len(r[4])), reads(r), out="all") for r in rows[:2]],
          [full(r) + suffix[:k + 1] for r in rows[:2] for k in range(3)])
    r = rows[0]
    cut = len(prompts[r[0]]) + len(r[2]) - 2
    scratch = kv.row.alloc()
    cut_reads = ((root, 12), (slots[r[0]], len(prompts[r[0]]) - 12), (r[1], len(r[2]) - 2), NONE)
    check([Item(suffix, cut, (ROW, scratch, 0), cut_reads)], [full(r)[:cut] + suffix])
    assert worst <= TOL, worst


PROMPTS = [f"Question {i}: {t}?" for i, t in enumerate(
    ["Is the earth flat", "Why is the sky blue", "Hi", "What is water", "Name a cat", "Tell me a story",
     "Where is Paris", "How do dogs sleep"])]
SEARCHES = [
    dict(strategy="step_best_of_n", num_candidates=3, step="sentence", min_step_tokens=2),
    dict(strategy="step_beam", beam_width=2, num_candidates=3, step="max_tokens", min_step_tokens=0,
         max_step_tokens=5),
    dict(strategy="dvts", beam_width=2, num_candidates=2, step="max_tokens", min_step_tokens=0, max_step_tokens=4),
    dict(strategy="best_of_n", num_candidates=4),
    dict(strategy="sample"),
]


@pytest.mark.parametrize("options", SEARCHES)
def test_answers_do_not_depend_on_scheduling_sharing_or_chunking(options):
    """Every prompt gets the same tokens whatever the engine does: lockstep steps without shared
    prefixes (the ablation), token-level steps with them, 1 or 8 prompts in flight, a tight row
    budget, prefills in chunks of 7 tokens; a system turn shared by every prompt."""
    policy, reward = tiny_policy(), tiny_reward(seed=1)
    prms = {"truth": reward, "len": lambda p, r: -len(r) / 50}
    kw = dict(max_new_tokens=24, normalize="zscore", seed=5, system_prompt="Answer in a few words, truthfully.",
              **options)
    base = dict(guided_generate_many(policy, prms, PROMPTS, max_prompts=1, step_barrier=True, share_prefix=False,
                                     **kw))
    for settings in (dict(max_prompts=8, step_barrier=True, share_prefix=False),
                     dict(max_prompts=8, step_barrier=True),
                     dict(max_prompts=8),
                     dict(max_prompts=8, max_rows=6, prefill_chunk=7),
                     dict(max_prompts=3, share_prefix=False)):
        got = dict(guided_generate_many(policy, prms, PROMPTS, **settings, **kw))
        assert sorted(got) == list(range(len(PROMPTS)))
        for i in range(len(PROMPTS)):
            assert got[i].token_ids == base[i].token_ids, (settings, i)
            assert got[i].scores == pytest.approx(base[i].scores, abs=1e-4)


def test_the_token_level_engine_needs_fewer_forwards_and_less_kv():
    """The point of it, in counts. Requests whose steps differ in length share an engine (4 in
    flight; odd ones take 11-token steps, even ones 3-token steps): the lockstep engine makes the
    short steps wait for the long ones, the token-level engine does not, so it runs far fewer
    policy forwards and feeds twice the rows per forward, with the same answers. Sharing prefixes
    holds a fraction of the KV."""
    from mahalo.config import config_from_options
    from mahalo.engine.build import controller_of
    from mahalo.engine.scheduler import Engine

    policy, reward = tiny_policy(), tiny_reward(seed=1)
    base = dict(strategy="step_beam", beam_width=2, num_candidates=4, step="max_tokens", min_step_tokens=0,
                max_new_tokens=48, weights={"truth": 1.0})
    runs = {}
    for name, opts in {"lockstep": dict(step_barrier=True, share_prefix=False), "new": {}}.items():
        cfg = config_from_options(None, **base, **opts)
        controller = controller_of(policy, {"truth": reward}, cfg)
        controller.counters.trace = []
        engine = Engine(controller, max_prompts=4, max_rows=64 if name == "lockstep" else 32)
        futures = [engine.submit(f"{p} (system: answer briefly and truthfully)",
                                 controller.plan(config_from_options(cfg, max_step_tokens=3 + 8 * (i % 2))))
                   for i, p in enumerate(PROMPTS * 2)]
        answers = [f.result(timeout=120).token_ids for f in futures]
        engine.close()
        c = controller.counters
        runs[name] = (answers, c.forwards, c.rows_fed / c.forwards, max(t["kv_tokens_held"] for t in c.trace))
    (old, old_forwards, old_fed, old_held), (new, new_forwards, new_fed, new_held) = runs["lockstep"], runs["new"]
    assert new == old
    assert new_forwards * 1.6 < old_forwards and new_fed > 1.6 * old_fed, (old_forwards, new_forwards, old_fed, new_fed)
    assert new_held * 2 < old_held, (old_held, new_held)


def test_the_cli_ablation_writes_the_same_tokens(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    base = ["models=tiny", "+objective=truth", "search=step_beam", "search.beam_width=2", "search.num_candidates=3",
            "search.max_new_tokens=32", f"prompts={path}"]
    out_new, out_old = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    assert decode.main([*base, f"output={out_new}"]) == 0
    assert decode.main([*base, f"output={out_old}", "engine.step_barrier=true", "engine.share_prefix=false"]) == 0

    def searches(path):  # every candidate's tokens at every step, and the answer, per prompt
        return {r["index"]: ([[c["token_ids"] for c in s["candidates"]] for s in r["steps"]], r["text"])
                for r in map(json.loads, path.read_text().splitlines())}

    new, old = searches(out_new), searches(out_old)
    assert len(new) == len(PROMPTS) and new == old


def test_a_compiled_policy_gives_the_same_answers():
    """``engine.compile=true`` (torch.compile of the backbone; attention stays eager) changes no token."""
    from mahalo import guided_generate

    policy, reward = tiny_policy(), tiny_reward(seed=1)
    kw = dict(strategy="step_beam", beam_width=2, num_candidates=2, max_new_tokens=16, step="max_tokens",
              min_step_tokens=0, max_step_tokens=4, seed=3)
    eager = guided_generate(policy, {"truth": reward}, PROMPTS[1], **kw)
    compiled = guided_generate(policy, {"truth": reward}, PROMPTS[1], compile=True, **kw)
    assert compiled.token_ids == eager.token_ids
    assert compiled.scores == pytest.approx(eager.scores, abs=1e-5)
