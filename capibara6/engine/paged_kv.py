"""Paged KV cache for many sequences: fixed-size blocks, a block table per sequence, shared prefixes.

Storage: the layers are grouped by attention window (group 0: full attention; one group per
sliding window, Gemma 3's 5-of-6 layers). Each group has its own `BlockPool` and, per layer,
one array of `n_blocks` blocks of `block` rows: FP8 E4M3 bytes + an fp32 scale per row and KV
head (`kv_cache: fp8`), or fp16 / fp32 rows. A sequence owns one block table per group: entry b
is the block holding its positions b*block .. b*block+block-1. Attention reads the blocks in
place through the tables (`ops.attention_paged`); no sequence's K/V is ever gathered or copied
to be read.

Invariants:
- A block is referenced by every table that lists it (`BlockPool.ref`); it returns to the free
  list when the last reference goes (a sequence truncated, cancelled or forked over).
- Writes only append: a sequence stores positions `length ..` and nothing before. A block with
  more than one reference is copied before the first write into it (copy on write), so a shared
  prefix is read-only for every sharer.
- Sliding-window groups keep per sequence only what a query can still see: after each step,
  blocks whose every position is older than `length - window + 1` are released (entry -1). So a
  sequence holds at most window + block + chunk rows in such a layer, its ring, however long the
  context. `reusable(seq, n)` says whether a prefix of n positions can still be continued (the
  next query at position n must see n - window + 1 ..).
- FP8 keys are stored minus a per-layer mean key (see kv_cache.py: exact under softmax), one per
  sequence, fixed by its first chunk and inherited by a fork with the shared blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

from .kv_cache import KV_DTYPES, kv_bytes_per_token


class KVExhausted(RuntimeError):
    """No free block: the scheduler preempts (its accounting leaves one block of slack per sequence)."""


class BlockPool:
    """Reference-counted block ids 0..n-1; allocation takes the lowest-numbered free block first."""

    def __init__(self, n_blocks: int) -> None:
        self.n_blocks = n_blocks
        self.ref = np.zeros(n_blocks, dtype=np.int32)
        self._free = list(range(n_blocks - 1, -1, -1))  # a stack: pop() gives the lowest id

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def n_used(self) -> int:
        return self.n_blocks - len(self._free)

    def alloc(self) -> int:
        if not self._free:
            raise KVExhausted(f"all {self.n_blocks} KV blocks are in use")
        b = self._free.pop()
        self.ref[b] = 1
        return b

    def incref(self, b: int) -> None:
        if self.ref[b] <= 0:
            raise ValueError(f"block {b} is free")
        self.ref[b] += 1

    def decref(self, b: int) -> None:
        if self.ref[b] <= 0:
            raise ValueError(f"block {b} is already free")
        self.ref[b] -= 1
        if self.ref[b] == 0:
            self._free.append(b)


@dataclass
class _Group:
    window: int  # 0: full attention
    layers: tuple[int, ...]
    pool: BlockPool
    k: list[np.ndarray]  # per layer of the group: [n_blocks, block, Hkv, Dk]
    v: list[np.ndarray]
    k_scale: list[np.ndarray]  # fp8: [n_blocks, block, Hkv]; else empty
    v_scale: list[np.ndarray]


@dataclass
class _Seq:
    length: int = 0  # positions held
    tables: list[list[int]] = field(default_factory=list)  # per group: block ids (-1: released)
    shift: list[np.ndarray | None] = field(default_factory=list)  # per layer: FP8 key shift (set by the first store)


@dataclass(frozen=True)
class Segment:
    """One sequence's rows in a batch: rows start..start+count-1 of the batch, at positions pos.."""

    seq: int
    start: int
    count: int
    pos: int


class PagedKV:
    def __init__(
        self,
        ops: ModuleType,
        *,
        n_layer: int,
        n_head_kv: int,
        head_dim_k: int,
        head_dim_v: int,
        dtype: str,
        windows: tuple[int, ...],
        n_seq: int,
        n_cells: int,
        block: int = 16,
        max_chunk: int = 256,
    ) -> None:
        """n_cells: positions the full-attention layers may hold in all (shared by the sequences,
        as llama.cpp's unified cache); the pools get one block per sequence more (a partial last
        block each) so that the scheduler's per-token accounting can never run a pool dry.
        Sliding-window groups get per sequence what its ring needs: window + max_chunk + 2 blocks."""
        if dtype not in KV_DTYPES:
            raise ValueError(f"kv_cache must be one of {KV_DTYPES}, not {dtype!r}")
        self.ops = ops
        self.dtype = dtype
        self.block = block
        self.n_layer = n_layer
        self.n_head_kv, self.head_dim_k, self.head_dim_v = n_head_kv, head_dim_k, head_dim_v
        wins = tuple(windows) or (0,) * n_layer
        full_blocks = -(-n_cells // block) + n_seq + 1
        self.groups: list[_Group] = []
        self.group_of: list[int] = [0] * n_layer  # layer -> group index
        self.slot_of: list[int] = [0] * n_layer  # layer -> index inside its group
        for w in sorted(set(wins)):
            layers = tuple(i for i, x in enumerate(wins) if x == w)
            ring = n_seq * (-(-(w + max_chunk) // block) + 2) + 1  # blocks all the rings need
            g = self._alloc_group(w, layers, min(full_blocks, ring) if w > 0 else full_blocks)
            for j, il in enumerate(layers):
                self.group_of[il], self.slot_of[il] = len(self.groups), j
            self.groups.append(g)
        self.seqs = [_Seq(0, [[] for _ in self.groups], [None] * n_layer) for _ in range(n_seq)]
        self._batch: list[Segment] = []
        self._rows: list[np.ndarray] = []  # per group: flat pool row of every batch row
        self._tables: list[np.ndarray] = []  # per group: [n_seg, max_blocks] int32
        self._q_start = np.zeros(1, np.int64)
        self._n_past = np.zeros(0, np.int64)

    def _alloc_group(self, window: int, layers: tuple[int, ...], n_blocks: int) -> _Group:
        h, dk, dv, b = self.n_head_kv, self.head_dim_k, self.head_dim_v, self.block
        n = len(layers)
        # np.zeros everywhere: pages are not resident until a block is first written, and a row is
        # read only once its position is stored
        if self.dtype == "fp8":
            return _Group(window, layers, BlockPool(n_blocks),
                          [np.zeros((n_blocks, b, h, dk), np.uint8) for _ in range(n)],
                          [np.zeros((n_blocks, b, h, dv), np.uint8) for _ in range(n)],
                          [np.zeros((n_blocks, b, h), np.float32) for _ in range(n)],
                          [np.zeros((n_blocks, b, h), np.float32) for _ in range(n)])
        dt = np.float32 if self.dtype == "fp32" else np.float16
        return _Group(window, layers, BlockPool(n_blocks),
                      [np.zeros((n_blocks, b, h, dk), dt) for _ in range(n)],
                      [np.zeros((n_blocks, b, h, dv), dt) for _ in range(n)], [], [])

    # -- sequences -----------------------------------------------------------------------------

    def length(self, seq: int) -> int:
        return self.seqs[seq].length

    def truncate(self, seq: int, n: int) -> None:
        """Keep positions < n of `seq` (n = 0: drop it all); blocks no table lists any more are freed."""
        s = self.seqs[seq]
        n = min(n, s.length)
        keep = -(-n // self.block)
        for g, table in zip(self.groups, s.tables):
            for b in table[keep:]:
                if b >= 0:
                    g.pool.decref(b)
            del table[keep:]
        s.length = n
        if n == 0:
            s.shift = [None] * self.n_layer

    def fork(self, src: int, dst: int, n: int) -> None:
        """`dst` := the first n positions of `src`, sharing its blocks (copied on a later write)."""
        if src == dst:
            self.truncate(dst, n)
            return
        self.truncate(dst, 0)
        s, d = self.seqs[src], self.seqs[dst]
        n = min(n, s.length)
        keep = -(-n // self.block)
        for g, st, dt in zip(self.groups, s.tables, d.tables):
            for b in st[:keep]:
                if b >= 0:
                    g.pool.incref(b)
                dt.append(b)
        d.length = n
        d.shift = list(s.shift) if n else [None] * self.n_layer

    def shifts(self, seq: int) -> list[np.ndarray | None]:
        """The sequence's FP8 key shift per layer (None: not fixed yet)."""
        return list(self.seqs[seq].shift)

    def set_shifts(self, seq: int, shifts: list[np.ndarray | None]) -> None:
        """Fix an empty sequence's shifts before its first store (a recompute after preemption)."""
        s = self.seqs[seq]
        if s.length:
            raise ValueError(f"sequence {seq} already holds {s.length} positions")
        s.shift = list(shifts)

    def reusable(self, seq: int, n: int) -> bool:
        """Whether `seq`'s first n positions can be continued: every sliding-window group still
        holds the positions n - window + 1 .. n - 1 the next query sees."""
        s = self.seqs[seq]
        if n > s.length:
            return False
        for g, table in zip(self.groups, s.tables):
            if g.window <= 0 or n == 0:
                continue
            first = max(0, n - g.window + 1) // self.block
            if any(b < 0 for b in table[first : -(-n // self.block)]):
                return False
        return True

    def _release_old(self, s: _Seq) -> None:
        for g, table in zip(self.groups, s.tables):
            if g.window <= 0:
                continue
            oldest = max(0, s.length - g.window + 1)  # the next query sees positions >= oldest
            for i in range(min(len(table), oldest // self.block)):
                if table[i] >= 0:
                    g.pool.decref(table[i])
                    table[i] = -1

    # -- one batch -----------------------------------------------------------------------------

    def begin(self, segments: list[Segment]) -> None:
        """Make room for a batch (each segment appends `count` positions to its sequence, at
        pos == its length), copying shared blocks about to be written; raises KVExhausted with
        nothing changed but the blocks already made writable (they stay owned by their sequence)."""
        bs = self.block
        self._batch = segments  # set first: `abandon` frees what a failed begin appended
        for sg in segments:
            s = self.seqs[sg.seq]
            if sg.pos != s.length:
                raise ValueError(f"sequence {sg.seq} holds {s.length} positions; a batch writes at {sg.pos}")
            for gi, (g, table) in enumerate(zip(self.groups, s.tables)):
                for bi in range(sg.pos // bs, (sg.pos + sg.count - 1) // bs + 1):
                    if bi == len(table):
                        table.append(g.pool.alloc())
                    elif table[bi] < 0:
                        raise AssertionError("a released block is never written")
                    elif g.pool.ref[table[bi]] > 1:
                        table[bi] = self._copy_block(gi, table[bi])
        self._q_start = np.zeros(len(segments) + 1, np.int64)
        self._q_start[1:] = np.cumsum([sg.count for sg in segments])
        self._n_past = np.array([sg.pos for sg in segments], np.int64)
        self._rows, self._tables = [], []
        for gi in range(len(self.groups)):
            tables = [self.seqs[sg.seq].tables[gi] for sg in segments]
            width = max((len(t) for t in tables), default=1) or 1
            arr = np.full((len(segments), width), -1, np.int32)
            for i, t in enumerate(tables):
                arr[i, : len(t)] = t
            self._tables.append(arr)
            rows = [arr[i, p // bs].astype(np.int64) * bs + p % bs
                    for i, p in enumerate(np.arange(sg.pos, sg.pos + sg.count) for sg in segments)]
            self._rows.append(np.concatenate(rows) if rows else np.zeros(0, np.int64))

    def _copy_block(self, gi: int, b: int) -> int:
        g = self.groups[gi]
        nb = g.pool.alloc()
        for arrs in (g.k, g.v, g.k_scale, g.v_scale):
            for a in arrs:
                a[nb] = a[b]
        g.pool.decref(b)
        return nb

    def end(self) -> None:
        """The batch's positions are stored: lengths advance, out-of-window blocks are released."""
        for sg in self._batch:
            s = self.seqs[sg.seq]
            s.length = sg.pos + sg.count
            self._release_old(s)
        self._batch = []

    def abandon(self) -> None:
        """A failed batch: no length advances; blocks appended for it are freed."""
        for sg in self._batch:
            self.truncate(sg.seq, self.seqs[sg.seq].length)
        self._batch = []

    def attend(self, il: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, *, n_past: int, scale: float,
               window: int) -> np.ndarray:
        """Store the batch's k, v [T, Hkv, D] of layer il, then attention of q [T, Hq, D] for
        every segment over its own sequence's blocks (positions come from the segments: n_past,
        the single-sequence cache's argument, is not used)."""
        gi, j = self.group_of[il], self.slot_of[il]
        g, rows = self.groups[gi], self._rows[gi]
        kk, vv = g.k[j].reshape(-1, *g.k[j].shape[2:]), g.v[j].reshape(-1, *g.v[j].shape[2:])
        if self.dtype == "fp8":
            qk, sk = self.ops.fp8_quantize_rows(self._shifted(il, k))
            qv, sv = self.ops.fp8_quantize_rows(np.ascontiguousarray(v))
            kk[rows], vv[rows] = qk, qv
            g.k_scale[j].reshape(-1, self.n_head_kv)[rows] = sk
            g.v_scale[j].reshape(-1, self.n_head_kv)[rows] = sv
            extra: dict[str, object] = {"k_scale": g.k_scale[j], "v_scale": g.v_scale[j]}
            kp, vp, tables = g.k[j], g.v[j], self._tables[gi]
        else:
            kk[rows], vv[rows] = k, v
            extra = {}
            kp, vp, tables = g.k[j], g.v[j], self._tables[gi]
            if self.dtype == "fp16":  # kernels read fp32 or fp8: widen only the blocks this batch reads
                used, inv = np.unique(np.maximum(tables, 0), return_inverse=True)
                kp, vp = kp[used].astype(np.float32), vp[used].astype(np.float32)
                tables = np.where(tables >= 0, inv.reshape(tables.shape), -1).astype(np.int32)
        out: np.ndarray = self.ops.attention_paged(q, kp, vp, tables=tables, q_start=self._q_start, n_past=self._n_past,
                                                   block=self.block, scale=scale, window=window, **extra)
        return out

    def _shifted(self, il: int, k: np.ndarray) -> np.ndarray:
        """The batch's keys minus each sequence's shift for layer il. A sequence's shift is fixed
        by its first store (the mean of that chunk without position 0, as the single-sequence
        cache does; zero for a one-row start) and kept while it holds any position, and a fork
        inherits it with the blocks: every key of a sequence carries the same shift."""
        out = np.empty_like(k)
        for sg, start in zip(self._batch, self._q_start.tolist()):
            s, lo = self.seqs[sg.seq], int(start)
            shift = s.shift[il]
            if shift is None:
                # BOS is an outlier attention sink: left out of the mean
                shift = k[lo + 1 : lo + sg.count].mean(axis=0, dtype=np.float32) if sg.count > 1 else np.zeros_like(k[0])
                s.shift[il] = shift
            np.subtract(k[lo : lo + sg.count], shift, out=out[lo : lo + sg.count])
        return out

    # -- accounting ----------------------------------------------------------------------------

    def block_bytes(self, gi: int) -> int:
        g = self.groups[gi]
        per = sum(a[0].nbytes for arrs in (g.k, g.v, g.k_scale, g.v_scale) for a in arrs)
        return int(per)

    def nbytes(self) -> int:
        """Bytes of the blocks in use (what the cache holds now; free blocks are never written,
        so their pages are not resident)."""
        return sum(g.pool.n_used * self.block_bytes(i) for i, g in enumerate(self.groups))

    def capacity_bytes(self) -> int:
        return sum(g.pool.n_blocks * self.block_bytes(i) for i, g in enumerate(self.groups))

    def bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.dtype, self.n_layer, self.n_head_kv, self.head_dim_k, self.head_dim_v)
