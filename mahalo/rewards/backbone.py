"""Reward models on a transformer backbone, scored incrementally: the machinery every
model-backed family shares.

A :class:`BackboneReward` is three parts:

* a **backbone** (``model.base_model``: it returns ``last_hidden_state``);
* a **layout** (:class:`Layout`): which token ids a candidate's conversation is (a chat
  conversation, the same followed by a judge's question, or the response split into steps with a
  separator after each), and at which positions it is read (the last token, or every separator);
* a **reader** (:class:`HeadReader`, :class:`TokenReader`): hidden states at those positions ->
  values (a classification or value head; two tokens' logits of an LM head).

Cost: rows of all prompts in flight share one KV cache. A candidate forwards only its ids after the
longest common prefix with its beam's row (at least its last token); values read at earlier
positions (earlier steps' separators) stay in the state, so a step is forwarded once. Hidden states
are gathered at true positions, never found by pad-token search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from mahalo.chat import Messages
from mahalo.kv import KVRows, empty_rows, right_padded
from mahalo.rewards.protocol import Candidates, RowCost, RowFaults

AGGREGATES = ("last", "min", "prod", "mean")


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def aggregate(values: torch.Tensor, how: str) -> torch.Tensor:
    """Step values (S, C) -> (C,): search-and-learn's ``last``, ``min``, ``prod`` or ``mean``."""
    if how == "last":
        return values[-1]
    if how == "min":
        return values.min(dim=0).values
    if how == "prod":
        return values.prod(dim=0)
    if how == "mean":
        return values.mean(dim=0)
    raise ValueError(f"unknown aggregate {how!r}: choose one of {list(AGGREGATES)}")


class Layout(Protocol):
    """Which ids a candidate's conversation is and where they are read."""

    def format(self, tokenizer: Any, messages: Messages) -> Any:
        """Per-prompt format; it has ``prefix_ids(tokenizer)`` (what ``add`` prefills)."""
        ...

    def ids(self, tokenizer: Any, formats: list[Any], candidates: Candidates) -> list[list[int]]:
        """The whole scoring ids of every candidate (R, *)."""
        ...

    def positions(self, fmt: Any, ids: list[int]) -> list[int]:
        """The positions of ``ids`` whose hidden states are read, in order (at least one)."""
        ...

    def combine(self, values: torch.Tensor) -> torch.Tensor:
        """Values read at the positions (S, C) -> the candidate's score (C,)."""
        ...


class HeadReader:
    """A head module on hidden states: ``logit`` (its one output), ``prob`` (softmax of two
    outputs, class 1) or ``outputs`` (every output, raw)."""

    MODES = ("logit", "prob", "outputs")

    def __init__(self, head: Any, mode: str) -> None:
        if mode not in self.MODES:
            raise ValueError(f"unknown head mode {mode!r}: choose one of {list(self.MODES)}")
        self.head, self.mode = head, mode
        self._param = next(head.parameters())

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (K, H) -> values (K, C) float64."""
        out = self.head(hidden.to(self._param.device, self._param.dtype)).double()  # (K, C)
        if self.mode == "logit":
            return out[:, :1]
        if self.mode == "prob":
            return torch.softmax(out, dim=-1)[:, 1:2]
        return out


class TokenReader:
    """Two tokens' logits of an LM head: ``prob`` = P(a) among {a, b} (Math-Shepherd's "+"/"-"),
    ``diff`` = logit(a) - logit(b) (a yes/no judge)."""

    MODES = ("prob", "diff")

    def __init__(self, lm_head: Any, a: int, b: int, mode: str) -> None:
        if mode not in self.MODES:
            raise ValueError(f"unknown token mode {mode!r}: choose one of {list(self.MODES)}")
        self.lm_head, self.a, self.b, self.mode = lm_head, a, b, mode
        self._param = next(lm_head.parameters())

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden.to(self._param.device, self._param.dtype)).double()  # (K, V)
        pair = logits[:, [self.a, self.b]]  # (K, 2)
        if self.mode == "prob":
            return torch.softmax(pair, dim=-1)[:, :1]
        return pair[:, :1] - pair[:, 1:]


def single_token(tokenizer: Any, text: str, what: str) -> int:
    """The id of ``text`` when it is exactly one token.

    Raises:
        ValueError: it is not, naming ``what`` (the option) and the fix.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{what} {text!r} is {len(ids)} tokens for this tokenizer: pick a word that is one token")
    return int(ids[0])


@dataclass
class _State:
    kv: KVRows  # rows = beams of every prompt (after keep) or candidates (after score)
    formats: list[Any] = field(default_factory=list)  # per row: its prompt's format
    ids: list[list[int]] = field(default_factory=list)  # per row: the ids its valid columns hold, in order
    reads: list[dict[int, torch.Tensor]] = field(default_factory=list)  # per row: position -> values (C,)
    cost: RowCost = field(default_factory=RowCost)  # of the last add / score, per row
    pending: list[tuple[list[int], dict[int, torch.Tensor]]] = field(default_factory=list)  # per scored row


class BackboneReward:
    """A reward model: backbone + :class:`Layout` + reader, behind the
    :class:`~mahalo.rewards.protocol.RewardModel` protocol.

    ``score`` returns (R,) when the reader gives one value per position, else (R, C) (a
    multi-output model: see :class:`~mahalo.rewards.seqcls.RewardOutput`).
    """

    def __init__(self, base: Any, tokenizer: Any, layout: Layout, reader: Any, max_context: int | None = None) -> None:
        self.base = base.eval()
        self.tokenizer = tokenizer
        self.layout = layout
        self.reader = reader
        self.device = next(base.parameters()).device
        self.max_context = max_context
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def start(self) -> _State:
        return _State(empty_rows(self.device, 0))

    @torch.inference_mode()
    def add(self, state: _State, prompts: list[Messages]) -> None:
        """Prefill each prompt's conversation prefix (right-padded, one forward) as new rows."""
        formats = [self.layout.format(self.tokenizer, messages) for messages in prompts]
        prefixes = [f.prefix_ids(self.tokenizer) for f in formats]
        self._check_context(max(len(p) for p in prefixes))
        rows = empty_rows(self.device, len(prompts))
        block, block_mask = right_padded(prefixes, self._pad_id, self.device)  # (P, T)
        self._forward(rows, block, block_mask)
        state.kv.cat(rows)
        state.formats += formats
        state.ids += prefixes
        state.reads += [{} for _ in prompts]
        width = block.shape[1]
        state.cost = RowCost([len(p) for p in prefixes], [width] * len(prefixes), [0] * len(prefixes))

    @torch.inference_mode()
    def score(self, state: _State, candidates: Candidates) -> torch.Tensor:
        # 1. scoring ids of every candidate; reuse its beam's cached ids up to the common prefix, but
        #    forward every read position whose value the beam does not hold (at least the last token)
        parents = candidates.parents.tolist()
        formats = [state.formats[p] for p in parents]
        ids = self.layout.ids(self.tokenizer, formats, candidates)  # (R, *)
        at = [self.layout.positions(f, r) for f, r in zip(formats, ids)]
        reuse = []
        for p, r, pos in zip(parents, ids, at):
            k = min(common_prefix(state.ids[p], r), len(r) - 1)
            missing = [q for q in pos if q < k and q not in state.reads[p]]
            reuse.append(min([k, *missing]))
        new = [r[k:] for r, k in zip(ids, reuse)]
        if self.max_context is not None:  # before the state changes: those candidates' prompts fail alone
            over = {i: self._too_long(len(r)) for i, r in enumerate(ids) if len(r) > self.max_context}
            if over:
                raise RowFaults(over, too_long=True)
        # 2. fan the beams' rows out to their candidates; cached ids past the reuse become holes
        state.kv.select(candidates.parents)
        state.kv.keep_valid(torch.tensor(reuse, device=self.device))
        state.formats = formats
        # 3. one forward of every candidate's new tokens (right-padded)
        block, block_mask = right_padded(new, self._pad_id, self.device)  # (R, T)
        hidden = self._forward(state.kv, block, block_mask)  # (R, T, H)
        # 4. read the new positions, all rows in one call; earlier ones come from the beam's reads
        rows_at = [(i, q) for i, (pos, k) in enumerate(zip(at, reuse)) for q in pos if q >= k]
        r_idx = torch.tensor([i for i, _ in rows_at], device=hidden.device)
        c_idx = torch.tensor([q - reuse[i] for i, q in rows_at], device=hidden.device)
        values = self.reader(hidden[r_idx, c_idx]).cpu()  # (K, C) float64
        fresh: list[dict[int, torch.Tensor]] = [{} for _ in ids]
        for (i, q), v in zip(rows_at, values):
            fresh[i][q] = v
        scores, pending = [], []
        for i, (p, pos, k) in enumerate(zip(parents, at, reuse)):
            reads = {q: state.reads[p][q] for q in pos if q < k} | fresh[i]
            scores.append(self.layout.combine(torch.stack([reads[q] for q in pos])))
            pending.append((ids[i], reads))
        state.pending = pending
        state.cost = RowCost([len(n) for n in new], [block.shape[1]] * len(new), [len(r) for r in ids])
        out = torch.stack(scores)  # (R, C)
        return out[:, 0] if out.shape[1] == 1 else out

    @torch.inference_mode()
    def keep(self, state: _State, rows: torch.Tensor) -> None:
        """Keep the scored rows ``rows``: their whole scoring ids stay cached (and their reads);
        the next ``score`` reuses them up to where the candidates differ."""
        rows = rows.to(self.device)
        state.kv.select(rows)
        state.kv.tidy()
        kept = rows.tolist()
        state.ids = [state.pending[r][0] for r in kept]
        state.reads = [state.pending[r][1] for r in kept]
        state.formats = [state.formats[r] for r in kept]

    def _forward(self, kv: KVRows, input_ids: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        mask, positions = kv.extend(new_mask)
        out = self.base(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=kv.cache, use_cache=True
        )
        return out.last_hidden_state  # (R, T, H)

    def merge(self, states: list[_State]) -> _State:
        """One state with the rows of ``states`` in order (their caches copied, they stay as they are)."""
        return _State(KVRows.concat([st.kv for st in states]), [f for st in states for f in st.formats],
                      [i for st in states for i in st.ids], [r for st in states for r in st.reads])

    def split(self, state: _State, sizes: list[int]) -> list[_State]:
        """``state``'s rows as consecutive groups of ``sizes`` rows, one state each."""
        out, start = [], 0
        for kv, n in zip(state.kv.split(sizes), sizes):
            end = start + n
            out.append(_State(kv, state.formats[start:end], state.ids[start:end], state.reads[start:end]))
            start = end
        return out

    def context_need(self, messages: Messages, response_tokens: int, steps: int) -> tuple[int, int | None]:
        """The most tokens this model reads for a response of ``response_tokens`` tokens in at most
        ``steps`` steps, and its context. The response is counted in the policy's tokens: exact
        when both share a tokenizer; with another vocabulary ``score`` still refuses an overflow
        (the prompt fails alone)."""
        fmt = self.layout.format(self.tokenizer, messages)
        empty = Candidates(torch.zeros(1, dtype=torch.long), [[]], [""], [[""]])
        base = len(self.layout.ids(self.tokenizer, [fmt], empty)[0])  # the prompt, an empty response, the suffix
        per_step = getattr(self.layout, "step_tokens", lambda tokenizer: 0)(self.tokenizer)
        return base + response_tokens + max(0, steps - 1) * per_step, self.max_context

    def _too_long(self, length: int) -> str:
        return (f"the reward model's input ({length} tokens) exceeds its context ({self.max_context}): "
                "lower max_new_tokens or shorten the prompt")

    def _check_context(self, length: int) -> None:
        if self.max_context is not None and length > self.max_context:
            raise ValueError(self._too_long(length))

