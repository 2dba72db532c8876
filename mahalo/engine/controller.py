"""The one step loop behind every strategy.

    prefill prompt once (policy and reward models)
    repeat:
      1. fan out     each beam's policy row -> N candidate rows, by index      # (B*N,)
      2. expand      decode all B*N rows in lockstep until each ends its step
      3. score       every objective scores every candidate (new tokens only)  # (B*N,)
      4. combine     weighted sum of normalised per-objective scores           # (B*N,)
      5. select      the strategy keeps the best; ended candidates set aside
      6. keep        survivors' rows on both sides, compact the caches
    return the best ended beam
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mahalo.chat import Messages
from mahalo.config import GuideConfig
from mahalo.engine.strategies import Strategy, select_top, strategy_for
from mahalo.policy import Policy, PolicyState
from mahalo.result import Candidate, GuidedResult, Stats, Step
from mahalo.rewards import Candidates, RewardModel
from mahalo.rewards.combine import combine
from mahalo.sampling import sample_tokens
from mahalo.steps import NoBoundary, StepBoundary, make_boundary

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
    """An ended beam and its final reward."""

    beam: Beam
    reason: str
    scores: dict[str, float]
    final: float


class Controller:
    """Runs one prompt through the search described by a :class:`GuideConfig`."""

    def __init__(self, policy: Policy, rewards: dict[str, RewardModel], cfg: GuideConfig) -> None:
        cfg.check_objectives(list(rewards))
        self.policy, self.rewards, self.cfg = policy, rewards, cfg
        self.strategy: Strategy = strategy_for(cfg)
        self.boundary: StepBoundary = (
            make_boundary(cfg.step.kind, cfg.step.min_step_tokens) if self.strategy.stepwise else NoBoundary()
        )
        self.step_cap = cfg.step.max_step_tokens if self.strategy.stepwise else cfg.search.max_new_tokens
        self.weights = {name: cfg.weight(name) for name in rewards}

    def run(self, messages: Messages) -> GuidedResult:
        t0 = time.perf_counter()
        self.stats = Stats()
        self.generator = torch.Generator().manual_seed(self.cfg.search.seed)
        # 0. prefill the prompt once on both sides
        state = self._prefill(messages)
        reward_states = {name: rm.start(messages, self.policy.tokenizer) for name, rm in self.rewards.items()}
        beams, finished, steps = [Beam()], [], []
        origins = [-1]  # each beam's candidate index in the previous step
        while beams:
            # 1. fan out: beam b -> rows b*N .. b*N+N-1 (the prompt alone -> B*N rows at first)
            fan = self.strategy.candidates * (1 if steps else self.strategy.beams)
            parents = torch.arange(len(beams)).repeat_interleave(fan)  # (B*N,)
            state.select(parents)
            # 2. expand all candidates of all beams in lockstep
            chunks = self._expand(state, beams, parents)
            batch = StepBatch(beams, parents, chunks, self._candidates(messages, beams, parents, chunks))
            # 3-4. score and combine
            raw = self._score(reward_states, batch.cands)
            combined = self._combine(raw, len(parents))
            # 5. select
            ended = torch.tensor([e != "step" for e in chunks.end])
            selection = select_top(combined, ended, self.strategy.beams - len(finished))
            steps.append(self._record(batch, raw, combined, selection, origins))
            finished += [self._finish(batch, raw, r) for r in selection.finished]
            beams = [batch.beam(r) for r in selection.active]
            origins = selection.active
            if not beams or len(finished) >= self.strategy.beams:
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
        return state

    def _expand(self, state: PolicyState, beams: list[Beam], parents: torch.Tensor) -> Chunks:
        """Decode one step for every row (R = B*N) in lockstep; ended rows become holes."""
        t = time.perf_counter()
        rows = parents.tolist()
        chunks = Chunks([[] for _ in rows], [[] for _ in rows], ["" for _ in rows])
        active = torch.ones(len(rows), dtype=torch.bool)
        while active.any():
            idx = active.nonzero().squeeze(1)  # (A,)
            logits = state.logits[idx]  # (A, V)
            tokens = sample_tokens(logits, self.cfg.sampling, self.generator)  # (A,)
            logprobs = torch.log_softmax(logits, -1).gather(1, tokens[:, None].to(logits.device))[:, 0]
            feed = torch.zeros(len(rows), dtype=torch.bool)
            fed_tokens = torch.zeros(len(rows), dtype=torch.long)
            for i, r in enumerate(idx.tolist()):
                token = int(tokens[i])
                end = self._append(chunks, r, token, float(logprobs[i]), beams[rows[r]])
                if end:
                    active[r] = False
                    chunks.end[r] = end
                if end in ("", "step"):  # the row continues later: its next logits are needed
                    feed[r], fed_tokens[r] = True, token
            if feed.any():
                self.policy.forward(state, fed_tokens, feed)
                self.stats.policy_tokens += int(feed.sum())
                self.stats.policy_tokens_padded += len(rows)
        self.stats.policy_s += time.perf_counter() - t
        return chunks

    def _append(self, chunks: Chunks, r: int, token: int, logprob: float, beam: Beam) -> str:
        """Add ``token`` to row r's chunk; return why the row's step ends, or ''."""
        if token in self.policy.eos_ids:
            return "eos"
        chunk = chunks.tokens[r]
        chunk.append(token)
        chunks.logprobs[r].append(logprob)
        if len(beam.token_ids) + len(chunk) >= self.cfg.search.max_new_tokens:
            return "length"
        if len(chunk) >= self.step_cap:
            return "step"
        if len(chunk) >= self.boundary.min_tokens and self.strategy.stepwise:
            text = self._chunk_text(beam, chunk)
            if self.boundary(beam.text[-_CONTEXT_CHARS:], text, len(chunk)):
                return "step"
        return ""

    def _chunk_text(self, beam: Beam, chunk: list[int]) -> str:
        """Text of ``chunk`` as it reads after the beam's accepted tokens."""
        tail = beam.token_ids[-_DECODE_TAIL:]
        head, full = self.policy.decode(tail), self.policy.decode(tail + chunk)
        return full[len(head):] if full.startswith(head) else self.policy.decode(chunk)

    def _candidates(self, messages: Messages, beams: list[Beam], parents: torch.Tensor, chunks: Chunks) -> Candidates:
        ids = [beams[p].token_ids + c for p, c in zip(parents.tolist(), chunks.tokens)]
        return Candidates(messages, parents, ids, [self.policy.decode(i) for i in ids])

    def _score(self, reward_states: dict[str, Any], cands: Candidates) -> dict[str, torch.Tensor]:
        t = time.perf_counter()
        raw = {name: rm.score(reward_states[name], cands).double().cpu() for name, rm in self.rewards.items()}
        self.stats.prm_s += time.perf_counter() - t
        return raw

    # -- bookkeeping ----------------------------------------------------------------------

    def _combine(self, raw: dict[str, torch.Tensor], rows: int) -> torch.Tensor:
        if not raw:  # unguided: every candidate ties, the first wins
            return torch.zeros(rows, dtype=torch.float64)
        return combine(raw, self.weights, self.cfg.objective.normalize)

    def _finish(self, batch: StepBatch, raw: dict[str, torch.Tensor], r: int) -> Finished:
        scores = {k: float(v[r]) for k, v in raw.items()}
        final = sum(self.weights[k] * s for k, s in scores.items())
        return Finished(batch.beam(r), batch.chunks.end[r], scores, final)

    def _record(self, batch: StepBatch, raw, combined: torch.Tensor, selection, origins: list[int]) -> Step:
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
        best = max(finished, key=lambda f: f.final)  # ties: the first to finish
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
