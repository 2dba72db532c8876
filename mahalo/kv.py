"""KV-cache rows: fan out, select and compact cache rows; masks and position ids.

A :class:`KVRows` pairs a transformers ``DynamicCache`` (R rows, L columns) with its 2-D
attention mask (R, L). A column whose mask is 0 is a *hole*: a padding token, a token of a row
that had already ended its step, or a reward model's end-of-turn suffix that is no longer
wanted. Holes are invisible to attention, and position ids are ``cumsum(mask) - 1``, so a row
with holes computes exactly what a full forward of its valid tokens computes.

Rows are fanned out and selected by index (one gather per layer, never a deepcopy). Rows of
different prompts live side by side: :meth:`KVRows.cat` appends rows, left-padding the shorter
cache with holes. Holes cost attention work, not correctness, so :meth:`KVRows.tidy` slices off
columns that are holes in every row (cheap) and right-aligns rows (a gather over every layer) only
when holes fill a large part of the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class KVRows:
    """A batch of cache rows with their attention mask."""

    cache: DynamicCache
    mask: torch.Tensor  # (R, L) long, 1 = valid, 0 = hole

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def valid_counts(self) -> torch.Tensor:
        """Number of valid columns per row (R,)."""
        return self.mask.sum(dim=1)

    def extend(self, new_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``new_mask`` (R, T) for T new tokens about to be forwarded.

        Returns:
            ``(attention_mask (R, L+T), position_ids (R, T))`` for the forward call.
        """
        self.mask = torch.cat([self.mask, new_mask.to(self.mask)], dim=1)  # (R, L+T)
        positions = (self.mask.cumsum(dim=1) - 1).clamp_min(0)  # (R, L+T)
        return self.mask, positions[:, -new_mask.shape[1]:]

    def select(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (R',), repeats allowed: fan-out is a select with repeats."""
        index = index.to(self.mask.device)
        if index.numel() == self.rows and bool((index == torch.arange(self.rows, device=index.device)).all()):
            return
        on = _per_device(index)
        for layer in _filled_layers(self.cache):  # a model spread over GPUs has layers on each
            layer.keys, layer.values = layer.keys[on(layer.keys)], layer.values[on(layer.values)]
        self.mask = self.mask[index]

    def take(self, index: torch.Tensor) -> KVRows:
        """A new :class:`KVRows` holding copies of rows ``index``; these rows are unchanged."""
        index = index.to(self.mask.device)
        on = _per_device(index)
        cache = DynamicCache()
        for i, layer in enumerate(_filled_layers(self.cache)):
            cache.update(layer.keys[on(layer.keys)], layer.values[on(layer.values)], i)
        return KVRows(cache, self.mask[index])

    def crop(self, columns: int) -> None:
        """Drop the last ``columns`` columns of every row (what a probe forward appended)."""
        if columns <= 0:
            return
        self.mask = self.mask[:, :-columns]
        for layer in _filled_layers(self.cache):
            layer.keys, layer.values = layer.keys[:, :, :-columns], layer.values[:, :, :-columns]

    def keep_valid(self, count: torch.Tensor) -> None:
        """Keep the first ``count[r]`` valid columns of row r (R,); later valid columns become holes."""
        seen = self.mask.cumsum(dim=1)  # (R, L) valid columns up to and including each column
        self.mask = self.mask * (seen <= count.to(self.mask.device)[:, None]).to(self.mask.dtype)

    def cat(self, other: KVRows) -> None:
        """Append ``other``'s rows after these (the shorter cache is left-padded with holes)."""
        if self.rows == 0 or not _filled_layers(self.cache):
            self.cache, self.mask = other.cache, other.mask
            return
        length = max(self.length, other.length)
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, length), _left_pad(theirs.keys, length)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, length), _left_pad(theirs.values, length)], dim=0)
        pad = [torch.nn.functional.pad(m, (length - m.shape[1], 0)) for m in (self.mask, other.mask.to(self.mask))]
        self.mask = torch.cat(pad, dim=0)

    def tidy(self, max_hole_fraction: float = 0.25) -> None:
        """Cheap upkeep between steps: slice off columns that are holes in every row at either
        end; right-align rows (:meth:`compact`) only when more than ``max_hole_fraction`` of the
        cells are still holes."""
        if self.rows == 0 or self.length == 0:
            return
        any_valid = self.mask.bool().any(dim=0)  # (L,)
        if not bool(any_valid.any()):
            return
        cols = any_valid.nonzero()[:, 0]
        first, last = int(cols[0]), int(cols[-1]) + 1
        if first > 0 or last < self.length:
            self.mask = self.mask[:, first:last]
            for layer in _filled_layers(self.cache):
                layer.keys, layer.values = layer.keys[:, :, first:last], layer.values[:, :, first:last]
        holes = 1.0 - float(self.mask.sum()) / self.mask.numel()
        if holes > max_hole_fraction:
            self.compact()

    def compact(self) -> None:
        """Right-align each row's valid columns and drop columns that are holes in all rows."""
        valid = self.mask.bool()  # (R, L)
        keep = int(valid.sum(dim=1).max())
        if _is_right_aligned(valid):
            if keep < self.length:  # only all-padding columns on the left: slice them off
                start = self.length - keep
                self.mask = self.mask[:, start:]
                for layer in _filled_layers(self.cache):
                    layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
            return
        # Stable sort on validity puts a row's holes first and its valid columns after, in order.
        order = torch.sort(valid.to(torch.int8), dim=1, stable=True).indices  # (R, L)
        self._gather_columns(order[:, self.length - keep:])  # (R, keep)

    def _gather_columns(self, cols: torch.Tensor) -> None:
        """Keep columns ``cols`` (R, L') of every row, in every layer."""
        self.mask = self.mask.gather(1, cols)
        for layer in _filled_layers(self.cache):
            idx = cols.to(layer.keys.device)[:, None, :, None]  # (R, 1, L', 1)
            layer.keys = layer.keys.gather(2, idx.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3]))
            layer.values = layer.values.gather(
                2, idx.expand(-1, layer.values.shape[1], -1, layer.values.shape[3])
            )


def _left_pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad cache tensor ``x`` (R, H, L, D) with zeros to ``length`` columns."""
    return torch.nn.functional.pad(x, (0, 0, length - x.shape[2], 0))


def _per_device(index: torch.Tensor):
    """``on(tensor)``: ``index`` on ``tensor``'s device, copied once per device."""
    copies = {index.device: index}

    def on(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device not in copies:
            copies[tensor.device] = index.to(tensor.device)
        return copies[tensor.device]

    return on


def _filled_layers(cache: DynamicCache) -> list:
    """The cache layers that hold tensors."""
    return [ly for ly in cache.layers if getattr(ly, "keys", None) is not None and ly.keys.numel()]


def _is_right_aligned(valid: torch.Tensor) -> bool:
    """True when every row's valid columns are a suffix of the row (only left padding)."""
    # A row is right-aligned when once a valid column appears, all later columns are valid.
    seen = valid.int().cummax(dim=1).values.bool()  # (R, L)
    return bool((seen == valid).all())


def right_padded(seqs: list[list[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of ``seqs`` as a right-padded block (R, T) and its mask (1 = real token)."""
    width = max(len(s) for s in seqs)
    block = torch.full((len(seqs), width), pad_id, device=device)
    mask = torch.zeros_like(block)
    for i, seq in enumerate(seqs):
        block[i, : len(seq)] = torch.tensor(seq, device=device)
        mask[i, : len(seq)] = 1
    return block, mask


def empty_rows(device: torch.device | str = "cpu", rows: int = 1) -> KVRows:
    """A fresh zero-length cache of ``rows`` rows."""
    return KVRows(DynamicCache(), torch.ones(rows, 0, dtype=torch.long, device=device))
