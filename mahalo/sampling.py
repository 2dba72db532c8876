"""Token sampling: temperature, top-k and top-p with an explicit ``torch.Generator``."""

from __future__ import annotations

import torch

from mahalo.config import SamplingConfig


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
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator
) -> torch.Tensor:
    """Draw one token per row of ``logits`` (R, V) -> (R,). Temperature 0 is greedy.

    With top-k on, only the k best logits are softmaxed and sampled (the same distribution as
    masking the rest, without a full-vocabulary softmax per token).
    """
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    if 0 < cfg.top_k < logits.shape[-1]:
        values, index = torch.topk(logits.float() / cfg.temperature, cfg.top_k, dim=-1)  # (R, K) sorted
        if cfg.top_p < 1.0:
            values = values.masked_fill(_top_p_mask(values, cfg.top_p), float("-inf"))
        choice = _draw(torch.softmax(values, dim=-1), generator)  # (R,)
        return index.gather(1, choice[:, None].to(index.device))[:, 0]
    return _draw(torch.softmax(filter_logits(logits, cfg), dim=-1), generator)


def _draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One multinomial draw per row, on the generator's device so a seed means the same draws."""
    draws = torch.multinomial(probs.to(generator.device), 1, generator=generator)
    return draws.squeeze(-1).to(probs.device)
