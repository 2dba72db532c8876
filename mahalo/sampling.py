"""Token sampling on the logits' device: temperature, top-k and top-p, keyed per row.

Every row draws from its own *stream*: a draw is the Gumbel-max of ``logits / T`` plus noise that
is a hash of (the row's stream, the row's position in the response, the token id). Nothing depends
on which other rows share the batch, so a prompt decoded beside 31 others gives the same tokens as
alone, and no probabilities travel to a host-side generator.

Streams follow the search tree: a prompt's root stream comes from the seed; a row's first
candidate continues its parent's stream and the others branch off it (:func:`child_stream`). So
one candidate per step continues exactly where plain sampling would, and sibling candidates are
independent.

The hash is PCG-RXS-M-XS (Jarzynski and Olano, "Hash Functions for GPU Rendering", 2020) on 32-bit
values held in int64, so every product stays below 2**63 on any device.
"""

from __future__ import annotations

import torch

from mahalo.config import SamplingConfig

_M32 = 0xFFFFFFFF


def _pcg(x: torch.Tensor) -> torch.Tensor:
    """PCG hash of int64 values in [0, 2**32) -> [0, 2**32)."""
    state = (x * 747796405 + 2891336453) & _M32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & _M32
    return (word >> 22) ^ word


def _pcg_int(x: int) -> int:
    """:func:`_pcg` on a Python int."""
    state = (x * 747796405 + 2891336453) & _M32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & _M32
    return (word >> 22) ^ word


def root_stream(seed: int) -> int:
    """The stream of a prompt's first row, from the search's seed."""
    return _pcg_int((seed & _M32) ^ _pcg_int((seed >> 32) & _M32))


def child_stream(parent: int, child: int) -> int:
    """The stream of candidate ``child`` (0, 1, ...) of a row: the first continues its parent's."""
    return parent if child == 0 else _pcg_int(parent ^ _pcg_int(child))


def _gumbel(streams: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel noise (R, K) float64 for tokens ``token_ids`` (R, K) of rows with ``streams`` and
    ``positions`` (R,)."""
    key = _pcg(streams[:, None] ^ _pcg(positions[:, None] ^ _pcg(token_ids & _M32)))  # (R, K)
    u = (key.double() + 0.5) / 2.0**32  # (0, 1)
    return -torch.log(-torch.log(u))


def _top_p_mask(sorted_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """True where a token of descending-sorted logits (R, K) falls outside the nucleus."""
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the mass before it already reaches top_p (the top token always stays).
    return (probs.cumsum(-1) - probs) >= top_p


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Apply temperature, top-k and top-p to ``logits`` (R, V); removed tokens get ``-inf``."""
    logits = logits.float() / cfg.temperature  # (R, V)
    if 0 < cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]  # (R, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        drop_sorted = _top_p_mask(sorted_logits, cfg.top_p)
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor, cfg: SamplingConfig, streams: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Draw one token per row of ``logits`` (R, V) -> (R,), on the logits' device.

    Args:
        logits: next-token logits of R rows.
        cfg: temperature (0: greedy), top-k, top-p.
        streams: (R,) int64 in [0, 2**32), each row's stream (:func:`root_stream`, :func:`child_stream`).
        positions: (R,) int64, each row's position in its response (the draw's index).

    With top-k on, only the k best logits are looked at (the same distribution as masking the
    rest: the noise of a token depends on its id, not its rank).
    """
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    streams, positions = streams.to(logits.device), positions.to(logits.device)
    if 0 < cfg.top_k < logits.shape[-1]:
        values, index = torch.topk(logits.float() / cfg.temperature, cfg.top_k, dim=-1)  # (R, K) sorted
        if cfg.top_p < 1.0:
            values = values.masked_fill(_top_p_mask(values, cfg.top_p), float("-inf"))
        choice = (values.double() + _gumbel(streams, positions, index)).argmax(dim=-1)  # (R,)
        return index.gather(1, choice[:, None])[:, 0]
    filtered = filter_logits(logits, cfg).double()  # (R, V)
    vocab = torch.arange(filtered.shape[-1], device=logits.device).expand_as(filtered)
    return (filtered + _gumbel(streams, positions, vocab)).argmax(dim=-1)
