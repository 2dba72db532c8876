"""The one step loop behind every strategy.

    prefill prompt once (policy and reward models)
    repeat:
      1. fan out     each beam's policy row -> N candidate rows, by index      # (B*N,)
      2. expand      decode all B*N rows in lockstep until each ends its step
      3. score       every objective scores every candidate (new tokens only)  # (B*N,)
      4. combine     weighted sum of normalised per-objective scores           # (B*N,)
      5. select      the strategy keeps the best; ended candidates set aside
      6. keep        survivors' rows on both sides, compact the caches
    return the best of the finished pool, ranked by the same rule

A step ends at a confirmed boundary (:mod:`mahalo.steps`): when a sampled token starts with
whitespace after text that may end a step, the detector decides, and if the step ends there the
token is dropped. Its row was not fed that token, so the row's logits at the boundary seed the
next step's candidates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mahalo.chat import Messages
from mahalo.config import GuideConfig
from mahalo.engine.strategies import Selection, Strategy, final_pick, first_copies, select, strategy_for
from mahalo.policy import Policy, PolicyState
from mahalo.result import Candidate, GuidedResult, Stats, Step
from mahalo.rewards import Candidates, RewardModel
from mahalo.rewards.combine import check_scores, combine
from mahalo.sampling import sample_tokens
from mahalo.steps import NoBoundary, StepBoundary, TokenTable, make_boundary, token_table

log = logging.getLogger(__name__)

_CONTEXT_CHARS = 256  # accepted text shown to boundary detectors
_DECODE_TAIL = 4  # accepted tokens decoded with a chunk, so leading spaces come out right


@dataclass
class Beam:
    """An accepted partial response (one policy row)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)


@dataclass
class Chunks:
    """What step 2 produced for R candidate rows."""

    tokens: list[list[int]]  # (R, *) new tokens, end-of-turn excluded
    logprobs: list[list[float]]
    end: list[str]  # "step" | "eos" | "length"
    deferred: list[bool]  # the row kept a spaces-only lookahead: the next token decides the boundary


@dataclass
class StepBatch:
    """Everything one step produced, row-aligned (R = B*N)."""

    beams: list[Beam]  # the beams expanded this step
    parents: torch.Tensor  # (R,) beam of each candidate row
    chunks: Chunks
    cands: Candidates  # whole responses, as reward models see them

    def beam(self, r: int) -> Beam:
        """Row r's whole response as a beam."""
        parent = self.beams[int(self.parents[r])]
        return Beam(self.cands.token_ids[r], self.cands.texts[r], parent.logprobs + self.chunks.logprobs[r])

    def step_text(self, r: int) -> str:
        """The text row r added this step."""
        parent, full = self.beams[int(self.parents[r])].text, self.cands.texts[r]
        return full[len(parent):] if full.startswith(parent) else full


@dataclass
class Finished:
    """An ended response: where it ended and its raw scores."""

    beam: Beam
    reason: str
    scores: dict[str, float]
    step: int
    row: int


class Controller:
    """Runs one prompt through the search described by a :class:`GuideConfig`."""

    def __init__(self, policy: Policy, rewards: dict[str, RewardModel], cfg: GuideConfig) -> None:
        cfg.check_objectives(list(rewards))
        self.policy, self.rewards, self.cfg = policy, rewards, cfg
        self.strategy: Strategy = strategy_for(cfg)
        self.boundary: StepBoundary = (
            make_boundary(cfg.step.kind, cfg.step.min_step_tokens) if self.strategy.stepwise else NoBoundary()
        )
        self.table: TokenTable | None = (
            None if isinstance(self.boundary, NoBoundary) else token_table(policy.tokenizer, self.boundary)
        )
        self.step_cap = cfg.step.max_step_tokens if self.strategy.stepwise else cfg.search.max_new_tokens
        self.weights = {name: cfg.weight(name) for name in rewards}
        self.eos_ids = frozenset(policy.eos_ids) | frozenset(cfg.sampling.stop_token_ids)

    def run(self, messages: Messages) -> GuidedResult:
        t0 = time.perf_counter()
        self.stats = Stats()
        self.generator = torch.Generator().manual_seed(self.cfg.search.seed)
        # 0. prefill the prompt once on both sides
        state = self._prefill(messages)
        reward_states = {name: rm.start(messages, self.policy.tokenizer) for name, rm in self.rewards.items()}
        beams, finished, steps = [Beam()], [], []
        origins = [-1]  # each beam's candidate index in the previous step
        n = self.strategy.candidates
        while beams:
            # 1. fan out: beam b -> rows b*N .. b*N+N-1 (the prompt alone -> B*N rows at first)
            fan = n * (1 if steps else self.strategy.beams)
            parents = torch.arange(len(beams)).repeat_interleave(fan)  # (B*N,)
            groups = torch.arange(len(parents)) // n  # (B*N,) the beam (dvts: subtree) of each row
            state.select(parents)
            # 2. expand all candidates of all beams in lockstep
            chunks = self._expand(state, beams, parents)
            batch = StepBatch(beams, parents, chunks, self._candidates(messages, beams, parents, chunks))
            # 3-4. score and combine
            raw = self._score(reward_states, batch.cands, len(steps))
            combined = self._combine(raw, groups)
            # 5. select
            ended = torch.tensor([e != "step" for e in chunks.end])
            eligible = self._eligible(batch, groups)
            selection = select(self.strategy, combined, ended, groups, eligible, len(finished))
            steps.append(self._record(batch, raw, combined, selection, origins))
            finished += [self._finish(batch, raw, r, len(steps) - 1) for r in selection.finished]
            beams = [batch.beam(r) for r in selection.active]
            origins = selection.active
            if not beams or (not self.strategy.per_beam and len(finished) >= self.strategy.beams):
                break
            # 6. keep the survivors' rows on both sides
            keep = torch.tensor(selection.active)
            state.select(keep)
            state.kv.compact()
            for name, rm in self.rewards.items():
                rm.keep(reward_states[name], keep)
        return self._result(finished, steps, reward_states, t0)

    # -- phases ---------------------------------------------------------------------------

    def _prefill(self, messages: Messages) -> PolicyState:
        ids = self.policy.prompt_ids(messages)
        ctx, budget = self.policy.max_context, self.cfg.search.max_new_tokens
        if ctx is not None and len(ids) + budget > ctx:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({budget}) exceeds the policy's "
                f"context ({ctx} tokens): shorten the prompt or lower max_new_tokens"
            )
        t = time.perf_counter()
        state = self.policy.prefill(ids)
        self.stats.policy_s += time.perf_counter() - t
        self.stats.policy_tokens += len(ids)
        self.stats.policy_tokens_padded += len(ids)
        vocab = state.logits.shape[-1]
        outside = sorted(i for i in self.cfg.sampling.stop_token_ids if i >= vocab)
        if outside:
            raise ValueError(f"stop_token_ids {outside} are outside the policy's vocabulary ({vocab} tokens)")
        return state

    def _expand(self, state: PolicyState, beams: list[Beam], parents: torch.Tensor) -> Chunks:
        """Decode one step for every row (R = B*N) in lockstep; ended rows become holes."""
        t = time.perf_counter()
        rows = parents.tolist()
        chunks = Chunks([[] for _ in rows], [[] for _ in rows], ["" for _ in rows], [False for _ in rows])
        active = torch.ones(len(rows), dtype=torch.bool)
        while active.any():
            idx = active.nonzero().squeeze(1)  # (A,)
            logits = state.logits[idx]  # (A, V)
            tokens = sample_tokens(logits, self.cfg.sampling, self.generator)  # (A,)
            logprobs = torch.log_softmax(logits, -1).gather(1, tokens[:, None].to(logits.device))[:, 0]
            feed = torch.zeros(len(rows), dtype=torch.bool)
            fed_tokens = torch.zeros(len(rows), dtype=torch.long)
            for r, token, logprob in zip(idx.tolist(), tokens.tolist(), logprobs.tolist()):
                end = self._advance(chunks, r, token, logprob, beams[rows[r]])
                if end:
                    active[r] = False
                    chunks.end[r] = "step" if end == "cut" else end
                if end in ("", "step"):  # the token was kept and the row goes on: its next logits are needed
                    feed[r], fed_tokens[r] = True, token
            if feed.any():
                self.policy.forward(state, fed_tokens, feed)
                self.stats.policy_tokens += int(feed.sum())
                self.stats.policy_tokens_padded += len(rows)
        self.stats.policy_s += time.perf_counter() - t
        return chunks

    def _advance(self, chunks: Chunks, r: int, token: int, logprob: float, beam: Beam) -> str:
        """Row r sampled ``token``: keep it or end the step. Returns why the row's step ends:
        ``cut`` (a boundary before ``token``, which is dropped), ``step``, ``eos``, ``length``, or ''."""
        if token in self.eos_ids:
            return "eos"
        chunk = chunks.tokens[r]
        if self._boundary_before(chunks, r, token, beam):
            return "cut"
        chunk.append(token)
        chunks.logprobs[r].append(logprob)
        if len(beam.token_ids) + len(chunk) >= self.cfg.search.max_new_tokens:
            return "length"
        if len(chunk) >= self.step_cap:
            return "step"
        tb = self.table
        if (
            tb is not None and len(chunk) >= self.boundary.min_tokens and token < len(tb.text)
            and tb.may_end[token] and tb.ws_end[token] and not chunks.deferred[r]
            and self.boundary.ends_after(beam.text[-_CONTEXT_CHARS:], self._chunk_text(beam, chunk))
        ):
            return "step"
        return ""

    def _boundary_before(self, chunks: Chunks, r: int, token: int, beam: Beam) -> bool:
        """Does the step end before ``token``? May set or clear the row's deferral instead."""
        tb, chunk = self.table, chunks.tokens[r]
        if tb is None or not chunk or len(chunk) < self.boundary.min_tokens or token >= len(tb.text):
            return False
        last = chunk[-1]
        if chunks.deferred[r]:  # kept spaces after a possible end: this token decides
            chunks.deferred[r] = tb.spaces[token]
            if tb.spaces[token]:
                return False
        elif not (tb.ws_start[token] and tb.may_end[last] and not tb.ws_end[last]):
            return False
        elif tb.spaces[token]:  # " " says nothing yet ("No. 5" vs "No. It"): keep it, decide on the next
            chunks.deferred[r] = True
            return False
        text = self._chunk_text(beam, chunk)
        body = text.rstrip(" \t")
        return self.boundary.ends_before(beam.text[-_CONTEXT_CHARS:], body, text[len(body):] + tb.text[token])

    def _chunk_text(self, beam: Beam, chunk: list[int]) -> str:
        """Text of ``chunk`` as it reads after the beam's accepted tokens."""
        tail = beam.token_ids[-_DECODE_TAIL:]
        head, full = self.policy.decode(tail), self.policy.decode(tail + chunk)
        return full[len(head):] if full.startswith(head) else self.policy.decode(chunk)

    def _candidates(self, messages: Messages, beams: list[Beam], parents: torch.Tensor, chunks: Chunks) -> Candidates:
        ids = [beams[p].token_ids + c for p, c in zip(parents.tolist(), chunks.tokens)]
        return Candidates(messages, parents, ids, [self.policy.decode(i) for i in ids])

    def _score(self, reward_states: dict[str, Any], cands: Candidates, step: int) -> dict[str, torch.Tensor]:
        t = time.perf_counter()
        raw = {name: rm.score(reward_states[name], cands).double().cpu() for name, rm in self.rewards.items()}
        self.stats.prm_s += time.perf_counter() - t
        check_scores(raw, step)
        return raw

    def _combine(self, raw: dict[str, torch.Tensor], groups: torch.Tensor) -> torch.Tensor:
        if not raw:  # unguided: every candidate ties, the first wins
            return torch.zeros(len(groups), dtype=torch.float64)
        return combine(raw, self.weights, self.cfg.objective.normalize, groups if self.strategy.per_beam else None)

    def _eligible(self, batch: StepBatch, groups: torch.Tensor) -> torch.Tensor:
        """(R,) False for a candidate identical to an earlier one it competes with (``dedupe``)."""
        if not self.cfg.search.dedupe:
            return torch.ones(len(groups), dtype=torch.bool)
        keys = [(tuple(ids), end) for ids, end in zip(batch.cands.token_ids, batch.chunks.end)]
        return first_copies(keys, groups if self.strategy.per_beam else torch.zeros_like(groups))

    # -- bookkeeping ----------------------------------------------------------------------

    def _finish(self, batch: StepBatch, raw: dict[str, torch.Tensor], r: int, step: int) -> Finished:
        return Finished(batch.beam(r), batch.chunks.end[r], {k: float(v[r]) for k, v in raw.items()}, step, r)

    def _record(self, batch: StepBatch, raw, combined: torch.Tensor, selection: Selection, origins: list[int]) -> Step:
        self.stats.steps += 1
        chunks = batch.chunks
        records = [
            Candidate(
                text=batch.step_text(r),
                token_ids=list(chunks.tokens[r]),
                scores={k: float(v[r]) for k, v in raw.items()},
                combined=float(combined[r]),
                parent=origins[p],
                end=chunks.end[r],
                logprobs=list(chunks.logprobs[r]),
            )
            for r, p in enumerate(batch.parents.tolist())
        ]
        kept = selection.active + selection.finished
        return Step(records, kept[0] if self.strategy.beams == 1 else sorted(kept))

    def _result(self, finished: list[Finished], steps: list[Step], reward_states, t0: float) -> GuidedResult:
        raw = {k: torch.tensor([f.scores[k] for f in finished], dtype=torch.float64) for k in self.rewards}
        best = finished[final_pick(raw, [len(f.beam.token_ids) for f in finished], self.cfg, self.weights)]
        if self.strategy.beams == 1:  # the step that ended the search records the answer it gave
            steps[best.step].chosen = best.row
        for st in reward_states.values():
            self.stats.prm_tokens += st.counters.tokens
            self.stats.prm_tokens_padded += st.counters.padded_tokens
            self.stats.prm_full_rescore_tokens += st.counters.full_rescore_tokens
        self.stats.response_tokens = len(best.beam.token_ids)
        self.stats.wall_s = time.perf_counter() - t0
        return GuidedResult(
            text=best.beam.text,
            token_ids=best.beam.token_ids,
            stop_reason=best.reason,
            steps=steps,
            stats=self.stats,
            scores=best.scores,
        )
