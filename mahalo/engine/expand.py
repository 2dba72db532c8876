"""The token loop's per-token work: draw one token for every decoding row, then decide on the
host where each row's step ends.

    sample     every decoding row, on the device, each from its own stream    # (R,) tokens
    transfer   tokens, log-probabilities and per-token flags, packed: the one sync per token
    advance    per row: end of turn? a step boundary before or after the token? the budget?

A step ends at a confirmed boundary (:mod:`mahalo.steps`): when a sampled token starts with
whitespace after text that may end a step, the detector decides, and if the step ends there the
token is dropped ("cut"). Its row was not fed that token, so the row's logits at the boundary seed
the next step's candidates. Only rows whose token can end a step (a per-vocabulary flag table)
touch text, and that text is detokenised incrementally.
"""

from __future__ import annotations

from typing import Any

import torch

from mahalo.config import GuideConfig
from mahalo.engine.rows import Row
from mahalo.sampling import sample_tokens
from mahalo.steps import ChunkText, NoBoundary, StepBoundary, TokenTable, make_boundary, token_table
from mahalo.stops import find_stop, tokens_for

CONTEXT_CHARS = 256  # accepted text shown to boundary detectors
# Bits of the per-token flag table (see flag_table).
EOS, WS_START, WS_END, SPACES, MAY_END = 1, 2, 4, 8, 16


class Expander:
    """Samples decoding rows and advances them token by token (the policy's step rule and stop
    tokens are shared by every prompt of an engine)."""

    def __init__(self, policy: Any, cfg: GuideConfig) -> None:
        self.policy = policy
        self.boundary: StepBoundary = make_boundary(cfg.step.kind, cfg.step.min_step_tokens)
        self.table: TokenTable | None = None  # built when a stepwise search first needs it
        self.eos_ids = frozenset(policy.eos_ids) | frozenset(cfg.sampling.stop_token_ids)
        self.stop_token_ids = list(cfg.sampling.stop_token_ids)
        self.flags: torch.Tensor | None = None  # (V,) int per-token flags, on the policy's device
        self.host_flags: list[int] = []
        self.vocab = 0

    def ready(self, vocab: int, stepwise: bool, device: torch.device) -> None:
        """Build the flag table for a vocabulary of ``vocab`` tokens (once; again when the first
        stepwise search arrives).

        Raises:
            ValueError: a stop token outside the vocabulary.
        """
        if stepwise and self.table is None and not isinstance(self.boundary, NoBoundary):
            self.table = token_table(self.policy.tokenizer, self.boundary)
            self.vocab = 0
        if self.vocab == vocab:
            return
        outside = sorted(i for i in self.stop_token_ids if i >= vocab)
        if outside:
            raise ValueError(f"stop_token_ids {outside} are outside the policy's vocabulary ({vocab} tokens)")
        self.host_flags = flag_table(self.table, self.eos_ids, vocab)
        self.flags = torch.tensor(self.host_flags, device=device)
        self.vocab = vocab

    def sample(self, logits: torch.Tensor, rows: list[Row]) -> list[tuple[int, float, int]]:
        """One draw per row from its logits (``logits[row.slot]``), each with its prompt's
        sampling options and its own stream; returns (token, log-probability, flags) per row. One
        host-to-device transfer (slots, streams, positions) and one device-to-host transfer."""
        device = logits.device
        keys = torch.tensor([[r.slot for r in rows], [r.stream for r in rows], [r.position for r in rows]])
        slots, streams, positions = keys.to(device, non_blocking=device.type == "cuda")  # (3, R) -> (R,) each
        mine = logits[slots]  # (R, V)
        tokens = _sample(mine, [r.plan.cfg.sampling for r in rows], streams, positions)  # (R,)
        logprobs = torch.log_softmax(mine.float(), -1).gather(1, tokens[:, None])[:, 0]  # (R,)
        packed = torch.stack([tokens.double(), logprobs.double(), self.flags[tokens].double()])  # (3, R)
        return [(int(t), lp, int(f)) for t, lp, f in zip(*packed.tolist())]  # the one transfer of this token

    def advance(self, row: Row, token: int, logprob: float, flags: int) -> str:
        """Row sampled ``token``: keep it or end the step. Returns why the row's step ends: ``cut``
        (a boundary before ``token``, which is dropped), ``step``, ``eos``, ``stop`` (its text
        reached a stop string: the row is cut back, :meth:`_stopped`), ``length``, or ''."""
        if flags & EOS:
            return "eos"
        plan = row.plan
        stepwise = plan.strategy.stepwise and self.table is not None
        if stepwise and self._boundary_before(row, token, flags):
            return "cut"
        row.tokens.append(token)
        row.logprobs.append(logprob)
        if row.text is not None:
            row.text.append(token)
        if plan.cfg.sampling.stop and self._stopped(row, plan.cfg.sampling.stop):
            return "stop"
        n = len(row.tokens)
        if len(row.beam.token_ids) + n >= plan.cfg.search.max_new_tokens:
            return "length"
        if n >= plan.step_cap:
            return "step"
        if (
            stepwise and flags & MAY_END and flags & WS_END and not row.deferred
            and n >= plan.cfg.step.min_step_tokens
            and self.boundary.ends_after(row.beam.text[-CONTEXT_CHARS:], self._text(row))
        ):
            return "step"
        return ""

    def _stopped(self, row: Row, stops: list[str]) -> bool:
        """Has the row's text reached a stop string? Checks only the characters its last token
        added (and the few before that a stop string could start in); on a match the row keeps the
        text before the stop string and the tokens that spell it (``row.cut``, ``row.cut_text``;
        the match may start in its beam's text)."""
        chunk = self._text(row)
        at = find_stop(row.beam.text, chunk, row.scanned, stops)
        row.scanned = len(chunk)
        if at is None:
            return False
        beam = row.beam
        text = beam.text + chunk[:at] if at >= 0 else beam.text[:len(beam.text) + at]
        row.cut = tokens_for(self.policy.decode, beam.token_ids + row.tokens, len(text))
        row.cut_text = text
        own = max(0, row.cut - len(beam.token_ids))
        del row.tokens[own:], row.logprobs[own:]
        row.fed = min(row.fed, own)
        return True

    def _boundary_before(self, row: Row, token: int, flags: int) -> bool:
        """Does the step end before ``token``? May set or clear the row's deferral instead."""
        if not row.tokens or len(row.tokens) < row.plan.cfg.step.min_step_tokens or self.table is None:
            return False
        last = self.host_flags[row.tokens[-1]]
        if row.deferred:  # kept spaces after a possible end: this token decides
            row.deferred = bool(flags & SPACES)
            if row.deferred:
                return False
        elif not (flags & WS_START and last & MAY_END and not last & WS_END):
            return False
        elif flags & SPACES:  # " " says nothing yet ("No. 5" vs "No. It"): keep it, decide on the next
            row.deferred = True
            return False
        text = self._text(row)
        body = text.rstrip(" \t")
        following = text[len(body):] + (self.table.text[token] if token < len(self.table.text) else "")
        return self.boundary.ends_before(row.beam.text[-CONTEXT_CHARS:], body, following)

    def _text(self, row: Row) -> str:
        """The row's chunk text as it reads after its beam, detokenised incrementally."""
        if row.text is None:
            row.text = ChunkText(self.policy.decode, row.beam.token_ids)
            for t in row.tokens:
                row.text.append(t)
        return row.text.current()


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


def flag_table(table: TokenTable | None, eos_ids: frozenset[int], vocab: int) -> list[int]:
    """Per-token flags for the hot loop: end of turn, and what the step rules need to know."""
    flags = [0] * vocab
    if table is not None:
        for i in range(min(vocab, len(table.text))):
            flags[i] = (
                WS_START * table.ws_start[i] | WS_END * table.ws_end[i] | SPACES * table.spaces[i]
                | MAY_END * table.may_end[i]
            )
    for i in eos_ids:
        if 0 <= i < vocab:
            flags[i] |= EOS
    return flags
