"""KV block bookkeeping for the two pools of kv_layout.py (no torch: ids and refcounts only).

Who owns a block:
  - a sequence, through its `SeqBlocks` tables, from allocation until it finishes, is aborted or
    preempted (then `free`);
  - a *staged* entry (a finished prefill waiting for its KV to be read), from `stage` until
    `release_staged`: the engine never frees a staged block on its own;
  - a *reservation* (blocks for an incoming KV hand-off), from `reserve` until `adopt` moves it
    to a sequence or `free_reservation` gives it back.
Each owner holds one reference. A block whose refcount drops to 0 goes to the free list; if its
KV was hashed for prefix caching it stays findable there until it is handed out again (LRU).

Sliding-window blocks: a query at position p reads keys p-window+1..p, so once every future query
starts at or after `next_pos`, logical blocks wholly before next_pos-window+1 are never read again
and are freed (their table entry becomes -1). Full-attention blocks are kept for the whole sequence.

Every sequence holding blocks also has a row in `BlockTables`, a numpy mirror of its SeqBlocks
lists that this module writes through on every change: a step's [B, width] block tables are then
one numpy gather (model_runner.py) instead of B Python lists padded and converted each step.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np


class NoKVCapacity(RuntimeError):
    """Not enough free KV blocks right now (retry later or elsewhere)."""


@dataclass
class StagedKV:
    """Blocks pinned under a handle: a staged prefill or a reservation for a hand-off.

    full_block_ids cover logical blocks 0..ceil(num_tokens/bs)-1; swa_block_ids cover logical blocks
    swa_first_logical_block.. of the same range (earlier ones fell out of the window)."""
    handle: int
    num_tokens: int
    full_block_ids: list[int]
    swa_block_ids: list[int]
    swa_first_logical_block: int


@dataclass
class SeqBlocks:
    """A sequence's physical blocks per logical block (-1 = none) and its prefix-hash progress."""
    full: list[int] = field(default_factory=list)
    swa: list[int] = field(default_factory=list)
    num_hashed: int = 0            # leading full blocks whose KV is written and hashed
    last_hash: int | None = None   # chained hash of block num_hashed-1
    num_swa_released: int = 0      # leading swa entries known to be -1 (commit resumes from here)
    row: int = -1                  # its row in BlockManager.tables while it holds blocks, else -1


class BlockTables:
    """Block ids per logical block, one row per sequence holding blocks, -1 past its last block.

    Both arrays grow (rows and columns) on demand; a released row is reset to -1 before reuse."""

    def __init__(self, num_rows: int = 64, num_cols: int = 64) -> None:
        self.full = np.full((num_rows, num_cols), -1, dtype=np.int32)
        self.swa = np.full((num_rows, num_cols), -1, dtype=np.int32)
        self._free_rows = list(range(num_rows - 1, -1, -1))

    def _grow(self, num_rows: int, num_cols: int) -> None:
        rows, cols = self.full.shape
        new_rows, new_cols = max(rows, num_rows), max(cols, num_cols)
        for name in ("full", "swa"):
            old = getattr(self, name)
            grown = np.full((new_rows, new_cols), -1, dtype=np.int32)
            grown[:rows, :cols] = old
            setattr(self, name, grown)
        self._free_rows[:0] = range(new_rows - 1, rows - 1, -1)

    def acquire(self) -> int:
        if not self._free_rows:
            self._grow(2 * self.full.shape[0], 0)
        return self._free_rows.pop()

    def write(self, blocks: SeqBlocks, start: int) -> None:
        """Mirror blocks.full/swa[start:] into its row (taking a row if it has none)."""
        if blocks.row < 0:
            blocks.row = self.acquire()
        end = len(blocks.full)
        if end > self.full.shape[1]:
            self._grow(0, max(end, 2 * self.full.shape[1]))
        self.full[blocks.row, start:end] = blocks.full[start:]
        self.swa[blocks.row, start:end] = blocks.swa[start:]

    def release(self, blocks: SeqBlocks) -> None:
        """Before its lists are emptied: give its row back, reset to -1."""
        if blocks.row >= 0:
            n = len(blocks.full)
            self.full[blocks.row, :n] = -1
            self.swa[blocks.row, :n] = -1
            self._free_rows.append(blocks.row)
            blocks.row = -1


@dataclass(frozen=True)
class BlockCounts:
    num_free_full: int
    num_total_full: int
    num_free_swa: int
    num_total_swa: int
    num_staged: int
    num_reserved: int


class _Pool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        # Free blocks in LRU order: the front is handed out first.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hash_of: list[int | None] = [None] * num_blocks
        self.tokens_of: list[tuple[int, ...] | None] = [None] * num_blocks
        self.by_hash: dict[int, int] = {}

    def allocate(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.hash_of[block]
        if h is not None:  # evict: its old KV is about to be overwritten
            del self.by_hash[h]
            self.hash_of[block] = self.tokens_of[block] = None
        self.refs[block] = 1
        return block

    def take(self, block: int) -> None:
        """Another reference (a prefix-cache hit may revive a free block)."""
        if self.refs[block] == 0:
            del self.free[block]
        self.refs[block] += 1

    def release(self, block: int) -> None:
        if self.refs[block] <= 0:
            raise RuntimeError(f"block {block} released more often than taken")
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free[block] = None

    def register(self, block: int, h: int, tokens: tuple[int, ...]) -> None:
        if h in self.by_hash or self.hash_of[block] is not None:
            return  # an equal block is already findable (or this one is)
        self.hash_of[block], self.tokens_of[block] = h, tokens
        self.by_hash[h] = block

    def lookup(self, h: int, tokens: tuple[int, ...]) -> int | None:
        block = self.by_hash.get(h)
        # Tokens are compared too: a hash collision must never serve another prompt's KV.
        return block if block is not None and self.tokens_of[block] == tokens else None


class BlockManager:
    def __init__(self, num_full_blocks: int, num_swa_blocks: int, block_size: int,
                 sliding_window: int | None, enable_prefix_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.window = sliding_window  # None: the model has no sliding layers, the swa pool is unused
        self.enable_prefix_caching = enable_prefix_caching
        self.full = _Pool(num_full_blocks)
        self.swa = _Pool(num_swa_blocks if sliding_window else 0)
        self._handles = itertools.count(1)
        self._staged: dict[int, StagedKV] = {}
        self._reserved: dict[int, StagedKV] = {}
        self.tables = BlockTables()

    # ---- geometry ------------------------------------------------------------------------------
    def num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def swa_first_needed(self, next_pos: int) -> int:
        """First logical block any query at position >= next_pos still reads in sliding layers."""
        if self.window is None:
            return self.num_blocks(next_pos)
        return max(0, next_pos - self.window + 1) // self.block_size

    def max_swa_chunk(self) -> int | None:
        """Most tokens one step may compute for a sequence so that its sliding blocks (the window
        before the chunk plus the chunk) fit in the whole sliding pool; None: no limit."""
        if self.window is None:
            return None
        return max(0, (self.swa.num_blocks - 1) * self.block_size - self.window + 1)

    def blocks_for_prompt(self, num_tokens: int) -> tuple[int, int]:
        """(full, swa) blocks that hold num_tokens of KV with the window of the next query."""
        total = self.num_blocks(num_tokens)
        return total, total - min(total, self.swa_first_needed(num_tokens))

    # ---- running sequences ---------------------------------------------------------------------
    def _needed(self, blocks: SeqBlocks, num_computed: int, num_new: int) -> tuple[int, int]:
        total = self.num_blocks(num_computed + num_new)
        n_full = max(0, total - len(blocks.full))
        n_swa = 0 if self.window is None else max(0, total - max(len(blocks.swa), self.swa_first_needed(num_computed)))
        return n_full, n_swa

    def can_append(self, blocks: SeqBlocks, num_computed: int, num_new: int) -> bool:
        if self.num_blocks(num_computed + num_new) <= len(blocks.full):
            return True  # most decode steps: the last block has room (swa entries exist as far as full ones)
        n_full, n_swa = self._needed(blocks, num_computed, num_new)
        return n_full <= len(self.full.free) and n_swa <= len(self.swa.free)

    def append(self, blocks: SeqBlocks, num_computed: int, num_new: int) -> None:
        """Blocks for positions num_computed .. num_computed+num_new-1 (check can_append first)."""
        total = self.num_blocks(num_computed + num_new)
        start = len(blocks.full)
        if start >= total:
            return
        if not self.can_append(blocks, num_computed, num_new):
            raise NoKVCapacity(f"no free blocks for {num_new} more tokens")
        first = self.swa_first_needed(num_computed)
        while len(blocks.full) < total:
            blocks.full.append(self.full.allocate())
        while len(blocks.swa) < total:
            j = len(blocks.swa)
            blocks.swa.append(self.swa.allocate() if self.window is not None and j >= first else -1)
        self.tables.write(blocks, start)

    def commit(self, blocks: SeqBlocks, token_ids: list[int], num_computed: int) -> None:
        """After a step wrote KV for positions < num_computed: hash the newly full blocks (only now,
        since their KV exists), then free the sliding blocks no future query reads."""
        bs = self.block_size
        if self.enable_prefix_caching:
            for j in range(blocks.num_hashed, num_computed // bs):
                tokens = tuple(token_ids[j * bs:(j + 1) * bs])
                h = hash((blocks.last_hash, tokens))
                self.full.register(blocks.full[j], h, tokens)
                if blocks.swa[j] >= 0:
                    self.swa.register(blocks.swa[j], h, tokens)
                blocks.num_hashed, blocks.last_hash = j + 1, h
        stop = min(self.swa_first_needed(num_computed), len(blocks.swa))
        for j in range(blocks.num_swa_released, stop):
            if blocks.swa[j] >= 0:
                self.swa.release(blocks.swa[j])
                blocks.swa[j] = -1
                self.tables.swa[blocks.row, j] = -1
        blocks.num_swa_released = max(blocks.num_swa_released, stop)

    def match_prefix(self, blocks: SeqBlocks, token_ids: list[int]) -> int:
        """Take cached blocks for the longest usable prefix of token_ids; returns the cached token count.

        At least one token is left to compute (its logits give the next token). A hit of k blocks is
        usable only if the sliding blocks that the query at position k*bs reads are cached too."""
        if blocks.full or not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        hashes: list[int] = []
        full_hits: list[int] = []
        h: int | None = None
        for j in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[j * bs:(j + 1) * bs])
            h = hash((h, tokens))
            block = self.full.lookup(h, tokens)
            if block is None:
                break
            hashes.append(h)
            full_hits.append(block)
        for k in range(len(full_hits), 0, -1):
            first = min(k, self.swa_first_needed(k * bs))
            swa_hits = [self.swa.lookup(hashes[j], tuple(token_ids[j * bs:(j + 1) * bs])) for j in range(first, k)]
            if self.window is not None and any(b is None for b in swa_hits):
                continue
            for block in full_hits[:k]:
                self.full.take(block)
            blocks.full = full_hits[:k]
            blocks.swa = [-1] * k
            if self.window is not None:
                for j, block in zip(range(first, k), swa_hits):
                    self.swa.take(block)
                    blocks.swa[j] = block
            blocks.num_hashed, blocks.last_hash = k, hashes[k - 1]
            self.tables.write(blocks, 0)
            return k * bs
        return 0

    def free(self, blocks: SeqBlocks) -> None:
        for block in blocks.full:
            self.full.release(block)
        for block in blocks.swa:
            if block >= 0:
                self.swa.release(block)
        self._clear(blocks)

    def _clear(self, blocks: SeqBlocks) -> None:
        """The sequence holds nothing any more (its references were released or moved)."""
        self.tables.release(blocks)
        blocks.full, blocks.swa, blocks.num_hashed, blocks.last_hash = [], [], 0, None
        blocks.num_swa_released = 0

    # ---- staging (prefill side) ------------------------------------------------------------------
    def stage(self, blocks: SeqBlocks, num_tokens: int) -> StagedKV:
        """Move a sequence's blocks (KV of positions < num_tokens) to a pinned staged entry."""
        total = self.num_blocks(num_tokens)
        first = min(total, self.swa_first_needed(num_tokens))
        if len(blocks.full) != total:
            raise ValueError(f"sequence holds {len(blocks.full)} full blocks, {num_tokens} tokens need {total}")
        swa_ids = blocks.swa[first:total] if self.window is not None else []
        if any(b < 0 for b in swa_ids):
            raise ValueError("a sliding block the window needs is missing")
        staged = StagedKV(next(self._handles), num_tokens, list(blocks.full), list(swa_ids), first)
        self._staged[staged.handle] = staged
        # The references move from the sequence to the staged entry: no refcount changes.
        self._clear(blocks)
        return staged

    def release_staged(self, handle: int) -> bool:
        staged = self._staged.pop(handle, None)
        if staged is None:
            return False
        self._release_entry(staged)
        return True

    # ---- reservations (decode side) ------------------------------------------------------------
    def reserve(self, num_tokens: int) -> StagedKV:
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        n_full, n_swa = self.blocks_for_prompt(num_tokens)
        if n_full > len(self.full.free) or n_swa > len(self.swa.free):
            raise NoKVCapacity(f"{num_tokens} tokens need {n_full} full + {n_swa} sliding KV blocks; "
                               f"{len(self.full.free)} + {len(self.swa.free)} are free")
        total = self.num_blocks(num_tokens)
        r = StagedKV(next(self._handles), num_tokens, [self.full.allocate() for _ in range(n_full)],
                     [self.swa.allocate() for _ in range(n_swa)], total - n_swa)
        self._reserved[r.handle] = r
        return r

    def free_reservation(self, handle: int) -> bool:
        r = self._reserved.pop(handle, None)
        if r is None:
            return False
        self._release_entry(r)
        return True

    def adopt(self, blocks: SeqBlocks, handle: int) -> StagedKV:
        """Ownership of a reservation's blocks moves to the sequence (no refcount changes)."""
        r = self._reserved.pop(handle, None)
        if r is None:
            raise KeyError(f"no reservation {handle} (freed or adopted already)")
        if blocks.full:
            raise ValueError("adopting into a sequence that already holds blocks")
        blocks.full = list(r.full_block_ids)
        blocks.swa = [-1] * r.swa_first_logical_block + list(r.swa_block_ids)
        if self.window is None:
            blocks.swa = [-1] * len(blocks.full)
        self.tables.write(blocks, 0)
        return r

    def _release_entry(self, entry: StagedKV) -> None:
        for block in entry.full_block_ids:
            self.full.release(block)
        for block in entry.swa_block_ids:
            self.swa.release(block)

    def counts(self) -> BlockCounts:
        return BlockCounts(len(self.full.free), self.full.num_blocks, len(self.swa.free), self.swa.num_blocks,
                           len(self._staged), len(self._reserved))
