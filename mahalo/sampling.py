"""Token sampling: temperature, top-k and top-p with an explicit ``torch.Generator``."""

from __future__ import annotations

import torch

from mahalo.config import SamplingConfig


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Apply temperature, top-k and top-p to ``logits`` (R, V); removed tokens get ``-inf``."""
    logits = logits.float() / cfg.temperature  # (R, V)
    if 0 < cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]  # (R, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= cfg.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator
) -> torch.Tensor:
    """Draw one token per row of ``logits`` (R, V) -> (R,). Temperature 0 is greedy."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, cfg), dim=-1)  # (R, V)
    # Sample on the CPU generator's device so a seed gives the same draws everywhere.
    draws = torch.multinomial(probs.to(generator.device), 1, generator=generator)
    return draws.squeeze(-1).to(logits.device)
