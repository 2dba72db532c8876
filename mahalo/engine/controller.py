"""The one step loop behind every strategy, for every prompt in flight at once.

    admit      new prompts: prefill them together on both sides, append their rows
    repeat, all prompts in lockstep:
      1. fan out     each beam's policy row -> N candidate rows, by index        # (sum B*N,)
      2. expand      decode all rows together until each ends its step
      3. score       every objective scores every candidate of every prompt      # (sum B*N,)
      4. combine     per prompt: weighted sum of normalised per-objective scores
      5. select      per prompt: the strategy keeps the best; ended candidates set aside
      6. keep        survivors' rows on both sides; finished prompts leave the batch

A prompt's answer never depends on its neighbours: each row samples from its own stream
(:mod:`mahalo.sampling`), each prompt normalises and selects among its own candidates.

A step ends at a confirmed boundary (:mod:`mahalo.steps`): when a sampled token starts with
whitespace after text that may end a step, the detector decides, and if the step ends there the
token is dropped. Its row was not fed that token, so the row's logits at the boundary seed the
next step's candidates.

Hot loop: one device-to-host transfer per token for the whole batch (tokens, log-probabilities
and per-token flags packed together); only rows whose token can end a step (a per-vocabulary
flag table) touch text, detokenised incrementally. A step lasts as long as its longest candidate,
so once most rows have ended they are set aside and the stragglers decode on fewer rows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mahalo.chat import Messages
from mahalo.config import GuideConfig
from mahalo.engine import scoring
from mahalo.engine.strategies import Selection, Strategy, final_pick, first_copies, select, strategy_for
from mahalo.policy import Policy, PolicyState
from mahalo.result import Candidate, GuidedResult, PromptError, Stats, Step
from mahalo.rewards import Candidates, RewardModel
from mahalo.rewards.combine import check_scores, combine
from mahalo.sampling import child_stream, root_stream, sample_tokens
from mahalo.steps import ChunkText, NoBoundary, StepBoundary, TokenTable, make_boundary, token_table

log = logging.getLogger(__name__)

_CONTEXT_CHARS = 256  # accepted text shown to boundary detectors
# Bits of the per-token flag table (see _flag_table).
_EOS, _WS_START, _WS_END, _SPACES, _MAY_END = 1, 2, 4, 8, 16


@dataclass
class Beam:
    """An accepted partial response (one policy row)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    stream: int = 0  # the sampling stream its candidates branch from
    steps: list[str] = field(default_factory=list)  # its text, step by step


@dataclass
class Finished:
    """An ended response: where it ended and its raw scores."""

    beam: Beam
    reason: str
    scores: dict[str, float]
    step: int
    row: int


@dataclass(frozen=True)
class Plan:
    """How one prompt is searched: its options, the search's shape and its objectives."""

    cfg: GuideConfig
    strategy: Strategy
    weights: dict[str, float]  # the objectives it is guided by -> weight (the others are not read)
    step_cap: int  # tokens that end a step at the latest (stepwise) or the response budget
    root: int  # its sampling stream

    @property
    def rows(self) -> int:
        """Policy rows the prompt may hold (at its first step: B*N)."""
        return self.strategy.beams * self.strategy.candidates

    @property
    def max_steps(self) -> int:
        """The most steps a response can take (each step at least one token, and at least
        ``min_step_tokens`` unless it is the last)."""
        budget = self.cfg.search.max_new_tokens
        return -(-budget // max(1, self.cfg.step.min_step_tokens)) if self.strategy.stepwise else 1

    @property
    def streams_steps(self) -> bool:
        """Each accepted step is final as soon as it is selected (one beam, step by step)."""
        return self.strategy.stepwise and self.strategy.beams == 1 and not self.strategy.per_beam


@dataclass(frozen=True)
class Prompt:
    """A prompt ready to join the batch: its conversation, the policy's token ids and its plan,
    checked against every model's context (:meth:`Controller.prepare`)."""

    messages: Messages
    ids: list[int]
    plan: Plan


@dataclass
class Search:
    """One prompt's search: its beams, finished pool, steps and cost."""

    index: int  # the prompt's input index
    beams: list[Beam]
    stats: Stats
    t0: float
    plan: Plan
    rewards: dict[int, Any] = field(default_factory=dict)  # source index -> its state (one row per beam)
    origins: list[int] = field(default_factory=lambda: [-1])  # each beam's candidate index last step
    finished: list[Finished] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)


@dataclass
class Row:
    """One candidate row of a step."""

    search: int  # index into Controller.searches
    plan: Plan  # its prompt's
    parent: int  # the index of the beam it extends among its prompt's beams
    beam: Beam  # that beam
    stream: int
    tokens: list[int] = field(default_factory=list)  # new tokens, end-of-turn excluded
    logprobs: list[float] = field(default_factory=list)
    end: str = ""  # "step" | "eos" | "length"
    deferred: bool = False  # kept a spaces-only lookahead: the next token decides the boundary
    text: ChunkText | None = None  # created on the first boundary check
    fed: int = 0  # tokens forwarded
    slots: int = 0  # forwards it took part in (as a token or a hole)


class Controller:
    """Runs many prompts through the search described by a :class:`GuideConfig`, in lockstep.

    :meth:`admit` adds prompts to the batch; :meth:`step` advances every prompt in flight by one
    step and returns those that ended. :mod:`mahalo.engine.scheduler` drives it.

    A prompt may bring its own options (:meth:`plan`: strategy, N, B, weights, sampling, budget,
    seed), so requests with different searches share one batch; the step rule and the stop tokens
    are the controller's. ``accepted`` lists, after each step, the steps that became final
    (one-beam step searches), for streaming; :meth:`cancel` drops a prompt at the next step.
    """

    def __init__(self, policy: Policy, rewards: dict[str, RewardModel], cfg: GuideConfig) -> None:
        cfg.check_objectives(list(rewards))
        self.policy, self.rewards, self.cfg = policy, rewards, cfg
        self.boundary: StepBoundary = make_boundary(cfg.step.kind, cfg.step.min_step_tokens)
        self.table: TokenTable | None = None  # built when a stepwise search first needs it
        self.default = self.plan(cfg)  # the plan of a prompt that brings none
        self.eos_ids = frozenset(policy.eos_ids) | frozenset(cfg.sampling.stop_token_ids)
        self.searches: list[Search] = []
        self.accepted: list[tuple[int, str]] = []  # after a step: (input index, text so far) of final steps
        self.cancelled: set[int] = set()  # input indices to drop at the next step
        self.state: PolicyState | None = None
        # objectives read from one model (a multi-output model, or one model named twice) share
        # its forward; each prompt keeps a state per source it reads (mahalo.engine.scoring)
        self.sources = scoring.sources_of(rewards)
        self.flags: torch.Tensor | None = None  # (V,) int per-token flags, on the policy's device
        self.host_flags: list[int] = []

    @property
    def in_flight(self) -> int:
        """Prompts in the batch."""
        return len(self.searches)

    def plan(self, cfg: GuideConfig, objectives: list[str] | None = None) -> Plan:
        """The :class:`Plan` of a prompt decoded with ``cfg``, guided by ``objectives`` (default:
        every reward model, weighted by ``cfg``).

        Raises:
            ValueError: an unknown objective, or a step rule or stop tokens other than this
                controller's (they are shared by the whole batch).
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
        return Plan(cfg, strategy, {n: cfg.weight(n) for n in names}, cap, root_stream(cfg.search.seed))

    def cancel(self, index: int) -> None:
        """Drop prompt ``index`` at the next step (its rows are freed; it is not reported)."""
        self.cancelled.add(index)

    # -- admission ------------------------------------------------------------------------

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

    def admit(self, prompts: list[tuple]) -> list[tuple[int, ValueError]]:
        """Prefill ``prompts`` together and add them to the batch: (input index, messages) pairs,
        (input index, messages, :class:`Plan`) for a prompt with its own options, or (input
        index, :class:`Prompt`) for a prompt already prepared.

        Returns:
            the prompts that could not join, with the reason (a prompt longer than a model's
            context, a reward model that could not read it).
        """
        ok: list[tuple[int, Prompt, dict[int, Any], list]] = []
        failed = []
        for index, item, *rest in prompts:
            try:
                prompt = item if isinstance(item, Prompt) else self.prepare(item, rest[0] if rest else None)
                states, costs = {}, []
                for k, source in enumerate(self.sources):  # before the policy: a failure here touches no row
                    if source.used_by(prompt.plan.weights):
                        states[k], cost = scoring.add(source, prompt.messages)
                        costs.append(cost)
            except ValueError as err:
                failed.append((index, err))
                continue
            ok.append((index, prompt, states, costs))
        if not ok:
            return failed
        plans = [prompt.plan for _, prompt, _, _ in ok]
        if any(p.strategy.stepwise for p in plans) and self.table is None and not isinstance(self.boundary, NoBoundary):
            self.table = token_table(self.policy.tokenizer, self.boundary)
            if self.state is not None:
                self._check_vocab(self.state.logits.shape[-1])
        t0 = time.perf_counter()
        new = self.policy.prefill([prompt.ids for _, prompt, _, _ in ok])
        if self.state is None:
            self.state = new
            self._check_vocab(new.logits.shape[-1])
        else:
            self.state.cat(new)
        policy_s = time.perf_counter() - t0
        width = max(len(prompt.ids) for _, prompt, _, _ in ok)
        for index, prompt, states, costs in ok:
            n = len(prompt.ids)
            stats = Stats(policy_tokens=n, policy_tokens_padded=width, policy_s=policy_s, prompt_tokens=n)
            for cost in costs:
                scoring.charge(stats, cost)
            self.searches.append(Search(index, [Beam(stream=prompt.plan.root)], stats, t0, prompt.plan, states))
        return failed

    def _check_vocab(self, vocab: int) -> None:
        outside = sorted(i for i in self.cfg.sampling.stop_token_ids if i >= vocab)
        if outside:
            raise ValueError(f"stop_token_ids {outside} are outside the policy's vocabulary ({vocab} tokens)")
        self.host_flags = _flag_table(self.table, self.eos_ids, vocab)
        self.flags = torch.tensor(self.host_flags, device=self.state.logits.device)

    # -- one step for every prompt in flight ----------------------------------------------

    def step(self) -> list[tuple[int, GuidedResult | ValueError]]:
        """Advance every prompt in flight by one step.

        Returns:
            the prompts whose search ended: (input index, result), or (input index, ValueError)
            for a prompt that failed (a reward model returned NaN or +inf, raised, or could not
            read it); the other prompts go on unchanged.
        """
        # 1. fan out: beam b of a prompt -> its rows b*N .. b*N+N-1 (a new prompt -> B*N rows)
        rows, parents, spans = self._fan_out()
        self.state.select(torch.tensor(parents))
        # 2. expand every row of every prompt in lockstep
        self._expand(rows)
        # 3. score every candidate of every prompt, one batch per reward model; a fault stays with its prompt
        cands = [self._candidates(rows, a, b) for a, b in spans]
        raw, errors, scored = self._score(cands)
        # 4-5. per prompt: combine, select, record (a cancelled prompt just leaves)
        keep, done, survivors, kept = [], [], [], {}
        self.accepted = []
        for i, (s, (a, b)) in enumerate(zip(self.searches, spans)):
            if s.index in self.cancelled:
                continue
            if i in errors:
                done.append((s.index, errors[i]))
                continue
            try:
                active = self._select(s, rows[a:b], cands[i].texts, raw[i])
            except ValueError as err:
                done.append((s.index, err))
                continue
            if active is None:
                done.append((s.index, self._result(s)))
            else:
                keep += [a + r for r in active]
                kept[i] = active
                survivors.append(s)
                if s.plan.streams_steps:
                    self.accepted.append((s.index, s.beams[0].text))
        self.cancelled.clear()
        # 6. keep the survivors' rows on both sides; finished prompts leave the batch
        for k, (users, result) in scored.items():
            states = [self.searches[i].rewards[k] for i in users]
            scoring.keep(result, states, {j: kept[i] for j, i in enumerate(users) if i in kept})
            for i, state in zip(users, states):
                self.searches[i].rewards[k] = state
        self.searches = survivors
        self.state.select(torch.tensor(keep, dtype=torch.long))
        self.state.kv.tidy()
        return done

    def _score(self, cands: list[Candidates]) -> tuple[list[dict[str, torch.Tensor]], dict[int, ValueError], dict]:
        """Every source scores the candidates of the prompts it guides, one batch each.

        Returns:
            per prompt its raw scores (objective -> (R_s,)); the prompts that failed, with why;
            and per source its users and what :func:`scoring.keep` needs.
        """
        t = time.perf_counter()
        raw: list[dict[str, torch.Tensor]] = [{} for _ in self.searches]
        errors: dict[int, ValueError] = {}
        scored = {}
        for k, source in enumerate(self.sources):
            users = [i for i, s in enumerate(self.searches) if source.used_by(s.plan.weights)]
            if not users:
                continue
            result = scoring.score(source, [self.searches[i].rewards[k] for i in users], [cands[i] for i in users],
                                   [len(self.searches[i].beams) for i in users])
            for j, i in enumerate(users):
                if j in result.errors:
                    errors.setdefault(i, result.errors[j])
                else:
                    raw[i].update(source.columns(result.scores[j]))
                    scoring.charge(self.searches[i].stats, result.costs.get(j))
            scored[k] = (users, result)
        elapsed = time.perf_counter() - t
        for s in self.searches:
            s.stats.prm_s += elapsed
        return raw, errors, scored

    def _fan_out(self) -> tuple[list[Row], list[int], list[tuple[int, int]]]:
        """Candidate rows of every prompt, the policy row each extends, and each prompt's span."""
        rows, parents, spans, offset = [], [], [], 0
        for si, s in enumerate(self.searches):
            shape = s.plan.strategy
            fan = shape.candidates * (1 if s.steps else shape.beams)
            start = len(rows)
            for b, beam in enumerate(s.beams):
                for c in range(fan):
                    rows.append(Row(si, s.plan, b, beam, child_stream(beam.stream, c)))
                    parents.append(offset + b)
            spans.append((start, len(rows)))
            offset += len(s.beams)
        return rows, parents, spans

    def _expand(self, rows: list[Row]) -> None:
        """Decode one step for every row in lockstep; ended rows become holes.

        Rows that ended wait for the others; once they are most of the batch (and at least
        ``PARK_MIN``), they are set aside (one copy of their cache) so the forwards of the
        stragglers run on fewer rows, and are put back at the end of the step.
        """
        t = time.perf_counter()
        device = self.state.logits.device
        streams = torch.tensor([r.stream for r in rows], device=device)  # (R,)
        positions = torch.tensor([len(r.beam.token_ids) for r in rows], device=device)  # (R,)
        active = list(range(len(rows)))
        live = list(range(len(rows)))  # the row held at each position of self.state
        parked: list[tuple[PolicyState, list[int]]] = []
        forwards = 0
        while active:
            if len(live) - len(active) >= max(self.PARK_MIN, len(live) // 2):
                live = self._park(live, set(active), parked)
            where = {r: i for i, r in enumerate(live)}
            at = torch.tensor([where[r] for r in active], device=device)  # (A,) state positions
            idx = torch.tensor(active, device=device)  # (A,) rows
            logits = self.state.logits[at]  # (A, V)
            tokens = self._sample(logits, [rows[r].plan.cfg.sampling for r in active], streams[idx], positions[idx])
            logprobs = torch.log_softmax(logits.float(), -1).gather(1, tokens[:, None])[:, 0]  # (A,)
            packed = torch.stack([tokens.double(), logprobs.double(), self.flags[tokens].double()])  # (3, A)
            positions[idx] += 1
            feed, still = [], []
            for r, token, logprob, flags in zip(active, *packed.tolist()):  # the one transfer of this token
                row, token = rows[r], int(token)
                end = self._advance(row, token, logprob, int(flags))
                if end in ("", "step"):  # the token was kept and the row goes on: its next logits are needed
                    feed.append((where[r], token))
                    row.fed += 1
                if end:
                    row.end = "step" if end == "cut" else end
                else:
                    still.append(r)
            if feed:
                fed_at, fed_tokens = zip(*feed)
                mask = torch.zeros(len(live), dtype=torch.bool)
                mask[list(fed_at)] = True
                tokens_in = torch.zeros(len(live), dtype=torch.long)
                tokens_in[list(fed_at)] = torch.tensor(fed_tokens)
                self.policy.forward(self.state, tokens_in, mask)
                forwards += 1
                for r in live:  # every row in the forward, fed or a hole
                    rows[r].slots += 1
            active = still
        if parked:
            self._unpark(live, parked)
        elapsed = time.perf_counter() - t
        for s in self.searches:
            s.stats.policy_s += elapsed
        for row in rows:
            stats = self.searches[row.search].stats
            stats.policy_tokens += row.fed
            stats.policy_tokens_padded += row.slots

    PARK_MIN = 8  # rows worth setting aside at once

    @staticmethod
    def _sample(logits: torch.Tensor, samplings: list, streams: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per row (A,), each row with its prompt's sampling options (one call per
        distinct setting; usually one)."""
        keys = [(c.temperature, c.top_k, c.top_p) for c in samplings]
        if len(set(keys)) == 1:
            return sample_tokens(logits, samplings[0], streams, positions)
        tokens = torch.empty(len(keys), dtype=torch.long, device=logits.device)
        for key in dict.fromkeys(keys):
            idx = torch.tensor([i for i, k in enumerate(keys) if k == key], device=logits.device)
            cfg = samplings[keys.index(key)]
            tokens[idx] = sample_tokens(logits[idx], cfg, streams[idx], positions[idx])
        return tokens

    def _park(self, live: list[int], active: set[int], parked: list[tuple[PolicyState, list[int]]]) -> list[int]:
        """Set the ended rows aside; returns the rows still in self.state, in order."""
        keep = [i for i, r in enumerate(live) if r in active]
        rest = [i for i, r in enumerate(live) if r not in active]
        parked.append((self.state.take(torch.tensor(rest)), [live[i] for i in rest]))
        self.state.select(torch.tensor(keep))
        return [live[i] for i in keep]

    def _unpark(self, live: list[int], parked: list[tuple[PolicyState, list[int]]]) -> None:
        """Put the set-aside rows back, every row at its place again."""
        self.state.place(torch.tensor(live), [(state, torch.tensor(ids)) for state, ids in parked])

    def _advance(self, row: Row, token: int, logprob: float, flags: int) -> str:
        """Row sampled ``token``: keep it or end the step. Returns why the row's step ends:
        ``cut`` (a boundary before ``token``, which is dropped), ``step``, ``eos``, ``length``, or ''."""
        if flags & _EOS:
            return "eos"
        plan = row.plan
        stepwise = plan.strategy.stepwise and self.table is not None
        if stepwise and self._boundary_before(row, token, flags):
            return "cut"
        row.tokens.append(token)
        row.logprobs.append(logprob)
        if row.text is not None:
            row.text.append(token)
        n = len(row.tokens)
        if len(row.beam.token_ids) + n >= plan.cfg.search.max_new_tokens:
            return "length"
        if n >= plan.step_cap:
            return "step"
        if (
            stepwise and flags & _MAY_END and flags & _WS_END and not row.deferred
            and n >= plan.cfg.step.min_step_tokens
            and self.boundary.ends_after(row.beam.text[-_CONTEXT_CHARS:], self._text(row))
        ):
            return "step"
        return ""

    def _boundary_before(self, row: Row, token: int, flags: int) -> bool:
        """Does the step end before ``token``? May set or clear the row's deferral instead."""
        if not row.tokens or len(row.tokens) < row.plan.cfg.step.min_step_tokens or self.table is None:
            return False
        last = self.host_flags[row.tokens[-1]]
        if row.deferred:  # kept spaces after a possible end: this token decides
            row.deferred = bool(flags & _SPACES)
            if row.deferred:
                return False
        elif not (flags & _WS_START and last & _MAY_END and not last & _WS_END):
            return False
        elif flags & _SPACES:  # " " says nothing yet ("No. 5" vs "No. It"): keep it, decide on the next
            row.deferred = True
            return False
        text = self._text(row)
        body = text.rstrip(" \t")
        following = text[len(body):] + (self.table.text[token] if token < len(self.table.text) else "")
        return self.boundary.ends_before(row.beam.text[-_CONTEXT_CHARS:], body, following)

    def _text(self, row: Row) -> str:
        """The row's chunk text as it reads after its beam, detokenised incrementally."""
        if row.text is None:
            row.text = ChunkText(self.policy.decode, row.beam.token_ids)
            for t in row.tokens:
                row.text.append(t)
        return row.text.current()

    def _candidates(self, rows: list[Row], a: int, b: int) -> Candidates:
        """One prompt's candidates (rows ``a:b`` of the batch), their parents among its own beams."""
        mine = rows[a:b]
        ids = [row.beam.token_ids + row.tokens for row in mine]
        texts = [self.policy.decode(i) for i in ids]
        steps = [_split_steps(row.beam.steps, t) for row, t in zip(mine, texts)]
        held = [len(row.beam.token_ids) + row.fed for row in mine]  # a "length" row's last token was not fed
        return Candidates(torch.tensor([row.parent for row in mine]), ids, texts, steps, self.state, held,
                          list(range(a, b)))

    # -- per prompt -----------------------------------------------------------------------

    def _select(self, s: Search, rows: list[Row], texts: list[str], raw: dict[str, torch.Tensor]) -> list[int] | None:
        """Combine, select and record one prompt's step. Returns the rows (local) that go on, or
        None when its search ended."""
        step, shape = len(s.steps), s.plan.strategy
        check_scores(raw, step)
        groups = torch.arange(len(rows)) // shape.candidates  # (R_s,) the beam (dvts: subtree)
        combined = self._combine(s.plan, raw, groups)
        ended = torch.tensor([row.end != "step" for row in rows])
        eligible = self._eligible(s.plan, rows, groups)
        selection = select(shape, combined, ended, groups, eligible, len(s.finished))
        s.steps.append(self._record(shape, rows, texts, raw, combined, selection, s.origins))
        s.stats.steps += 1
        s.finished += [
            Finished(self._beam(rows[r], texts[r]), rows[r].end, {k: float(v[r]) for k, v in raw.items()}, step, r)
            for r in selection.finished
        ]
        s.beams = [self._beam(rows[r], texts[r]) for r in selection.active]
        s.origins = selection.active
        if not s.beams or (not shape.per_beam and len(s.finished) >= shape.beams):
            return None
        return selection.active

    @staticmethod
    def _beam(row: Row, text: str) -> Beam:
        return Beam(row.beam.token_ids + row.tokens, text, row.beam.logprobs + row.logprobs, row.stream,
                    _split_steps(row.beam.steps, text))

    @staticmethod
    def _combine(plan: Plan, raw: dict[str, torch.Tensor], groups: torch.Tensor) -> torch.Tensor:
        if not raw:  # unguided: every candidate ties, the first wins
            return torch.zeros(len(groups), dtype=torch.float64)
        per_beam = groups if plan.strategy.per_beam else None
        return combine(raw, plan.weights, plan.cfg.objective.normalize, per_beam)

    @staticmethod
    def _eligible(plan: Plan, rows: list[Row], groups: torch.Tensor) -> torch.Tensor:
        """(R,) False for a candidate identical to an earlier one it competes with (``dedupe``)."""
        if not plan.cfg.search.dedupe:
            return torch.ones(len(rows), dtype=torch.bool)
        keys = [(tuple(row.beam.token_ids + row.tokens), row.end) for row in rows]
        return first_copies(keys, groups if plan.strategy.per_beam else torch.zeros_like(groups))

    @staticmethod
    def _record(
        shape: Strategy, rows: list[Row], texts: list[str], raw, combined: torch.Tensor, selection: Selection,
        origins: list[int],
    ) -> Step:
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

    def _result(self, s: Search) -> GuidedResult:
        plan = s.plan
        raw = {k: torch.tensor([f.scores[k] for f in s.finished], dtype=torch.float64) for k in plan.weights}
        best = s.finished[final_pick(raw, [len(f.beam.token_ids) for f in s.finished], plan.cfg, plan.weights)]
        if plan.strategy.beams == 1:  # the step that ended the search records the answer it gave
            s.steps[best.step].chosen = best.row
        s.stats.response_tokens = len(best.beam.token_ids)
        s.stats.wall_s = time.perf_counter() - s.t0
        return GuidedResult(
            text=best.beam.text, token_ids=best.beam.token_ids, stop_reason=best.reason, steps=s.steps,
            stats=s.stats, scores=best.scores,
        )


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
    """The text a candidate added to its beam's text."""
    return full[len(parent):] if full.startswith(parent) else full


def _flag_table(table: TokenTable | None, eos_ids: frozenset[int], vocab: int) -> list[int]:
    """Per-token flags for the hot loop: end of turn, and what the step rules need to know."""
    flags = [0] * vocab
    if table is not None:
        for i in range(min(vocab, len(table.text))):
            flags[i] = (
                _WS_START * table.ws_start[i] | _WS_END * table.ws_end[i] | _SPACES * table.spaces[i]
                | _MAY_END * table.may_end[i]
            )
    for i in eos_ids:
        if 0 <= i < vocab:
            flags[i] |= _EOS
    return flags
