"""A KV cache that shares prefixes, and the attention that reads it.

A row of a search reads keys and values from four *levels*:

    level    holds                                  one slot per     shared by
    root     a prefix common to several prompts     distinct prefix  every prompt that starts with it
             (the conversation before the last user turn: a system turn)
    prompt   the rest of its prompt                 prompt           every row of the prompt
    beam     the steps its beam has accepted        beam             the beam's N candidates
    row      the tokens of its current step         candidate row    nobody

Fanning a beam out into N candidates copies nothing: each candidate gets an empty row slot and
points at the beam's slot. When a step is kept, a surviving candidate's row tokens are appended
to its beam's slot (copy-on-write: a beam with several surviving children is copied for all but
one), so the only copies are of the tokens of one step. A row that ended its step and waits for
its siblings holds its row slot only.

Why cascade attention rather than paged blocks: transformers' attention interface hands an
attention function the new queries, keys and values of one layer, and the function may read any
tensor it likes. With levels, every query of one slot is multiplied by that slot's keys in one
matmul (Hydragen, arXiv 2402.05099; FlashInfer's cascade attention), so a prompt's keys are read
once per forward however many rows share it, where a paged gather would copy them once per row.
Each level gives a partial softmax (its max and sum); partials are merged by log-sum-exp. Exact:
the same keys and values, the same softmax, summed in another order (tested against a plain
forward to 1e-5 in fp32).

A forward is a list of :class:`Item` s packed into one sequence (no padding): decode tokens,
prefill chunks, a reward head's scoring suffix. Each item writes its tokens into one slot (the
prompt level for a prefill, the row level otherwise) and reads a prefix of a slot at each other
level. The model runs as usual (its own projections, RoPE, MLPs); only attention is replaced,
through transformers' ``AttentionInterface`` (:func:`cascade_attention`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface

ROOT, PROMPT, BEAM, ROW = 0, 1, 2, 3
LEVELS = ("root", "prompt", "beam", "row")
ATTENTION = "mahalo_cascade"
SMALL_GROUP = 32  # a slot read by at most this many query tokens joins the batched call; more: its own
FIRST_BLOCK = 4  # slots of a level's first block; each next block doubles, up to CHUNK slots
CHUNK = 128  # a level grows by blocks (a new block copies nothing), and a block's columns on their own
GROW_COLUMNS = 0.5  # a block that runs out of columns grows them by half (at least MIN_SPARE)
MIN_SPARE = 32
SPARSE = 0.5  # a block whose slots read are under this fraction of its slot range reads them gathered


class _Block:
    """``size`` slots of keys and values for every layer: ``k[layer]`` (size, H_kv, L, D)."""

    def __init__(self, level: Level, size: int, columns: int) -> None:
        self.size = size
        self.k = [level.empty(i, size, columns) for i in range(level.layers)]
        self.v = [level.empty(i, size, columns) for i in range(level.layers)]

    @property
    def columns(self) -> int:
        return self.k[0].shape[2] if self.k else 0


class Level:
    """Slots of keys and values, in blocks of 4, 8, 16 ... up to ``CHUNK`` slots (a level of a few
    slots, such as the root, stays small); each block as wide (columns) as its longest slot needs.
    A new block copies nothing; a block that needs more columns copies itself only. What a slot
    holds is its owner's business (the engine knows each slot's length); slots are handed out
    lowest first, so the blocks in use stay few and full."""

    def __init__(self, devices: list[torch.device], heads: int, dim: int, dtype: torch.dtype) -> None:
        self.devices, self.heads, self.dim, self.dtype = devices, heads, dim, dtype
        self.layers = len(devices)
        self.blocks: list[_Block] = []
        self.live: list[bool] = []  # per slot: handed out
        self.where: list[tuple[int, int]] = []  # per slot: (block, index in it)

    def empty(self, layer: int, slots: int, columns: int) -> torch.Tensor:
        # zeros: a masked column's keys and values are multiplied by 0, and 0 * NaN would not be 0
        return torch.zeros(slots, self.heads, columns, self.dim, dtype=self.dtype, device=self.devices[layer])

    @property
    def slots(self) -> int:
        return len(self.live)

    @property
    def in_use(self) -> int:
        return sum(self.live)

    def block(self, slot: int) -> tuple[_Block, int]:
        """The block holding ``slot`` and its index in it."""
        b, i = self.where[slot]
        return self.blocks[b], i

    @torch.inference_mode()
    def alloc(self, columns: int = 0) -> int:
        """A free slot with room for ``columns`` columns (its old contents are not cleared:
        nothing reads past what its owner writes)."""
        slot = next((s for s, on in enumerate(self.live) if not on), None)
        if slot is None:
            slot = self.slots
            size = min(CHUNK, FIRST_BLOCK << len(self.blocks))
            self.where += [(len(self.blocks), i) for i in range(size)]
            self.blocks.append(_Block(self, size, columns))
            self.live += [False] * size
        self.live[slot] = True
        self.reserve(slot, columns)
        return slot

    def release(self, slot: int) -> None:
        self.live[slot] = False

    @torch.inference_mode()
    def reserve(self, slot: int, columns: int) -> None:
        """Room for ``columns`` columns in ``slot`` (its block grows, keeping its contents)."""
        block = self.blocks[self.where[slot][0]]
        if columns <= block.columns:
            return
        width = columns + max(MIN_SPARE, int(columns * GROW_COLUMNS))
        for store in (block.k, block.v):
            for i in range(self.layers):
                new = self.empty(i, block.size, width)
                new[:, :, :store[i].shape[2]] = store[i]
                store[i] = new

    @torch.inference_mode()
    def copy(self, dst: int, at: int, src: Level, slot: int, start: int, end: int) -> None:
        """Columns ``start:end`` of ``src``'s ``slot`` -> columns ``at..`` of ``dst`` (all layers)."""
        n = end - start
        if n <= 0:
            return
        self.reserve(dst, at + n)
        (to, i), (frm, j) = self.block(dst), src.block(slot)
        for layer in range(self.layers):
            to.k[layer][i, :, at:at + n] = frm.k[layer][j, :, start:end]
            to.v[layer][i, :, at:at + n] = frm.v[layer][j, :, start:end]


class SharedKV:
    """The four levels of a model's cache (one per model; many prompts' slots side by side).
    ``devices``: each layer's device (a model spread over GPUs keeps each layer's cache on its own)."""

    def __init__(self, devices: list[torch.device], heads: int, dim: int, dtype: torch.dtype) -> None:
        self.levels = [Level(devices, heads, dim, dtype) for _ in LEVELS]
        self.bytes_per_token = 2 * len(devices) * heads * dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def root(self) -> Level:
        return self.levels[ROOT]

    @property
    def prompt(self) -> Level:
        return self.levels[PROMPT]

    @property
    def beam(self) -> Level:
        return self.levels[BEAM]

    @property
    def row(self) -> Level:
        return self.levels[ROW]

    def allocated_bytes(self) -> int:
        """Bytes of every level's blocks (what the cache has claimed, used or not)."""
        return sum(t.numel() * t.element_size() for level in self.levels for block in level.blocks
                   for store in (block.k, block.v) for t in store)


@dataclass
class Item:
    """Tokens forwarded together as one sequence of a packed forward.

    ``write`` = (level, slot, column): where its tokens' keys and values go (they are attended by
    the item's later tokens, causally). ``reads`` = (slot, columns) per level: the prefix of a
    slot each token also attends at the levels it does not write (slot -1: none). ``start``:
    the position of its first token. ``out``: which hidden states are returned: its ``last``
    token's, ``all`` of them, or ``none``.
    """

    tokens: list[int]
    start: int
    write: tuple[int, int, int]
    reads: tuple[tuple[int, int], ...]
    out: str = "last"


@dataclass
class _Groups:
    """The query tokens that attend one level, grouped by slot (device tensors)."""

    token: torch.Tensor  # (n,) index into the packed tokens
    slot: torch.Tensor  # (n,) the slot (or, with ``index``, its position in ``index``)
    rank: torch.Tensor  # (n,) position among its slot's tokens
    limit: torch.Tensor  # (n,) columns of the slot it attends
    groups: int  # slots range 0..groups (or len(index))
    width: int  # most tokens of one slot (M)
    columns: int  # most columns attended
    index: torch.Tensor | None = None  # the slots read, when they are few: read gathered


@dataclass
class Packed:
    """Everything the attention needs about one packed forward (built on the host once per
    forward, moved to the device in one transfer)."""

    kv: SharedKV
    writes: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]  # (level, block, token, slot in block, column)
    small: list[tuple[int, int, _Groups]]  # (level, block, groups) read by one batched call
    large: list[tuple[int, int, int, torch.Tensor, torch.Tensor]]  # (level, block, slot in block, token, limit)
    outputs: torch.Tensor  # (n_out,) token indices whose hidden states are returned
    stats: dict[str, int] = field(default_factory=dict)
    extra: torch.Tensor | None = None  # the caller's integers, sent in the same transfer


class _Upload:
    """Integer lists gathered on the host and sent to the device in one transfer (pinned and
    non-blocking on a GPU): the host-to-device side of a forward is one copy."""

    def __init__(self) -> None:
        self.values: list[int] = []

    def add(self, values: list[int]) -> slice:
        start = len(self.values)
        self.values += values
        return slice(start, len(self.values))

    def send(self, device: torch.device) -> torch.Tensor:
        host = torch.tensor(self.values, dtype=torch.long)
        if device.type == "cuda":
            return host.pin_memory().to(device, non_blocking=True)
        return host.to(device)


def pack(kv: SharedKV, items: list[Item], device: torch.device, extra: list[int] | None = None
         ) -> tuple[torch.Tensor, torch.Tensor, Packed]:
    """``(input_ids (1, N), position_ids (1, N), Packed)`` of ``items`` packed into one sequence;
    ``extra`` integers ride along in the same transfer (``Packed.extra``).

    Host work is proportional to the tokens; every index the device needs goes in one transfer.
    """
    ids, pos, outputs = [], [], []
    attended = 0  # (query, key) pairs: the attention's work
    writes: dict[int, list[tuple[int, int, int]]] = {}
    reads: dict[int, dict[int, list[tuple[int, int]]]] = {lv: {} for lv in range(len(LEVELS))}  # slot -> (token, limit)
    for item in items:
        level, slot, column = item.write
        first = len(ids)
        for t, token in enumerate(item.tokens):
            tok = first + t
            ids.append(token)
            pos.append(item.start + t)
            writes.setdefault(level, []).append((tok, slot, column + t))
            reads[level].setdefault(slot, []).append((tok, column + t + 1))
            attended += column + t + 1
            for lv, (s, n) in enumerate(item.reads):
                if lv != level and s >= 0 and n > 0:
                    reads[lv].setdefault(s, []).append((tok, n))
                    attended += n
        if item.out == "last":
            outputs.append(len(ids) - 1)
        elif item.out == "all":
            outputs += list(range(first, len(ids)))
        kv.levels[level].reserve(slot, column + len(item.tokens))
    up = _Upload()
    spans = {"ids": up.add(ids), "pos": up.add(pos), "outputs": up.add(outputs), "extra": up.add(extra or [])}
    write_spans = []
    for level, rows in sorted(writes.items()):
        by_block: dict[int, list[tuple[int, int, int]]] = {}
        where = kv.levels[level].where
        for tok, slot, col in rows:
            block, index = where[slot]
            by_block.setdefault(block, []).append((tok, index, col))
        for block, members in sorted(by_block.items()):
            tok, slot, col = (list(x) for x in zip(*members))
            write_spans.append((level, block, up.add(tok), up.add(slot), up.add(col)))
    small_spans, large_spans = [], []
    read_tokens = 0
    for level, by_slot in reads.items():
        by_block: dict[int, list[tuple[int, int, int, int]]] = {}  # block -> (token, slot in block, rank, limit)
        where = kv.levels[level].where
        for slot, toks in by_slot.items():
            read_tokens += max(limit for _, limit in toks)
            block, index = where[slot]
            if len(toks) > SMALL_GROUP:
                large_spans.append((level, block, index, up.add([t for t, _ in toks]), up.add([n for _, n in toks])))
                continue
            by_block.setdefault(block, []).extend((t, index, r, n) for r, (t, n) in enumerate(toks))
        for block, members in sorted(by_block.items()):
            tok, slot, rank, limit = (list(x) for x in zip(*members))
            used = sorted(set(slot))
            index = None
            if len(used) < SPARSE * (used[-1] + 1):  # few of the block: gather them, renumbered
                at = {s: i for i, s in enumerate(used)}
                slot, index = [at[s] for s in slot], up.add(used)
            small_spans.append((level, block, up.add(tok), up.add(slot), up.add(rank), up.add(limit),
                                max(slot) + 1, max(rank) + 1, max(limit), index))
    buf = up.send(device)  # the one host-to-device copy of this forward
    stats = {"tokens": len(ids), "kv_tokens_read": read_tokens, "attended": attended}
    packed = Packed(
        kv,
        [(level, block, buf[a], buf[b], buf[c]) for level, block, a, b, c in write_spans],
        [(level, block, _Groups(buf[a], buf[b], buf[c], buf[d], groups, width, columns,
                                None if e is None else buf[e]))
         for level, block, a, b, c, d, groups, width, columns, e in small_spans],
        [(level, block, slot, buf[a], buf[b]) for level, block, slot, a, b in large_spans],
        buf[spans["outputs"]], stats, buf[spans["extra"]],
    )
    return buf[spans["ids"]][None], buf[spans["pos"]][None], packed


@torch.compiler.disable
def cascade_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Any, scaling: float | None = None, dropout: float = 0.0, **kwargs: Any):
    """transformers attention function: write the new keys and values into their slots, attend
    every level, merge by log-sum-exp. ``query`` (1, H, N, D), ``key``/``value`` (1, H_kv, N, D)
    of the packed tokens; returns (1, N, H, D)."""
    packed: Packed | None = kwargs.get("mahalo_packed")
    if packed is None:
        raise RuntimeError("cascade attention runs only inside mahalo's packed forwards (mahalo.cascade.forward)")
    layer = module.layer_idx
    levels = packed.kv.levels
    _, heads, n, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    k_new, v_new = key[0].transpose(0, 1), value[0].transpose(0, 1)  # (N, H_kv, D)
    for level, block, tok, slot, col in packed.writes:  # 1. the new tokens' keys and values, in their slots
        b = levels[level].blocks[block]
        b.k[layer][slot, :, col] = k_new[tok]
        b.v[layer][slot, :, col] = v_new[tok]
    q = query[0].transpose(0, 1).reshape(n, kv_heads, group, dim)  # (N, H_kv, G, D)
    out = torch.zeros(n, kv_heads, group, dim, dtype=torch.float32, device=query.device)
    total = torch.full((n, kv_heads, group), float("-inf"), dtype=torch.float32, device=query.device)
    partials = []  # 2. each level's normalised output and log-sum-exp, per query token
    for level, block, g in packed.small:
        b = levels[level].blocks[block]
        partials.append((g.token, *_attend_groups(q, b.k[layer], b.v[layer], g, scale)))
    for level, block, slot, tok, limit in packed.large:
        b = levels[level].blocks[block]
        partials.append((tok, *_attend_one(q[tok], b.k[layer][slot], b.v[layer][slot], limit, scale)))
    for tok, _, lse in partials:  # 3. merge: weights exp(lse_l - lse_total)
        total.index_put_((tok,), torch.logaddexp(total[tok], lse))
    for tok, o, lse in partials:
        out.index_add_(0, tok, o * torch.exp(lse - total[tok])[..., None])
    return out.reshape(n, heads, dim).to(query.dtype)[None], None


def _fused() -> Any:
    """PyTorch's fused CPU attention that also returns the log-sum-exp, if this build has it."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


_FUSED_CPU = _fused()


def _partial(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, scale: float):
    """Attention of queries ``q`` (S, H_kv, Q, D) over ``keys``/``values`` (S, H_kv, L, D) where
    ``valid`` (S, Q, L); returns (output (S, H_kv, Q, D) float32, log-sum-exp (S, H_kv, Q)
    float32). Rows with nothing valid are padding: their values are never read."""
    if q.device.type == "cpu" and _FUSED_CPU is not None:  # one fused kernel: no scores in memory
        bias = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill_(~valid, float("-inf"))
        out, lse = _FUSED_CPU(q, keys, values, 0.0, False, attn_mask=bias[:, None], scale=scale)
        return out.float(), lse.float()
    scores = (torch.matmul(q, keys.transpose(-1, -2)) * scale).float()  # (S, H_kv, Q, L)
    scores = scores.masked_fill(~valid[:, None], float("-inf"))
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.exp(scores - top)
    mass = p.sum(-1, keepdim=True)
    out = torch.matmul(p.to(values.dtype), values).float() / mass.clamp_min(1e-30)
    return out, (top + torch.log(mass))[..., 0]


def _attend_groups(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, g: _Groups, scale: float):
    """Queries of many slots, ``g.width`` at most per slot, against their slots' first
    ``g.columns`` columns, all slots in one call: (output (n, H_kv, G, D), lse (n, H_kv, G))."""
    _, kv_heads, group, dim = q.shape
    if g.index is not None:  # the few slots read, gathered
        keys, values = keys.index_select(0, g.index), values.index_select(0, g.index)
    keys, values = keys[:g.groups, :, :g.columns], values[:g.groups, :, :g.columns]
    grouped = q.new_zeros(g.groups, g.width, kv_heads, group, dim)
    grouped[g.slot, g.rank] = q[g.token]
    grouped = grouped.permute(0, 2, 1, 3, 4).reshape(g.groups, kv_heads, g.width * group, dim)  # (S, H_kv, M*G, D)
    limit = torch.zeros(g.groups, g.width, dtype=torch.long, device=q.device)
    limit[g.slot, g.rank] = g.limit
    valid = torch.arange(g.columns, device=q.device) < limit[..., None]  # (S, M, L)
    valid = valid[:, :, None].expand(-1, -1, group, -1).reshape(g.groups, g.width * group, g.columns)
    o, lse = _partial(grouped, keys, values, valid, scale)
    o = o.view(g.groups, kv_heads, g.width, group, dim)[g.slot, :, g.rank]  # (n, H_kv, G, D)
    lse = lse.view(g.groups, kv_heads, g.width, group)[g.slot, :, g.rank]
    return o, lse


def _attend_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, limit: torch.Tensor, scale: float):
    """Many queries (n, H_kv, G, D) of one slot against its keys (H_kv, L, D)."""
    n, kv_heads, group, dim = q.shape
    columns = int(limit.max())
    keys, values = keys[None, :, :columns], values[None, :, :columns]  # (1, H_kv, L, D)
    grouped = q.permute(1, 0, 2, 3).reshape(1, kv_heads, n * group, dim)  # (1, H_kv, n*G, D)
    valid = torch.arange(columns, device=q.device) < limit[:, None]  # (n, L)
    valid = valid[:, None].expand(-1, group, -1).reshape(1, n * group, columns)
    o, lse = _partial(grouped, keys, values, valid, scale)
    return o.view(kv_heads, n, group, dim).permute(1, 0, 2, 3), lse.view(kv_heads, n, group).permute(1, 0, 2)


AttentionInterface.register(ATTENTION, cascade_attention)


@contextlib.contextmanager
def attention_of(model: Any, implementation: str):
    """Run ``model`` with another attention implementation for the duration (the config's
    attribute is what every attention module reads at each call)."""
    configs = [m.config for m in model.modules() if hasattr(m, "config")]
    configs = list({id(c): c for c in configs}.values())
    saved = [c._attn_implementation_internal for c in configs]
    for c in configs:
        c._attn_implementation_internal = implementation
    try:
        yield
    finally:
        for c, old in zip(configs, saved):
            c._attn_implementation_internal = old


def unsupported(model: Any) -> str | None:
    """Why cascade attention would not compute what ``model``'s own attention computes (a
    sliding window, soft-capped logits, attention sinks), or None."""
    config = model.config
    if getattr(config, "attn_logit_softcapping", None):
        return "its attention logits are soft-capped"
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):  # its head is not a plain linear map
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"its output logits are post-processed ({name})"
    if getattr(config, "use_sliding_window", True) and getattr(config, "sliding_window", None) is not None:
        window = config.sliding_window
        if window < getattr(config, "max_position_embeddings", 0):
            return f"it attends a sliding window of {window} tokens"
    for m in model.modules():
        if hasattr(m, "sinks") or getattr(m, "is_causal", True) is False:
            return "its attention is not plain causal attention"
    return None
