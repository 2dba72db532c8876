"""The one loop behind every strategy: token-level continuous batching of guided searches.

Each prompt moves through its own steps; no prompt waits for another. One *tick* is one token:

    1. sample     every decoding row draws its next token (one transfer)       # (R,)
    2. advance    per row: keep the token, or end its step (boundary, end of turn, budget)
    3. forward    one packed forward of everything the policy must read:       # (1, N)
                    the kept tokens of decoding rows,
                    chunks of new prompts' prefills,
                    a reward head's scoring suffix for prompts whose step just ended
    4. complete   prompts whose candidates have all ended their step: their reward models score
                  them (one batch per model for all such prompts), and each combines, selects,
                  records and keeps its survivors, then fans out its next candidates at once
    5. finish     prompts with an answer leave; their slots are free for the next admission

A prompt's answer never depends on its neighbours: each row samples from its own stream
(:mod:`mahalo.sampling`), each prompt normalises and selects among its own candidates, and
scheduling decides only *when* a row's token is computed, never what it is.

The cache shares prefixes (:mod:`mahalo.cascade`): a prompt's keys and values are stored once
(and a prefix common to many prompts, such as a system turn, once for all of them), a beam's
accepted steps once for its N candidates, and a row holds only its current step. Fanning out
copies nothing; keeping a step copies that step's tokens.

Ablations (``engine.*``): ``step_barrier=true`` makes every prompt in flight wait for the others
at each step (the lockstep engine: scoring, selection and admission only between global steps);
``share_prefix=false`` gives every candidate row a private copy of its prompt and beam, as a
plain per-row cache holds them. Neither changes an answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mahalo.cascade import PROMPT, ROOT, ROW, Item
from mahalo.chat import Messages, conversation_prefix_ids
from mahalo.config import GuideConfig
from mahalo.engine import scoring
from mahalo.engine.expand import Expander
from mahalo.engine.rows import Beam, Finished, Plan, Prompt, Row, Search
from mahalo.engine.strategies import Selection, Strategy, final_order, first_copies, prune_rows, select, strategy_for
from mahalo.policy import Policy
from mahalo.result import Answer, Candidate, GuidedResult, PromptError, Stats, Step, path_to
from mahalo.rewards import Candidates, RewardModel
from mahalo.rewards.combine import check_scores, combine
from mahalo.sampling import child_stream, root_stream

log = logging.getLogger(__name__)

MIN_SHARED = 16  # a prefix common to several prompts is stored once when at least this long
HEAD_ROOM = 16  # columns a row slot keeps for a reward head's scoring suffix (more are made if needed)


@dataclass
class Counters:
    """What the policy has done so far (for benchmarks): forwards, what they fed, what they read.
    With ``trace`` on, one record per forward."""

    forwards: int = 0
    scorings: int = 0  # batches of prompts whose steps ended together (one reward-model batch each)
    rows_fed: int = 0  # decode tokens (one per decoding row and tick)
    prefill_tokens: int = 0
    head_tokens: int = 0  # a reward head's scoring tokens, forwarded through the policy
    kv_tokens_read: int = 0  # KV columns read by the forwards' attention (each slot once per forward)
    ticks: int = 0
    trace: list[dict[str, int]] | None = None  # per forward
    scoring_trace: list[dict[str, int]] | None = None  # per scoring batch (with ``trace`` on)

    def add(self, **record: int) -> None:
        self.forwards += 1
        self.rows_fed += record["rows_fed"]
        self.prefill_tokens += record["prefill_tokens"]
        self.head_tokens += record["head_tokens"]
        self.kv_tokens_read += record["kv_tokens_read"]
        if self.trace is not None:
            self.trace.append(record)


@dataclass
class _Root:
    """A prefix common to several prompts (a system turn), stored once in a root slot."""

    ids: tuple[int, ...]
    slot: int
    owner: Search  # the prompt whose prefill writes it
    users: int = 0
    filled: int = 0  # its tokens forwarded so far


@dataclass
class _Forward:
    """What one tick forwards, in this order (each item's output, if any, in the same order)."""

    rows: list[tuple[Row, Item]] = field(default_factory=list)  # decoding rows' kept tokens (output: last)
    prefills: list[tuple[Search | None, Item]] = field(default_factory=list)  # prefill chunks (a root's: None)
    heads: list[tuple[Search, int, list[int], list[Item]]] = field(default_factory=list)  # (search, source, scratch, items)

    @property
    def items(self) -> list[Item]:
        return [i for _, i in self.rows] + [i for _, i in self.prefills] + [i for *_, items in self.heads for i in items]


class Controller:
    """Runs many prompts through the searches described by :class:`GuideConfig` (and each
    prompt's own :class:`Plan`), one token at a time.

    :meth:`admit` adds prompts; :meth:`tick` advances everything in flight by one token and returns
    the prompts that ended; :mod:`mahalo.engine.scheduler` decides when to admit. ``accepted``
    lists, after each tick, the text that became final for the prompts being :meth:`watch`-ed (for
    streaming); :meth:`cancel` drops a prompt at the next tick.
    """

    def __init__(self, policy: Policy, rewards: dict[str, RewardModel], cfg: GuideConfig) -> None:
        cfg.check_objectives(list(rewards))
        self.policy, self.rewards, self.cfg = policy, rewards, cfg
        self.options = cfg.engine
        self.share = cfg.engine.share_prefix
        self.barrier = cfg.engine.step_barrier
        why = policy.unsupported() if hasattr(policy, "unsupported") else None
        if why is not None:
            raise ValueError(f"mahalo's cache cannot run this policy: {why}")
        self.expander = Expander(policy, cfg)
        self.sources = scoring.sources_of(rewards)
        # rewards read from the policy's own hidden states at every token (mahalo.rewards.probe)
        self.probes = [(k, src) for k, src in enumerate(self.sources) if getattr(src.model, "reads_layers", None)]
        if self.probes:
            if not hasattr(policy, "capture"):
                raise ValueError(f"{type(policy).__name__} cannot lend its hidden states to a token-level probe")
            policy.capture({k for _, src in self.probes for k in src.model.reads_layers})
        self.default = self.plan(cfg)  # the plan of a prompt that brings none
        self.kv = policy.shared_kv()
        self.device = policy.device
        self.vocab = policy.vocab_size
        self.expander.ready(self.vocab, False, self.device)
        with torch.inference_mode():
            self.logits = torch.zeros(0, self.vocab, device=self.device)  # (row slots, V): each row's next-token logits
            self.probe_vals = torch.zeros(0, len(self.probes), device=self.device)  # (row slots, P): at its last fed token
        self.searches: list[Search] = []
        self.decoding: list[Row] = []
        self.waiting: list[Search] = []  # step_barrier: prompts whose step ended, waiting for the others
        self.roots: dict[tuple[int, ...], _Root] = {}
        self.accepted: list[tuple[int, str]] = []  # after a tick: (input index, final text so far) of watched prompts
        self.watched: dict[int, int] = {}  # input index -> response tokens already final and reported
        self.cancelled: set[int] = set()
        self.counters = Counters()
        self.admitted = 0  # prompts admitted so far
        self.cleans_spaces = cleans_spaces(policy)  # streamed text holds back its last word

    # -- what the scheduler reads ----------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Prompts in the batch (prefilling, decoding or waiting)."""
        return len(self.searches)

    @property
    def decoding_rows(self) -> int:
        """Rows that will be fed at the next token, and rows promised to prompts still prefilling."""
        return len(self.decoding) + sum(s.plan.rows for s in self.searches if s.prefilling)

    @property
    def rows_held(self) -> int:
        """Candidate rows of every prompt in flight, decoding or waiting (the lockstep engine's count)."""
        return sum(len(s.rows) if s.rows else s.plan.rows for s in self.searches)

    @property
    def between_steps(self) -> bool:
        """No row of the current global step has drawn a token yet (step_barrier admits only then)."""
        return all(not row.tokens and not row.end for row in self.decoding) and not self.waiting

    # -- plans and admission ---------------------------------------------------------------

    def plan(self, cfg: GuideConfig, objectives: list[str] | None = None) -> Plan:
        """The :class:`Plan` of a prompt decoded with ``cfg``, guided by ``objectives`` (default:
        every reward model, weighted by ``cfg``).

        Raises:
            ValueError: an unknown objective, or a step rule, stop tokens or engine options other
                than this controller's (they are shared by the whole batch).
        """
        cfg.check_objectives(list(self.rewards))
        names = list(self.rewards) if objectives is None else list(objectives)
        unknown = sorted(set(names) - set(self.rewards))
        if unknown:
            raise ValueError(f"unknown objective(s) {unknown}: known objectives are {sorted(self.rewards)}")
        if (cfg.step.kind, cfg.sampling.stop_token_ids) != (self.cfg.step.kind, self.cfg.sampling.stop_token_ids):
            raise ValueError(
                f"step={cfg.step.kind!r} and stop_token_ids are fixed for this engine "
                f"(step={self.cfg.step.kind!r}, stop_token_ids={self.cfg.sampling.stop_token_ids})"
            )
        strategy = strategy_for(cfg)
        cap = cfg.step.max_step_tokens if strategy.stepwise else cfg.search.max_new_tokens
        weights = {n: cfg.weight(n) for n in names}
        prune, prune_source = self._prune_ranking(cfg, weights) if cfg.search.prune else ((), None)
        by = cfg.search.prune_by if cfg.search.prune else None
        if by is not None and by not in cfg.objective.weights:
            weights[by] = 0.0  # read for pruning; in the selection only when objective.weights says so
        return Plan(cfg, strategy, weights, cap, root_stream(cfg.search.seed), prune, prune_source)

    def _prune_ranking(self, cfg: GuideConfig, weights: dict[str, float]) -> tuple[tuple[float, ...], int | None]:
        """What ``search.prune`` ranks partial candidates by: the probes' weights (a probe, or the
        token-level objectives by default), or the source of the reward model that ``prune_by``
        names (scored on copies of the prompt's state at each pruning: :meth:`_model_partials`).

        Raises:
            ValueError: ``prune_by`` names nothing loaded, or a reward model that cannot score a
                partial candidate without changing its state; no probe to rank by. Names the fix.
        """
        by = cfg.search.prune_by
        probes = {name for _, src in self.probes for name in src.names}
        if by is None or by in probes:
            return self._prune_weights(cfg, weights), None
        k = next((k for k, src in enumerate(self.sources) if by in src.names), None)
        if k is None:
            raise ValueError(f"search.prune_by={by!r} is not a loaded objective (known: {sorted(self.rewards)}): "
                             "name a probe or a reward model that guides the search")
        model = self.sources[k].model
        if not hasattr(model, "merge"):
            raise ValueError(
                f"search.prune_by={by!r} cannot score partial candidates without changing its state (its "
                f"{type(model).__name__} has no merge): prune by a probe (family: probe) or by a reward model with merge")
        return (), k

    def _prune_weights(self, cfg: GuideConfig, weights: dict[str, float]) -> tuple[float, ...]:
        """Each token-level probe's weight in the partial score that ``search.prune`` ranks by
        (``prune_by``: a probe, or None).

        Raises:
            ValueError: no token-level objective to rank by, naming the fix.
        """
        by = cfg.search.prune_by
        probes = {name: p for p, (_, src) in enumerate(self.probes) for name in src.names}
        out = [0.0] * len(self.probes)
        for name, p in probes.items():
            if by is None:
                out[p] += weights.get(name, 0.0)
            elif name == by:
                out[p] = 1.0
        if not any(out):
            raise ValueError(
                "search.prune needs a reward scored at every token to rank partial candidates: load a probe "
                "(a reward with family: probe, e.g. +objective=truth_prune) and name it in search.prune_by, "
                "or name a separate reward model there (scored on each partial candidate, at its cost)")
        return tuple(out)

    def prepare(self, messages: Messages, plan: Plan | None = None) -> Prompt:
        """Tokenise a prompt for the policy and check that every model it will read has room for
        it at the most its search can reach (prompt + ``max_new_tokens`` + scoring suffix, in each
        model's own tokens). Safe to call from another thread (it only reads the tokenizers).

        Raises:
            PromptError: a model's context is too small, naming the model and the fix.
        """
        plan = plan or self.default
        ids = self.policy.prompt_ids(messages)
        ctx, budget = self.policy.max_context, plan.cfg.search.max_new_tokens
        if ctx is not None and len(ids) + budget > ctx:
            raise PromptError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({budget}) exceeds the policy's "
                f"context ({ctx} tokens): shorten the prompt or lower max_new_tokens"
            )
        for source in self.sources:
            need = getattr(source.model, "context_need", None)
            if need is None or not source.used_by(plan.weights):
                continue
            tokens, limit = need(messages, budget, plan.max_steps)
            if limit is not None and tokens > limit:
                raise PromptError(
                    f"the reward model of {source.names} would read up to {tokens} tokens (prompt + max_new_tokens "
                    f"({budget}) + its scoring suffix), above its context ({limit} tokens): shorten the prompt "
                    "or lower max_new_tokens"
                )
        return Prompt(messages, ids, plan)

    def watch(self, index: int) -> None:
        """Report prompt ``index``'s response as it becomes final, in ``accepted`` after each tick:
        the text of the tokens that every response it can still answer with shares (its surviving
        beams, its current candidates, its finished pool), without a trailing incomplete character
        (:func:`stable_text`). A one-row search (``sample``) grows token by token; a step search
        when a selection leaves its beams and pool with a longer common prefix. The tokens are on
        the host already (the tick's one transfer): watching costs no device sync, only a decode
        of the prefix when it grows."""
        self.watched[index] = 0

    def _report(self, s: Search, rows: bool) -> None:
        """Append ``s``'s newly final text to ``accepted`` (``rows``: its current candidates'
        tokens count too, else only its beams' and finished pool's)."""
        seen = self.watched.get(s.index)
        if seen is None:
            return
        heads = [(row.beam.token_ids, row.tokens) for row in s.rows] if rows else [(b.token_ids, ()) for b in s.beams]
        held = heads + [(f.beam.token_ids, ()) for f in s.finished]
        n = common_prefix(held, seen)
        if n > seen:
            first = held[0]
            ids = list(first[0][:n]) + list(first[1][:max(0, n - len(first[0]))])
            self.watched[s.index] = n
            self.accepted.append((s.index, stable_text(self.policy.decode(ids), self.cleans_spaces)))

    def cancel(self, index: int) -> None:
        """Drop prompt ``index`` at the next tick (its slots are freed; it is not reported)."""
        self.cancelled.add(index)

    @torch.inference_mode()
    def admit(self, prompts: list[tuple]) -> list[tuple[int, ValueError]]:
        """Add ``prompts`` to the batch: (input index, messages) pairs, (input index, messages,
        :class:`Plan`) for a prompt with its own options, or (input index, :class:`Prompt`) for
        a prompt already prepared. Their prefills join the next forwards (chunked, a few hundred
        tokens per forward); with ``step_barrier`` they are prefilled at once.

        Returns:
            the prompts that could not join, with the reason (a prompt longer than a model's
            context, a reward model that could not read it).
        """
        failed = []
        joined = []
        for index, item, *rest in prompts:
            try:
                prompt = item if isinstance(item, Prompt) else self.prepare(item, rest[0] if rest else None)
                states, costs = {}, []
                for k, source in enumerate(self.sources):  # before any slot: a failure here holds nothing
                    if source.used_by(prompt.plan.weights):
                        states[k], cost = scoring.add(source, prompt.messages)
                        costs.append(cost)
            except ValueError as err:
                failed.append((index, err))
                continue
            if prompt.plan.strategy.stepwise:
                self.expander.ready(self.vocab, True, self.device)
            n = len(prompt.ids)
            stats = Stats(prompt_tokens=n)
            for cost in costs:
                scoring.charge(stats, cost)
            s = Search(index, prompt.plan, prompt.messages, prompt.ids, stats, time.perf_counter(), [
                Beam(stream=prompt.plan.root)], states)
            self._place_prompt(s)
            self.searches.append(s)
            self.admitted += 1
            joined.append(s)
        if self.barrier and joined:  # the lockstep engine prefills between steps
            while any(s.prefilling for s in joined):
                self._forward(self._prefill_items(limit=None), [])
        return failed

    def _place_prompt(self, s: Search) -> None:
        """A prompt slot for ``s``; with shared prefixes, the prefix it has in common with other
        prompts (the conversation before its last user turn: a system turn) in a root slot."""
        prefix = self._shared_prefix(s)
        if prefix:
            root = self.roots.get(prefix)
            if root is None:
                root = self.roots[prefix] = _Root(prefix, self.kv.root.alloc(len(prefix)), s)
            root.users += 1
            s.root_slot, s.shared, s.prefilled = root.slot, len(prefix), len(prefix)
        s.prompt_slot = self.kv.prompt.alloc(len(s.ids) - s.shared)

    def _shared_prefix(self, s: Search) -> tuple[int, ...]:
        if not self.share or len(s.messages) < 2:
            return ()
        ids = conversation_prefix_ids(self.policy.tokenizer, s.messages[:-1])
        n = next((i for i, (a, b) in enumerate(zip(ids, s.ids)) if a != b), min(len(ids), len(s.ids)))
        n = min(n, len(s.ids) - 1)  # the prompt's last token is its own: its logits start the response
        return tuple(s.ids[:n]) if n >= MIN_SHARED else ()

    # -- one token for everything in flight ------------------------------------------------

    @torch.inference_mode()
    def tick(self) -> list[tuple[int, GuidedResult | ValueError]]:
        """Advance everything in flight by one token.

        Returns:
            the prompts whose search ended: (input index, result), or (input index, ValueError)
            for a prompt that failed (a reward model returned NaN or +inf, raised, or could not
            read it); the other prompts go on unchanged.
        """
        done: list[tuple[int, GuidedResult | ValueError]] = []
        self.accepted = []
        self.counters.ticks += 1
        self._drop_cancelled()
        # 1-2. sample every decoding row; keep its token or end its step
        fed, ended = [], []
        if self.decoding:
            pruning = [s for s in self.searches if s.decoding and s.plan.cfg.search.prune]  # drawing a token now
            still = []
            for row, (token, logprob, flags) in zip(self.decoding, self.expander.sample(self.logits, self.decoding)):
                end = self.expander.advance(row, token, logprob, flags)
                row.position += 1
                if end in ("", "step"):  # the token was kept and the row goes on: its next logits are needed
                    fed.append((row, token))
                if end:
                    row.end = "step" if end == "cut" else end
                    row.search.decoding -= 1
                    if not row.search.decoding:
                        ended.append(row.search)
                else:
                    still.append(row)
            self.decoding = still
            fed = self._prune(pruning, fed, ended, done) if pruning else fed
        # 3. one forward: kept tokens, prefill chunks, reward heads' scoring suffixes
        self._forward(self._prefill_items(self.options.prefill_chunk), fed, ended)
        # 4-5. prompts whose step ended: score, select, keep, fan out (step_barrier: all at once)
        if self.barrier:
            self.waiting += ended
            ended = []
            if not self.decoding and self.waiting and not any(s.prefilling for s in self.searches):
                ended, self.waiting = self.waiting, []
        if ended:
            done += self._complete(ended)
        for s in self.searches:  # a one-row search (sample) streams token by token
            if s.index in self.watched and len(s.rows) == 1 and not s.finished:
                self._report(s, rows=True)
        return done

    def _forward(self, f: _Forward, fed: list[tuple[Row, int]], ended: list[Search] | None = None) -> None:
        """One packed forward of the kept tokens ``fed``, ``f``'s prefill chunks and the scoring
        suffixes of the prompts whose step ``ended``; updates logits and reads the reward heads."""
        for row, token in fed:
            f.rows.append((row, Item([token], row.length, (ROW, row.slot, row.base + row.fed), self._reads(row))))
            row.fed += 1
        for s in ended or []:
            self._head_items(s, f)
        items = f.items
        if not items:
            return
        t0 = time.perf_counter()
        slots = [row.slot for row, _ in f.rows]  # where the rows' new logits go, sent with the forward
        hidden, packed = self.policy.run(self.kv, items, slots)  # (outputs, H): rows, last prefill chunks, heads
        done = [s for s, item in f.prefills if s is not None and item.out == "last"]
        n_logits = len(f.rows) + len(done)
        logits = self.policy.logits(hidden[:n_logits]) if n_logits else None  # (rows + prompts prefilled, V)
        self._count(f, packed)
        probed = self._probe(n_logits) if self.probes and n_logits else None  # (rows + prompts prefilled, P)
        if f.rows:
            self.logits[packed.extra] = logits[:len(f.rows)]
            if probed is not None:
                self.probe_vals[packed.extra] = probed[:len(f.rows)]
        elapsed = time.perf_counter() - t0
        for row, _ in f.rows:
            row.search.stats.policy_tokens += 1
            row.search.stats.policy_tokens_padded += 1
        for s, item in f.prefills:
            if s is not None:
                s.stats.policy_tokens += len(item.tokens)
                s.stats.policy_tokens_padded += len(item.tokens)
        for j, s in enumerate(done):  # their first step starts from the prompt's last logits (and probe)
            at = len(f.rows) + j
            self._fan_out(s, logits[at:at + 1], None if probed is None else probed[at:at + 1])
        for s in {id(row.search): row.search for row, _ in f.rows}.values():
            s.stats.policy_s += elapsed
        for (s, k, *_), scores in zip(f.heads, self._read_heads(f, hidden[n_logits:])):
            s.head_scores[k] = (scores, s.rewards[k].cost)

    def _count(self, f: _Forward, packed: Any) -> None:
        """Count one packed forward of ``f``'s items in the engine's counters."""
        self.counters.add(rows_fed=len(f.rows), prefill_tokens=sum(len(i.tokens) for _, i in f.prefills),
                          head_tokens=sum(len(i.tokens) for *_, its in f.heads for i in its),
                          kv_tokens_read=packed.stats["kv_tokens_read"], tokens=packed.stats["tokens"],
                          attended=packed.stats["attended"], rows_held=self.rows_held,
                          kv_tokens_held=self.held_tokens(), in_flight=self.in_flight, admitted=self.admitted)

    def _read_heads(self, f: _Forward, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Each of ``f.heads``' scores, read from its outputs in ``hidden`` (the heads' items in
        order); the scratch slots its suffixes used are released."""
        out, start = [], 0
        for _, k, scratch, its in f.heads:
            out.append(self.sources[k].model.read(hidden[start:start + len(its)]))
            start += len(its)
            for slot in scratch:
                self.kv.row.release(slot)
        return out

    def _probe(self, n: int) -> torch.Tensor:
        """(n, P) every probe's score of the first ``n`` outputs of the forward just run."""
        states = self.policy.layer_states
        return torch.stack([src.model.probe(src.model.features(states, n)) for _, src in self.probes], 1)

    def _probe_values(self, searches: list[Search]) -> torch.Tensor:
        """(R, P) float64 on the host: every probe at each row's last fed token, for the rows of
        ``searches`` in order (one transfer)."""
        slots = [row.slot for s in searches for row in s.rows]
        return self.probe_vals[torch.tensor(slots, device=self.device)].double().cpu()

    def _prune(self, pruning: list[Search], fed: list[tuple[Row, int]], ended: list[Search],
               done: list[tuple[int, GuidedResult | ValueError]]) -> list[tuple[Row, int]]:
        """Early rejection (``search.prune``): every ``prune_every`` tokens of a step, the searches
        due end their trailing candidates (:func:`~mahalo.engine.strategies.prune_rows`) and free
        their rows before this tick's forward. Ranked by each row's probes at its last fed token
        (one transfer for every search due at this tick), or by a reward model's score of its
        response so far (:meth:`_model_partials`; a search it fails on fails alone, into
        ``done``). Returns ``fed`` without the pruned rows."""
        due = []
        for s in pruning:  # searches that prune and drew a token this tick
            s.step_tokens += 1
            if s.step_tokens % s.plan.cfg.search.prune_every == 0 and s.decoding:
                due.append(s)
        if not due:
            return fed
        partials, errors = self._model_partials([s for s in due if s.plan.prune_source is not None])
        by_probe = [s for s in due if s.plan.prune_source is None]
        if by_probe:
            vals = self._probe_values(by_probe)  # (R, P)
            start = 0
            for s in by_probe:
                n = len(s.rows)
                partials[id(s)] = vals[start:start + n] @ torch.tensor(s.plan.prune, dtype=torch.float64)  # (R_s,)
                start += n
        gone: set[int] = set()
        for s in due:
            if id(s) in errors:
                gone |= {id(row) for row in s.rows}
                done.append((s.index, errors[id(s)]))
                self._leave(s)
                continue
            groups = torch.tensor([row.group for row in s.rows])
            decoding = torch.tensor([not row.end for row in s.rows])
            drop = prune_rows(partials[id(s)], groups, decoding, s.plan.cfg.search.prune_keep)
            for r in drop:
                row = s.rows[r]
                row.end = "pruned"
                s.stats.pruned_rows += 1
                s.stats.pruned_tokens += len(row.tokens)
                self.kv.row.release(row.slot)
                gone.add(id(row))
            s.rows = [row for row in s.rows if id(row) not in gone]
            s.decoding -= len(drop)
            if drop and not s.decoding:
                ended.append(s)
        self.decoding = [row for row in self.decoding if id(row) not in gone]
        return [(row, token) for row, token in fed if id(row) not in gone]

    def _model_partials(self, searches: list[Search]) -> tuple[dict[int, torch.Tensor], dict[int, ValueError]]:
        """Partial scores (R_s,) float64 of the candidates of ``searches`` (by ``id``), each ranked
        by the reward model its plan prunes by: every candidate still decoding is scored
        on its response so far (the tokens drawn, this tick's included), one that ended its step
        once (its response is final; the score is kept on the row). The searches pruned by one model
        are scored in one batch, on copies of their states (``merge``; a head on the policy's
        backbone: :meth:`_head_partials`), then the copies are dropped:
        each prompt's state stays as if no pruning had scored it, so its step-end scores are
        unchanged. The tokens forwarded are charged to its stats (``prm_tokens`` and
        ``prune_prm_tokens``). A search the model fails on gets an error instead (as
        :func:`mahalo.engine.scoring.score` assigns it)."""
        partials: dict[int, torch.Tensor] = {}
        errors: dict[int, ValueError] = {}
        for k in sorted({s.plan.prune_source for s in searches}):
            group = [s for s in searches if s.plan.prune_source == k]
            source = self.sources[k]
            t = time.perf_counter()
            todo = [[row for row in s.rows if not row.end or row.final_partial is None] for s in group]
            if getattr(source.model, "shares_policy", False):
                result = self._head_partials(k, group, todo)
            else:
                result = scoring.score(source, [s.rewards[k] for s in group],
                                       [self._candidates(s, rows) for s, rows in zip(group, todo)],
                                       [len(s.beams) for s in group], scratch=True)
            elapsed = time.perf_counter() - t
            for j, (s, rows) in enumerate(zip(group, todo)):
                s.stats.prm_s += elapsed
                if j in result.errors:
                    errors[id(s)] = result.errors[j]
                    continue
                cost = result.costs.get(j)
                scoring.charge(s.stats, cost)
                s.stats.prune_prm_tokens += sum(cost.tokens) if cost is not None else 0
                scores = dict(zip(map(id, rows), source.columns(result.scores[j])[s.plan.cfg.search.prune_by].tolist()))
                for row in rows:
                    if row.end:
                        row.final_partial = scores[id(row)]
                partials[id(s)] = torch.tensor([row.final_partial if row.end else scores[id(row)] for row in s.rows],
                                               dtype=torch.float64)
        return partials, errors

    def _head_partials(self, k: int, searches: list[Search], rows: list[list[Row]]) -> scoring.Scored:
        """The scores of ``rows`` (per search) by reward head ``k`` on the policy's backbone, for
        pruning: their scoring suffixes (the token drawn this tick, then the end of turn the head
        reads) in one policy forward of their own, before the tick's; written after each row's
        tokens (the tick's forward overwrites them) or into scratch slots, released after. The
        head's state is a copy, dropped after."""
        model = self.sources[k].model
        out, f = scoring.Scored(self.sources[k]), _Forward()
        for s, todo in zip(searches, rows):
            state = model.merge([s.rewards[k]])  # a copy: targets() makes it the candidates'
            f.heads.append((s, k, *self._suffix_items(s, todo, model.targets(state, self._candidates(s, todo)))))
            out.costs[len(f.heads) - 1] = state.cost
        hidden, packed = self.policy.run(self.kv, f.items, [])
        self._count(f, packed)
        out.scores = dict(enumerate(self._read_heads(f, hidden)))
        return out

    def _reads(self, row: Row) -> tuple[tuple[int, int], ...]:
        """What a row attends besides its own slot: root, prompt, beam (slot, columns)."""
        s = row.search
        if self.share:
            return ((s.root_slot, s.shared), (row.prompt_slot, len(s.ids) - s.shared),
                    (row.beam_slot, len(row.beam.token_ids)), (-1, 0))
        return ((-1, 0),) * 4  # a private row holds its prompt and beam itself

    def _prefill_items(self, limit: int | None) -> _Forward:
        """Chunks of the prompts still prefilling, oldest first, at most ``limit`` tokens (None: all)."""
        f = _Forward()
        room = limit if limit is not None else float("inf")
        for s in self.searches:
            if room <= 0:
                break
            if not s.prefilling:
                continue
            root = self.roots.get(tuple(s.ids[:s.shared])) if s.shared else None
            if root is not None and root.filled < len(root.ids):  # the shared prefix first, by its owner
                if root.owner is not s:
                    continue
                n = int(min(room, len(root.ids) - root.filled))
                f.prefills.append((None, Item(list(root.ids[root.filled:root.filled + n]), root.filled,
                                              (ROOT, root.slot, root.filled), ((-1, 0),) * 4, out="none")))
                root.filled += n
                room -= n
                if room <= 0:
                    break
            if root is not None and root.filled < len(root.ids):
                continue
            n = int(min(room, len(s.ids) - s.prefilled))
            column = s.prefilled - s.shared
            last = s.prefilled + n == len(s.ids)
            f.prefills.append((s, Item(s.ids[s.prefilled:s.prefilled + n], s.prefilled, (PROMPT, s.prompt_slot, column),
                                        ((s.root_slot, s.shared), (-1, 0), (-1, 0), (-1, 0)),
                                        out="last" if last else "none")))
            s.prefilled += n
            room -= n
        return f

    def _head_items(self, s: Search, f: _Forward) -> None:
        """The scoring suffix of every candidate of ``s`` for each reward head on the policy's
        backbone it reads: forwarded with this tick's tokens, read after the forward."""
        for k, source in enumerate(self.sources):
            if not getattr(source.model, "shares_policy", False) or not source.used_by(s.plan.weights):
                continue
            targets = source.model.targets(s.rewards[k], self._candidates(s))
            f.heads.append((s, k, *self._suffix_items(s, s.rows, targets)))

    def _suffix_items(self, s: Search, rows: list[Row], targets: list[tuple[list[int], int]]
                      ) -> tuple[list[int], list[Item]]:
        """(scratch slots, items): each of ``rows``' scoring ids past what it holds (``targets``:
        a reward head's ids and how many of them the row holds), written after the row's own
        tokens, or, where its ids differ, into a scratch slot cut back to the common prefix. The
        columns written after a row's tokens are never counted as the row's: its next token
        overwrites them."""
        scratch, items = [], []
        for row, (ids, reuse) in zip(rows, targets):
            if reuse == row.length:  # the row holds a prefix of its scoring ids: write after it
                items.append(Item(ids[reuse:], reuse, (ROW, row.slot, row.base + row.fed), self._reads(row)))
                continue
            slot = self.kv.row.alloc()  # it differs: a scratch row cut back to the common prefix
            scratch.append(slot)
            keep = reuse if not self.share else max(0, reuse - len(s.ids) - len(row.beam.token_ids))
            self.kv.row.copy(slot, 0, self.kv.row, row.slot, 0, keep)
            items.append(Item(ids[reuse:], reuse, (ROW, slot, keep), self._cut_reads(row, reuse)))
        return scratch, items

    def _cut_reads(self, row: Row, reuse: int) -> tuple[tuple[int, int], ...]:
        """A row's reads cut back to its first ``reuse`` tokens (a private row reads nothing)."""
        if not self.share:
            return ((-1, 0),) * 4
        reads, start = [], 0
        for slot, n in self._reads(row)[:3]:
            reads.append((slot, max(0, min(n, reuse - start))))
            start += n
        return (*reads, (-1, 0))

    # -- steps that ended ------------------------------------------------------------------

    def _complete(self, searches: list[Search]) -> list[tuple[int, GuidedResult | ValueError]]:
        """Score, select, keep and fan out the prompts whose step ended (one reward-model batch
        per model for all of them)."""
        self.counters.scorings += 1
        if self.counters.trace is not None:  # what a separate reward model forwards for this batch
            rows = [row for s in searches for row in s.rows]
            self.counters.scoring_trace = self.counters.scoring_trace or []
            self.counters.scoring_trace.append({
                "forward": self.counters.forwards, "prompts": len(searches), "rows": len(rows),
                "step_tokens": sum(len(row.tokens) for row in rows),
                "context": sum(len(s.ids) + len(row.beam.token_ids) + len(row.tokens) for s in searches
                               for row in s.rows)})
        t = time.perf_counter()
        cands = [self._candidates(s) for s in searches]
        raw: list[dict[str, torch.Tensor]] = [{} for _ in searches]
        if self.probes:  # each candidate's probes at its last fed token: one transfer for the batch
            vals = self._probe_values(searches)  # (R, P)
            start = 0
            for i, s in enumerate(searches):
                for p, (_, source) in enumerate(self.probes):
                    if source.used_by(s.plan.weights):
                        raw[i].update(source.columns(vals[start:start + len(s.rows), p]))
                start += len(s.rows)
        errors: dict[int, ValueError] = {}
        scored = {}
        for k, source in enumerate(self.sources):
            users = [i for i, s in enumerate(searches) if source.used_by(s.plan.weights)]
            if not users:
                continue
            if getattr(source.model, "reads_layers", None):  # read above, from the probe values
                continue
            if getattr(source.model, "shares_policy", False):  # read during the forward
                for i in users:
                    scores, cost = searches[i].head_scores.pop(k)
                    raw[i].update(source.columns(scores))
                    scoring.charge(searches[i].stats, cost)
                continue
            result = scoring.score(source, [searches[i].rewards[k] for i in users], [cands[i] for i in users],
                                   [len(searches[i].beams) for i in users])
            for j, i in enumerate(users):
                if j in result.errors:
                    errors.setdefault(i, result.errors[j])
                else:
                    raw[i].update(source.columns(result.scores[j]))
                    scoring.charge(searches[i].stats, result.costs.get(j))
            scored[k] = (users, result)
        elapsed = time.perf_counter() - t
        done, kept = [], {}
        for i, s in enumerate(searches):
            s.stats.prm_s += elapsed
            if i in errors:
                done.append((s.index, errors[i]))
                continue
            try:
                active = _select(s, cands[i].texts, raw[i])
            except ValueError as err:
                done.append((s.index, err))
                continue
            if active is None:
                done.append((s.index, _result(s)))
            else:
                kept[i] = active
                self._report(s, rows=False)
        for k, (users, result) in scored.items():  # the reward models keep the survivors
            states = [searches[i].rewards[k] for i in users]
            scoring.keep(result, states, {j: kept[i] for j, i in enumerate(users) if i in kept})
            for i, state in zip(users, states):
                searches[i].rewards[k] = state
        for k, source in enumerate(self.sources):
            if getattr(source.model, "shares_policy", False):
                for i, s in enumerate(searches):
                    if i in kept and k in s.rewards:
                        source.model.keep(s.rewards[k], torch.tensor(kept[i], dtype=torch.long))
        for i, s in enumerate(searches):  # the policy keeps the survivors' steps; finished prompts leave
            if i in kept:
                self._keep(s, kept[i])
            else:
                self._leave(s)
        return done

    def _candidates(self, s: Search, rows: list[Row] | None = None) -> Candidates:
        """The candidates ``rows`` (default: all of ``s``'s) as its reward models read them: their
        whole responses so far, each extending its beam's state row."""
        rows = s.rows if rows is None else rows
        ids = [row.response_ids for row in rows]
        texts = [self.policy.decode(i) if row.cut_text is None else row.cut_text for row, i in zip(rows, ids)]
        steps = [_split_steps(row.beam.steps, t) for row, t in zip(rows, texts)]
        held = [len(row.beam.token_ids) + row.fed for row in rows]  # a "length" row's last token was not fed
        return Candidates(torch.tensor([row.parent for row in rows], dtype=torch.long), ids, texts, steps, held)

    # -- slots -----------------------------------------------------------------------------

    def _keep(self, s: Search, active: list[int]) -> None:
        """The survivors' steps become their beams' tokens (copy-on-write: a beam kept by several
        candidates is copied for all but the last), then the next candidates fan out. A private
        row (prefixes not shared) is its beam already: it is kept as it is."""
        survivors = [s.rows[r] for r in active]
        beam_logits = self.logits[[row.slot for row in survivors]].clone()  # (B', V)
        beam_probe = self.probe_vals[[row.slot for row in survivors]].clone() if self.probes else None  # (B', P)
        if not self.share:
            kept = {row.slot for row in survivors}
            for row in s.rows:
                if row.slot not in kept:
                    self.kv.row.release(row.slot)
            for beam, row in zip(s.beams, survivors):
                beam.slot = row.slot  # a row slot holding the prompt and the whole response
            self._fan_out(s, beam_logits, beam_probe)
            return
        last_user = {row.beam_slot: i for i, row in enumerate(survivors) if row.beam_slot >= 0}
        slots = []
        for i, row in enumerate(survivors):  # 1. copies of beams that other survivors also keep
            if last_user.get(row.beam_slot) == i:
                slots.append(row.beam_slot)
                continue
            slot = self.kv.beam.alloc(len(row.beam.token_ids) + row.fed)
            if row.beam_slot >= 0:
                self.kv.beam.copy(slot, 0, self.kv.beam, row.beam_slot, 0, len(row.beam.token_ids))
            slots.append(slot)
        for row, slot in zip(survivors, slots):  # 2. each survivor's step after its beam's tokens
            self.kv.beam.copy(slot, len(row.beam.token_ids), self.kv.row, row.slot, 0, row.fed)
        taken = set(slots)
        for row in s.rows:  # 3. free what no survivor kept
            self.kv.row.release(row.slot)
            if row.beam_slot >= 0 and row.beam_slot not in taken and self.kv.beam.live[row.beam_slot]:
                self.kv.beam.release(row.beam_slot)
        for beam, slot in zip(s.beams, slots):
            beam.slot = slot
        self._fan_out(s, beam_logits, beam_probe)

    def _fan_out(self, s: Search, beam_logits: torch.Tensor, beam_probe: torch.Tensor | None = None) -> None:
        """The candidates of ``s``'s next step: N per beam (B*N from the root at the first step),
        each an empty row slot reading its beam's and its prompt's, starting from its beam's
        logits. Nothing is copied, unless prefixes are not shared: then each row starts as a
        private copy of its prompt and beam (as a per-row cache's fan-out copies them)."""
        shape = s.plan.strategy
        fan = shape.candidates * (1 if s.steps else shape.beams)
        rows, parents = [], []
        room = 0 if self.share else len(s.ids) + max(len(b.token_ids) for b in s.beams)  # a private copy's
        for b, beam in enumerate(s.beams):
            held = len(s.ids) + len(beam.token_ids)
            for c in range(fan):
                group = len(rows) // shape.candidates  # its beam (the first step: the beam it will become)
                slot = self._alloc_row_slot(room)
                if self.share:
                    rows.append(Row(s, b, beam, child_stream(beam.stream, c), slot, s.prompt_slot, beam.slot,
                                    len(beam.token_ids), group=group))
                else:
                    source, level = (beam.slot, self.kv.row) if beam.slot >= 0 else (s.prompt_slot, self.kv.prompt)
                    self.kv.row.copy(slot, 0, level, source, 0, held)
                    rows.append(Row(s, b, beam, child_stream(beam.stream, c), slot, -1, -1, len(beam.token_ids),
                                    base=held, group=group))
                parents.append(b)
        if not self.share:  # the rows hold their copies: the beams' and the prompt's slots go
            for beam in s.beams:
                if beam.slot >= 0:
                    self.kv.row.release(beam.slot)
                    beam.slot = -1
            if s.prompt_slot >= 0:
                self.kv.prompt.release(s.prompt_slot)
                s.prompt_slot = -1
        self._set_logits([row.slot for row in rows], beam_logits[parents])
        if beam_probe is not None:  # a row that ends before its first token is read where its beam ended
            self.probe_vals[torch.tensor([row.slot for row in rows], device=self.device)] = beam_probe[parents]
        s.rows, s.decoding, s.step_tokens = rows, len(rows), 0
        self.decoding += rows

    def _alloc_row_slot(self, columns: int = 0) -> int:
        slot = self.kv.row.alloc(columns)
        if slot >= self.logits.shape[0]:
            grown = torch.zeros(self.kv.row.slots, self.vocab, device=self.device)
            grown[: self.logits.shape[0]] = self.logits
            self.logits = grown
            probes = torch.zeros(self.kv.row.slots, len(self.probes), device=self.device)
            probes[: self.probe_vals.shape[0]] = self.probe_vals
            self.probe_vals = probes
        return slot

    def _set_logits(self, slots: list[int], logits: torch.Tensor) -> None:
        self.logits[torch.tensor(slots, device=self.device)] = logits.to(self.logits)

    def _leave(self, s: Search) -> None:
        """``s`` leaves the batch: every slot it holds is freed."""
        beams = self.kv.beam if self.share else self.kv.row  # where a kept beam's tokens are
        for row in s.rows:
            self.kv.row.release(row.slot)
            if row.beam_slot >= 0 and self.kv.beam.live[row.beam_slot]:
                self.kv.beam.release(row.beam_slot)
        for beam in s.beams:
            if beam.slot >= 0 and beams.live[beam.slot]:
                beams.release(beam.slot)
        if s.prompt_slot >= 0:
            self.kv.prompt.release(s.prompt_slot)
        if s.shared:
            key = tuple(s.ids[:s.shared])
            root = self.roots[key]
            root.users -= 1
            if not root.users:
                self.kv.root.release(root.slot)
                del self.roots[key]
        self.watched.pop(s.index, None)
        gone = {id(row) for row in s.rows}
        self.decoding = [row for row in self.decoding if id(row) not in gone]
        self.searches = [x for x in self.searches if x is not s]
        self.waiting = [x for x in self.waiting if x is not s]

    def _drop_cancelled(self) -> None:
        if not self.cancelled:
            return
        for s in [s for s in self.searches if s.index in self.cancelled]:
            if s.shared and self.roots[tuple(s.ids[:s.shared])].owner is s and s.prefilling:
                continue  # it is writing a prefix others wait for: it leaves once that is written
            self._leave(s)
            self.cancelled.discard(s.index)
        self.cancelled &= {s.index for s in self.searches}

    def held_tokens(self) -> int:
        """KV columns held by every prompt in flight (each shared slot once)."""
        total = sum(len(r.ids) for r in self.roots.values())
        for s in self.searches:
            if s.prompt_slot >= 0:
                total += len(s.ids) - s.shared
            if self.share:
                total += sum(len(b.token_ids) for b in s.beams if b.slot >= 0)
            total += sum(row.base + row.fed for row in s.rows)
        return total


# -- per prompt: combine, select, record ------------------------------------------------------

def _select(s: Search, texts: list[str], raw: dict[str, torch.Tensor]) -> list[int] | None:
    """Combine, select and record one prompt's step. Returns the rows (local) that go on, or None
    when its search ended."""
    rows = s.rows
    step, shape = len(s.steps), s.plan.strategy
    check_scores(raw, step)
    groups = torch.tensor([row.group for row in rows])  # (R_s,) the beam (dvts: subtree)
    combined = _combine(s.plan, raw, groups)
    ended = torch.tensor([row.end != "step" for row in rows])
    eligible = _eligible(s.plan, rows, groups)
    selection = select(shape, combined, ended, groups, eligible, len(s.finished))
    s.steps.append(_record(shape, rows, texts, raw, combined, selection, s.origins))
    s.stats.steps += 1
    s.finished += [
        Finished(_beam(rows[r], texts[r]), rows[r].end, {k: float(v[r]) for k, v in raw.items()}, step, r)
        for r in selection.finished
    ]
    s.beams = [_beam(rows[r], texts[r]) for r in selection.active]
    s.origins = selection.active
    if not s.beams or (not shape.per_beam and len(s.finished) >= shape.beams):
        return None
    return selection.active


def _beam(row: Row, text: str) -> Beam:
    return Beam(row.response_ids, text, row.response_logprobs, row.stream, _split_steps(row.beam.steps, text))


def _combine(plan: Plan, raw: dict[str, torch.Tensor], groups: torch.Tensor) -> torch.Tensor:
    if not raw:  # unguided: every candidate ties, the first wins
        return torch.zeros(len(groups), dtype=torch.float64)
    per_beam = groups if plan.strategy.per_beam else None
    return combine(raw, plan.weights, plan.cfg.objective.normalize, per_beam)


def _eligible(plan: Plan, rows: list[Row], groups: torch.Tensor) -> torch.Tensor:
    """(R,) False for a candidate identical to an earlier one it competes with (``dedupe``)."""
    if not plan.cfg.search.dedupe:
        return torch.ones(len(rows), dtype=torch.bool)
    keys = [(tuple(row.response_ids), row.end) for row in rows]
    return first_copies(keys, groups if plan.strategy.per_beam else torch.zeros_like(groups))


def _record(shape: Strategy, rows: list[Row], texts: list[str], raw: dict[str, torch.Tensor], combined: torch.Tensor,
            selection: Selection, origins: list[int]) -> Step:
    records = [
        Candidate(
            text=_step_text(row.beam.text, texts[r]),
            token_ids=list(row.tokens),
            scores={k: float(v[r]) for k, v in raw.items()},
            combined=float(combined[r]),
            parent=origins[row.parent],
            end=row.end,
            logprobs=list(row.logprobs),
        )
        for r, row in enumerate(rows)
    ]
    kept = selection.active + selection.finished
    return Step(records, kept[0] if shape.beams == 1 else sorted(kept))


def _result(s: Search) -> GuidedResult:
    plan = s.plan
    raw = {k: torch.tensor([f.scores[k] for f in s.finished], dtype=torch.float64) for k in plan.weights}
    order, final = final_order(raw, [len(f.beam.token_ids) for f in s.finished], plan.cfg, plan.weights)
    best = s.finished[order[0]]
    if plan.strategy.beams == 1:  # the step that ended the search records the answer it gave
        s.steps[best.step].chosen = best.row
    s.stats.response_tokens = len(best.beam.token_ids)
    s.stats.wall_s = time.perf_counter() - s.t0
    pool, texts = [], set()
    for i in order:  # distinct texts, best first
        f = s.finished[i]
        if f.beam.text not in texts:
            texts.add(f.beam.text)
            pool.append(Answer(f.beam.text, list(f.beam.token_ids), f.reason, f.scores, float(final[i]),
                               list(f.beam.logprobs)))
    return GuidedResult(
        text=best.beam.text, token_ids=best.beam.token_ids, stop_reason=best.reason, steps=s.steps,
        stats=s.stats, scores=best.scores, answer_path=path_to(s.steps, best.step, best.row),
        logprobs=list(best.beam.logprobs), pool=pool,
    )


SPACES_PROBE = "a . b , c n't d 's"


def cleans_spaces(policy: Policy) -> bool:
    """Does the policy's decode remove spaces before punctuation (``" n't"`` -> ``"n't"``, as
    WordPiece tokenizers' cleanup does)? Then a word already decoded can still change. Found by
    decoding a probe, not by a tokenizer flag (transformers ignores the flag for BPE tokenizers);
    a tokenizer that cannot encode the probe counts as one that does."""
    try:
        ids = policy.tokenizer(SPACES_PROBE, add_special_tokens=False)["input_ids"]
        return policy.decode(ids) != SPACES_PROBE
    except (TypeError, KeyError, AttributeError, ValueError):
        return True


def common_prefix(held: list[tuple[Sequence[int], Sequence[int]]], known: int) -> int:
    """Length of the token prefix every response in ``held`` shares, each response a pair of
    token lists read one after the other (a beam's tokens, then a row's). ``known``: a length
    they are already known to share (the prefix only grows as a search goes on)."""
    n = known
    while held:
        token = _token_at(held[0], n)
        if token is None or any(_token_at(pair, n) != token for pair in held[1:]):
            return n
        n += 1
    return n


def _token_at(pair: tuple[Sequence[int], Sequence[int]], i: int) -> int | None:
    """Token ``i`` of ``head + tail`` (None past its end), without joining them."""
    head, tail = pair
    if i < len(head):
        return head[i]
    return tail[i - len(head)] if i - len(head) < len(tail) else None


def stable_text(text: str, cleans_spaces: bool = False) -> str:
    """The part of a response prefix's text that more tokens cannot change: without trailing
    incomplete characters (U+FFFD: a character split across tokens), and, when the tokenizer cleans
    up spaces (``"do n" + "'t"`` decodes to ``"don't"``), without its last space and what follows."""
    text = text.rstrip("\ufffd")
    if cleans_spaces:
        cut = next((i for i in range(len(text) - 1, -1, -1) if text[i].isspace()), -1)
        if cut >= 0:
            text = text[:cut]
    return text


def _split_steps(steps: list[str], full: str) -> list[str]:
    """``full`` split as ``steps`` (the beam's steps) then the new step, concatenating to ``full``.

    Where the beam's text is not a prefix of ``full`` (a character split across steps decodes
    differently once whole), the steps are cut at the common prefix and the rest is the new step.
    """
    out, at = [], 0
    for step in steps:
        if not full.startswith(step, at):
            break
        out.append(step)
        at += len(step)
    if len(out) < len(steps):  # the cut step keeps what still matches
        step = steps[len(out)]
        keep = next((i for i, (a, b) in enumerate(zip(step, full[at:])) if a != b), min(len(step), len(full) - at))
        out.append(step[:keep])
        at += keep
    return [*out, full[at:]]


def _step_text(parent: str, full: str) -> str:
    """The text a candidate added to its beam's text ('' when a stop string cut it inside it)."""
    if full.startswith(parent):
        return full[len(parent):]
    return "" if parent.startswith(full) else full
