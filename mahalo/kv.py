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

Appending is in place: each layer keeps its keys and values as the first L columns of a buffer
with spare columns (:class:`GrowingLayer`), so a decode step writes one column instead of copying
the whole cache, as ``torch.cat`` does in transformers' ``DynamicLayer``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Spare columns a layer's buffer gets when it grows: a quarter of its length, at least 16. A
# decode step then copies the cache once per L/4 tokens instead of once per token; the cost is up
# to 25% more cache memory.
SPARE_FRACTION = 0.25
MIN_SPARE = 16


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends in place and gathers rows into reused memory.

    ``keys`` / ``values`` (R, H, L, D) are views of the first L columns of buffers
    (R, H, capacity, D). :meth:`update` writes new columns into the spare ones and returns longer
    views; :meth:`gather` writes selected rows into another buffer. Anything else assigned to
    ``keys`` / ``values`` drops the buffer; a crop (a shorter view of the same buffer) keeps it,
    and the next append overwrites the cropped columns.

    On a CPU a buffer that is replaced is kept, flat, for the next one that fits: a fresh
    allocation of a large tensor costs a page fault per 4 KiB, which made a row gather about ten
    times slower than the copy itself. The price is that a layer holds up to twice its largest
    cache (GPU allocators already reuse freed memory, so there nothing is kept).
    """

    _kbuf: torch.Tensor | None = None  # (R, H, capacity, D), contiguous
    _vbuf: torch.Tensor | None = None
    _k: torch.Tensor | None = None  # (R, H, L, D), a prefix view of _kbuf
    _v: torch.Tensor | None = None
    _kspare: torch.Tensor | None = None  # flat memory to reuse (CPU only)
    _vspare: torch.Tensor | None = None

    @property
    def keys(self) -> torch.Tensor | None:
        return self._k

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._k = tensor
        self._kbuf, self._kspare = _reassigned(tensor, self._kbuf, self._kspare)

    @property
    def values(self) -> torch.Tensor | None:
        return self._v

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._v = tensor
        self._vbuf, self._vspare = _reassigned(tensor, self._vbuf, self._vspare)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._k is None or self._k.numel() == 0:  # first append: nothing to keep
            self._k, self._v = key_states[:, :, :0], value_states[:, :, :0]
        self._k, self._kbuf, self._kspare = _append(self._k, self._kbuf, self._kspare, key_states)
        self._v, self._vbuf, self._vspare = _append(self._v, self._vbuf, self._vspare, value_states)
        return self._k, self._v

    def gather(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (R',) (repeats allowed), written into reused memory."""
        self._k, self._kbuf, self._kspare = _gather(self._k, self._kbuf, self._kspare, index)
        self._v, self._vbuf, self._vspare = _gather(self._v, self._vbuf, self._vspare, index)

    def place(self, sources: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], rows: int, length: int) -> None:
        """Become ``rows`` rows of ``length`` columns: each ``(keys, values, positions)`` source's
        rows at its positions, left-padded with zeros (holes); written into reused memory."""
        self._k, self._kbuf, self._kspare = _place([(k, p) for k, _, p in sources], self._kbuf, self._kspare,
                                                  rows, length)
        self._v, self._vbuf, self._vspare = _place([(v, p) for _, v, p in sources], self._vbuf, self._vspare,
                                                  rows, length)


def _is_prefix(view: torch.Tensor | None, buf: torch.Tensor) -> bool:
    """True when ``view`` is ``buf[:, :, :L]`` for some L."""
    return (
        view is not None
        and view.dim() == 4
        and view.data_ptr() == buf.data_ptr()
        and view.shape[:2] == buf.shape[:2]
        and view.shape[3] == buf.shape[3]
        and view.shape[2] <= buf.shape[2]
        and view.stride() == buf.stride()
    )


def _reassigned(tensor: torch.Tensor | None, buf: torch.Tensor | None,
                spare: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(buffer, spare memory)`` once ``tensor`` is assigned as a layer's keys or values: a prefix
    view of ``buf`` keeps it; anything else drops it, and it becomes spare memory unless
    ``tensor`` still views it (a slice of the buffer keeps it alive)."""
    if buf is None or _is_prefix(tensor, buf):
        return buf, spare
    return None, (spare if _shares_memory(tensor, buf) else _spare(buf, spare))


def _shares_memory(tensor: torch.Tensor | None, buf: torch.Tensor) -> bool:
    return tensor is not None and tensor.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()


def _spare(old: torch.Tensor, spare: torch.Tensor | None) -> torch.Tensor | None:
    """The flat memory to keep for reuse once buffer ``old`` is replaced: on a CPU the larger of the
    two, elsewhere none."""
    if old.device.type != "cpu":
        return None
    flat = old.view(-1)
    return flat if spare is None or flat.numel() >= spare.numel() else spare


def _buffer(like: torch.Tensor, rows: int, columns: int, old: torch.Tensor | None,
            spare: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A buffer (rows, H, capacity >= columns, D) shaped like ``like`` (R, H, L, D) to replace
    buffer ``old``: carved from ``spare`` when it fits, else newly allocated with room to append
    (``SPARE_FRACTION``, at least ``MIN_SPARE`` columns). ``old`` becomes spare memory (it is
    only written again by a later call). Returns ``(buffer, spare memory)``."""
    heads, dim = like.shape[1], like.shape[3]
    per_column = rows * heads * dim
    if spare is not None and spare.dtype == like.dtype and spare.device == like.device and per_column > 0 \
            and spare.numel() >= per_column * columns:
        capacity = spare.numel() // per_column
        out, spare = spare[: per_column * capacity].view(rows, heads, capacity, dim), None
    else:
        out = like.new_empty(rows, heads, columns + max(MIN_SPARE, int(columns * SPARE_FRACTION)), dim)
    return out, (spare if old is None else _spare(old, spare))


@torch.inference_mode()  # the buffers are inference tensors (a forward made them)
def _append(view: torch.Tensor, buf: torch.Tensor | None, spare: torch.Tensor | None,
            new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``cat([view, new], dim=2)`` (R, H, L+T, D) as a view of a buffer with spare columns: ``buf``
    when ``view`` is its prefix and the new columns fit, else another, larger one.
    Returns ``(view, buffer, spare memory)``."""
    length, add = view.shape[2], new.shape[2]
    if buf is None or not _is_prefix(view, buf) or length + add > buf.shape[2]:
        grown, spare = _buffer(new, new.shape[0], length + add, buf, spare)
        grown[:, :, :length] = view
        buf = grown
    buf[:, :, length:length + add] = new
    return buf[:, :, :length + add], buf, spare


@torch.inference_mode()
def _gather(view: torch.Tensor, buf: torch.Tensor | None, spare: torch.Tensor | None,
            index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Rows ``index`` of ``view`` (R', H, L, D) in a buffer with room to append.
    Returns ``(view, buffer, spare memory)``."""
    length = view.shape[2]
    out, spare = _buffer(view, index.numel(), length, buf, spare)
    if out.device.type == "cpu":  # straight into the buffer's first columns
        torch.index_select(view, 0, index, out=out[:, :, :length])
    else:  # (an ``out=`` view with spare columns is only relied on where it is tested)
        out[:, :, :length] = view.index_select(0, index)
    return out[:, :, :length], out, spare


@torch.inference_mode()
def _place(sources: list[tuple[torch.Tensor, torch.Tensor]], buf: torch.Tensor | None, spare: torch.Tensor | None,
           rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Rows of every ``(tensor (R_i, H, L_i, D), positions (R_i,))`` source at its positions of a
    (rows, H, length, D) view, left-padded with zeros. Returns ``(view, buffer, spare memory)``."""
    out, spare = _buffer(sources[0][0], rows, length, buf, spare)
    for tensor, positions in sources:
        positions = positions.to(device=out.device, dtype=torch.long)
        pad = length - tensor.shape[2]
        if pad:
            out[:, :, :pad].index_fill_(0, positions, 0)
        out[:, :, pad:length].index_copy_(0, positions, tensor)
    return out[:, :, :length], out, spare


def new_cache() -> DynamicCache:
    """An empty cache whose layers append in place (:class:`GrowingLayer`)."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    return cache


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
            if isinstance(layer, GrowingLayer):
                layer.gather(on(layer.keys))
            else:
                layer.keys, layer.values = layer.keys[on(layer.keys)], layer.values[on(layer.values)]
        self.mask = self.mask[index]

    def place(self, at: torch.Tensor, others: list[tuple[KVRows, torch.Tensor]]) -> None:
        """Merge rows back in one copy: these rows go to positions ``at`` (R,) and each
        ``(rows, positions)`` of ``others`` to its positions; the positions of all parts together
        are 0..R_total-1. A shorter cache is left-padded with holes."""
        parts = [(self, at)] + list(others)
        total = sum(len(p) for _, p in parts)
        length = max(kv.length for kv, _ in parts)
        mask = self.mask.new_zeros(total, length)
        for kv, pos in parts:
            mask[pos.to(mask.device), length - kv.length:] = kv.mask
        layers = [_filled_layers(kv.cache) for kv, _ in parts]
        if not all(isinstance(ly, GrowingLayer) for part in layers for ly in part) or \
                len({len(part) for part in layers}) != 1:  # other caches: append, then reorder
            order = torch.cat([p.to(torch.long) for _, p in parts])
            for kv, _ in parts[1:]:
                self.cat(kv)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(len(order))
            self.select(inverse)
            return
        for mine, *theirs in zip(*layers):
            sources = [(ly.keys, ly.values, pos) for ly, (_, pos) in zip([mine, *theirs], parts)]
            mine.place(sources, total, length)
        self.mask = mask

    def take(self, index: torch.Tensor) -> KVRows:
        """A new :class:`KVRows` holding copies of rows ``index``; these rows are unchanged."""
        index = index.to(self.mask.device)
        on = _per_device(index)
        cache = new_cache()
        for i, layer in enumerate(_filled_layers(self.cache)):
            cache.update(layer.keys[on(layer.keys)], layer.values[on(layer.values)], i)
        return KVRows(cache, self.mask[index])

    @staticmethod
    def concat(parts: list[KVRows]) -> KVRows:
        """A new batch of the rows of ``parts``, in order, each part left-padded with holes to
        the longest; written into new memory, so the parts stay as they were."""
        length = max(p.length for p in parts)
        total = sum(p.rows for p in parts)
        mask = parts[0].mask.new_zeros(total, length)
        positions, offset = [], 0
        for p in parts:
            mask[offset:offset + p.rows, length - p.length:] = p.mask
            positions.append(torch.arange(offset, offset + p.rows))
            offset += p.rows
        layers = [_filled_layers(p.cache) for p in parts]
        if len({len(part) for part in layers}) != 1:
            raise ValueError("cannot concatenate caches with different numbers of layers")
        cache = new_cache()
        for group in zip(*layers):
            layer = GrowingLayer()
            layer.lazy_initialization(group[0].keys, group[0].values)
            layer.place([(ly.keys, ly.values, pos) for ly, pos in zip(group, positions)], total, length)
            cache.layers.append(layer)
        return KVRows(cache, mask)

    def split(self, sizes: list[int]) -> list[KVRows]:
        """These rows cut into consecutive groups of ``sizes`` rows, each a new batch (copies)."""
        out, start = [], 0
        for n in sizes:
            part = self.take(torch.arange(start, start + n, device=self.mask.device))
            part.tidy()
            out.append(part)
            start += n
        return out

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
    return KVRows(new_cache(), torch.ones(rows, 0, dtype=torch.long, device=device))
