"""The paged KV cache (capibara6/engine/paged_kv.py) on its own, no model: the block allocator
(exhaustion, lowest id first, double free), block tables under many interleaved sequences
(fragmentation), prefix forks with copy on write, truncation, sliding-window groups that release
out-of-window blocks, failed steps, byte accounting, and attention through the pages equal to
the single-sequence KVCache path."""

from __future__ import annotations

import math
from types import ModuleType

import numpy as np
import pytest

from capibara6.engine import ops_numpy
from capibara6.engine.kv_cache import KVCache
from capibara6.engine.paged_kv import BlockPool, KVExhausted, PagedKV, Segment

from .conftest import OPS_PARAMS

H_Q, H_KV, D = 4, 2, 64
SCALE = 1.0 / math.sqrt(D)


def ops_of(name: str) -> ModuleType:
    if name == "numpy":
        return ops_numpy
    from capibara6 import kernels

    return kernels


def make_kv(ops: ModuleType = ops_numpy, *, dtype: str = "fp32", windows: tuple[int, ...] = (0, 0), n_seq: int = 4,
            n_cells: int = 64, block: int = 4, max_chunk: int = 8, head_dim: int = D) -> PagedKV:
    return PagedKV(ops, n_layer=len(windows), n_head_kv=H_KV, head_dim_k=head_dim, head_dim_v=head_dim, dtype=dtype,
                   windows=windows, n_seq=n_seq, n_cells=n_cells, block=block, max_chunk=max_chunk)


def segments(kv: PagedKV, counts: list[tuple[int, int]]) -> list[Segment]:
    out, start = [], 0
    for seq, n in counts:
        out.append(Segment(seq, start, n, kv.length(seq)))
        start += n
    return out


def grow(kv: PagedKV, counts: list[tuple[int, int]]) -> None:
    """A step that only makes room and commits (no attention): what the allocator sees."""
    kv.begin(segments(kv, counts))
    kv.end()


def write(kv: PagedKV, counts: list[tuple[int, int]], rng: np.random.Generator,
          windows: tuple[int, ...] | None = None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """A full step: store random k/v and attend in every layer; returns per layer (q, k, v, out)."""
    segs = segments(kv, counts)
    t = sum(n for _, n in counts)
    windows = windows or (0,) * kv.n_layer
    kv.begin(segs)
    res = []
    for il in range(kv.n_layer):
        q = rng.standard_normal((t, H_Q, kv.head_dim_k)).astype(np.float32)
        k = (rng.standard_normal((t, H_KV, kv.head_dim_k)) + 1.5).astype(np.float32)  # a common key component
        v = rng.standard_normal((t, H_KV, kv.head_dim_v)).astype(np.float32)
        out = kv.attend(il, q, k, v, n_past=0, scale=SCALE, window=windows[il])
        res.append((q, k, v, out))
    kv.end()
    return res


def check_invariants(kv: PagedKV) -> None:
    """Every pool's reference counts are exactly the table references; free + used == all; the
    free list is the set of unreferenced blocks; no table lists a block twice."""
    for gi, g in enumerate(kv.groups):
        counts = np.zeros(g.pool.n_blocks, np.int64)
        for s in kv.seqs:
            live = [b for b in s.tables[gi] if b >= 0]
            assert len(live) == len(set(live)), f"group {gi}: a table lists a block twice: {s.tables[gi]}"
            for b in live:
                counts[b] += 1
        np.testing.assert_array_equal(g.pool.ref, counts)
        assert int(g.pool.ref.sum()) == int(counts.sum())
        assert g.pool.n_free + g.pool.n_used == g.pool.n_blocks
        free = list(g.pool._free)
        assert len(free) == len(set(free)) == g.pool.n_free
        assert set(free) == {int(b) for b in np.flatnonzero(g.pool.ref == 0)}
        for s in kv.seqs:  # a table covers exactly the positions held
            assert len(s.tables[gi]) == -(-s.length // kv.block)


def snapshot(kv: PagedKV) -> tuple[object, ...]:
    return (
        [s.length for s in kv.seqs],
        [[list(t) for t in s.tables] for s in kv.seqs],
        [g.pool.ref.copy().tolist() for g in kv.groups],
        [sorted(g.pool._free) for g in kv.groups],
    )


# -- BlockPool -----------------------------------------------------------------------------------


def test_block_pool_exhaustion_lowest_first_and_double_free() -> None:
    pool = BlockPool(5)
    got = [pool.alloc() for _ in range(5)]
    assert got == [0, 1, 2, 3, 4]  # lowest id first
    assert pool.n_used == 5 and pool.n_free == 0
    with pytest.raises(KVExhausted):
        pool.alloc()
    pool.decref(3)
    pool.decref(1)
    assert pool.n_free == 2 and pool.n_used == 3
    assert pool.alloc() == 1  # the lowest free id, not the last freed
    assert pool.alloc() == 3
    with pytest.raises(KVExhausted):
        pool.alloc()
    pool.incref(2)
    pool.decref(2)
    assert pool.ref[2] == 1 and pool.n_used == 5  # still referenced once
    pool.decref(2)
    assert pool.ref[2] == 0 and pool.n_free == 1
    with pytest.raises(ValueError):
        pool.decref(2)  # double free
    with pytest.raises(ValueError):
        pool.incref(2)  # a free block cannot gain a reference
    assert pool.n_free == 1 and pool.alloc() == 2


def test_pool_exhaustion_through_paged_kv_and_abandon() -> None:
    kv = make_kv(n_seq=2, n_cells=16, block=4)
    n_blocks = kv.groups[0].pool.n_blocks
    assert n_blocks == 16 // 4 + 2 + 1
    grow(kv, [(0, 8)])
    before = snapshot(kv)
    with pytest.raises(KVExhausted):
        kv.begin(segments(kv, [(0, 4), (1, 4 * n_blocks)]))  # seq 0 gets its block, seq 1 runs the pool dry
    kv.abandon()
    assert snapshot(kv) == before
    check_invariants(kv)
    grow(kv, [(1, 8)])  # the pool works on after the failed step
    assert kv.length(1) == 8 and kv.length(0) == 8
    check_invariants(kv)


# -- tables --------------------------------------------------------------------------------------


def stamp_step(kv: PagedKV, counts: list[tuple[int, int]], model: list[list[float]], next_stamp: list[int]) -> None:
    """A step whose keys/values carry a unique stamp per written position (channel 0), through
    the public path (begin, attend in every layer, end); `model` gets the stamps on success."""
    segs = segments(kv, counts)
    t = sum(n for _, n in counts)
    stamps = np.arange(next_stamp[0], next_stamp[0] + t, dtype=np.float32)
    k = np.zeros((t, H_KV, kv.head_dim_k), np.float32)
    k[:, :, 0] = stamps[:, None]
    q = np.zeros((t, H_Q, kv.head_dim_k), np.float32)
    kv.begin(segs)
    for il in range(kv.n_layer):
        kv.attend(il, q, k, k, n_past=0, scale=SCALE, window=kv.groups[kv.group_of[il]].window)
    kv.end()
    next_stamp[0] += t
    for sg in segs:
        model[sg.seq].extend(stamps[sg.start : sg.start + sg.count].tolist())


def check_contents(kv: PagedKV, model: list[list[float]]) -> None:
    """Every position a sequence still holds reads back its own stamp in every layer: no write of
    one sequence ever landed in a block another one reads."""
    for si, s in enumerate(kv.seqs):
        assert s.length == len(model[si])
        for il in range(kv.n_layer):
            gi, j = kv.group_of[il], kv.slot_of[il]
            g = kv.groups[gi]
            for p in range(s.length):
                b = s.tables[gi][p // kv.block]
                if b < 0:
                    continue
                assert g.k[j][b, p % kv.block, 0, 0] == model[si][p], (si, il, p)
                assert g.v[j][b, p % kv.block, 1, 0] == model[si][p], (si, il, p)


@pytest.mark.parametrize("windows", [(0, 0), (0, 12, 12)])
def test_fragmentation_invariants(windows: tuple[int, ...]) -> None:
    """Interleaved sequences grow, truncate, fork and end in random order for many rounds: the
    reference counts are the table references, free + used == all, and each sequence reads back
    exactly what it wrote (blocks are shared only as forks share them)."""
    rng = np.random.default_rng(7)
    n_seq, block, n_cells, chunk = 6, 4, 96, 8
    kv = make_kv(windows=windows, n_seq=n_seq, n_cells=n_cells, block=block, max_chunk=chunk)
    model: list[list[float]] = [[] for _ in range(n_seq)]
    stamp = [1]
    exhausted = forks = shared = 0
    for _round in range(500):
        op = rng.choice(["grow", "grow", "grow", "truncate", "free", "fork"])
        if op == "grow":
            seqs = rng.choice(n_seq, size=int(rng.integers(1, 4)), replace=False)
            counts = [(int(s), int(rng.integers(1, chunk + 1))) for s in seqs]
            if sum(kv.length(s) for s in range(n_seq)) + sum(n for _, n in counts) > n_cells:
                # the scheduler would preempt first; past its budget the pool may run dry
                before = snapshot(kv)
                try:
                    stamp_step(kv, counts, model, stamp)
                except KVExhausted:
                    kv.abandon()
                    exhausted += 1
                    assert snapshot(kv)[0] == before[0]  # no length moved (COW copies made stay owned)
            else:
                stamp_step(kv, counts, model, stamp)  # within n_cells the pools never run dry
        elif op == "truncate":
            s = int(rng.integers(n_seq))
            n = int(rng.integers(0, kv.length(s) + 1))
            if kv.reusable(s, n):
                kv.truncate(s, n)
                del model[s][n:]
        elif op == "free":
            s = int(rng.integers(n_seq))
            kv.truncate(s, 0)
            model[s] = []
        else:
            src, dst = (int(x) for x in rng.choice(n_seq, size=2, replace=False))
            n = int(rng.integers(0, kv.length(src) + 1))
            if kv.reusable(src, n):
                kv.fork(src, dst, n)
                model[dst] = model[src][:n]
                forks += 1
        check_invariants(kv)
        check_contents(kv, model)
        shared += int(any((g.pool.ref > 1).any() for g in kv.groups))
    assert forks > 20 and shared > 50 and exhausted > 0
    for s in range(n_seq):
        kv.truncate(s, 0)
    check_invariants(kv)
    assert all(g.pool.n_used == 0 for g in kv.groups)


def test_truncate_frees_the_blocks_beyond() -> None:
    kv = make_kv(block=4)
    grow(kv, [(0, 8), (1, 3)])
    grow(kv, [(0, 7)])
    assert kv.length(0) == 15 and len(kv.seqs[0].tables[0]) == 4
    used = kv.groups[0].pool.n_used
    assert used == 5
    kv.truncate(0, 9)  # keeps blocks 0..2 (positions 8..11 in block 2)
    assert kv.length(0) == 9 and len(kv.seqs[0].tables[0]) == 3
    assert kv.groups[0].pool.n_used == used - 1
    kv.truncate(0, 8)  # block aligned: block 2 goes too
    assert len(kv.seqs[0].tables[0]) == 2 and kv.groups[0].pool.n_used == used - 2
    kv.truncate(0, 20)  # past the end: nothing changes
    assert kv.length(0) == 8
    kv.truncate(0, 0)
    assert kv.length(0) == 0 and kv.seqs[0].tables[0] == [] and kv.groups[0].pool.n_used == 1  # seq 1's block
    check_invariants(kv)


@pytest.mark.parametrize("dtype", ["fp32", "fp8"])
def test_fork_shares_blocks_and_copies_on_write(dtype: str) -> None:
    rng = np.random.default_rng(1)
    kv = make_kv(dtype=dtype, block=4)
    write(kv, [(0, 8)], rng)
    write(kv, [(0, 3)], rng)  # seq 0: 11 positions; block 2 is partial (positions 8..10)
    src_table = list(kv.seqs[0].tables[0])
    kv.fork(0, 1, 10)  # the first 10 positions: blocks 0, 1 whole and 2 partial
    g = kv.groups[0]
    assert kv.seqs[1].tables[0] == src_table
    assert [int(g.pool.ref[b]) for b in src_table] == [2, 2, 2]
    assert kv.seqs[1].shift == kv.seqs[0].shift  # FP8: the fork keeps the keys' shift
    check_invariants(kv)
    saved = [(a.copy(), a[src_table[2]].copy()) for arrs in (g.k, g.v, g.k_scale, g.v_scale) for a in arrs]

    write(kv, [(1, 3)], rng)  # the fork writes positions 10..12: into the shared block 2, then a new block 3
    t1 = kv.seqs[1].tables[0]
    assert t1[:2] == src_table[:2] and t1[2] not in src_table and len(t1) == 4
    assert [int(g.pool.ref[b]) for b in src_table] == [2, 2, 1]
    assert kv.seqs[0].tables[0] == src_table and kv.length(0) == 11
    i = 0
    for arrs in (g.k, g.v, g.k_scale, g.v_scale):
        for a in arrs:
            whole, old_block = saved[i]
            i += 1
            np.testing.assert_array_equal(a[src_table[2]], old_block)  # the source's rows, bit for bit
            for b in src_table:
                np.testing.assert_array_equal(a[b], whole[b])
            np.testing.assert_array_equal(a[t1[2]][:2], old_block[:2])  # the copied rows (positions 8, 9)
    check_invariants(kv)

    # the source now writes into its (no longer shared) block 2 in place
    write(kv, [(0, 1)], rng)
    assert kv.seqs[0].tables[0] == src_table
    check_invariants(kv)
    kv.truncate(1, 0)
    assert [int(g.pool.ref[b]) for b in src_table] == [1, 1, 1]
    check_invariants(kv)


def test_fork_of_a_block_aligned_prefix_copies_nothing() -> None:
    rng = np.random.default_rng(2)
    kv = make_kv(block=4)
    write(kv, [(0, 8)], rng)
    kv.fork(0, 1, 8)
    used = kv.groups[0].pool.n_used
    write(kv, [(1, 2), (0, 2)], rng)  # each appends its own new block; the shared ones are never written
    assert kv.groups[0].pool.n_used == used + 2
    assert kv.seqs[0].tables[0][:2] == kv.seqs[1].tables[0][:2]
    assert kv.seqs[0].tables[0][2] != kv.seqs[1].tables[0][2]
    check_invariants(kv)


def test_sliding_window_releases_out_of_window_blocks() -> None:
    window, block, chunk = 12, 4, 8
    kv = make_kv(windows=(0, window, window), n_seq=2, n_cells=400, block=block, max_chunk=chunk)
    swa = next(i for i, g in enumerate(kv.groups) if g.window == window)
    full = next(i for i, g in enumerate(kv.groups) if g.window == 0)
    bound = -(-(window + chunk) // block)
    rng = np.random.default_rng(3)
    peak = 0
    while kv.length(0) < 380:
        n = int(rng.integers(1, chunk + 1))
        n = min(n, 380 - kv.length(0))
        kv.begin(segments(kv, [(0, n)]))
        peak = max(peak, sum(b >= 0 for b in kv.seqs[0].tables[swa]))  # while the chunk is being written
        kv.end()
        held = [b for b in kv.seqs[0].tables[swa] if b >= 0]
        assert len(held) <= bound, (kv.length(0), kv.seqs[0].tables[swa])
        oldest = max(0, kv.length(0) - window + 1)  # what the next query still sees
        table = kv.seqs[0].tables[swa]
        assert all(b < 0 for b in table[: oldest // block]) and all(b >= 0 for b in table[oldest // block :])
        assert kv.groups[swa].pool.n_used == len(held)
        check_invariants(kv)
    assert peak <= bound + 1
    assert len(kv.seqs[0].tables[full]) == -(-380 // block) == kv.groups[full].pool.n_used  # full attention grows
    # the SWA pool is sized for the rings, not for n_cells
    assert kv.groups[swa].pool.n_blocks < kv.groups[full].pool.n_blocks


def test_reusable_false_once_needed_positions_were_released() -> None:
    window, block = 8, 4
    kv = make_kv(windows=(0, window), n_seq=2, n_cells=200, block=block, max_chunk=4)
    for _ in range(25):
        grow(kv, [(0, 4)])
    length = kv.length(0)
    assert length == 100
    oldest_held = min(i for i, b in enumerate(kv.seqs[0].tables[1]) if b >= 0) * block
    assert oldest_held == (100 - window + 1) // block * block == 92
    for n in range(0, 101):
        need = max(0, n - window + 1)  # the next query (position n) sees need .. n-1
        assert kv.reusable(0, n) == (need >= oldest_held or n == 0), n
    assert not kv.reusable(0, 101)  # more than it holds
    assert kv.reusable(0, 99) and not kv.reusable(0, 98)
    kv.truncate(0, 99)
    grow(kv, [(0, 4)])  # continues from a reusable prefix
    assert kv.length(0) == 103
    check_invariants(kv)
    kv.fork(0, 1, 103)
    assert kv.reusable(1, 103) and not kv.reusable(1, 50)
    check_invariants(kv)


def test_abandon_after_a_failed_step_restores_lengths_and_pools() -> None:
    rng = np.random.default_rng(4)
    kv = make_kv(dtype="fp8", windows=(0, 8), n_seq=3, block=4)
    write(kv, [(0, 6), (1, 4)], rng)
    before = snapshot(kv)
    shifts = [list(s.shift) for s in kv.seqs]
    segs = segments(kv, [(0, 3), (1, 5), (2, 7)])
    used = [g.pool.n_used for g in kv.groups]
    kv.begin(segs)  # new blocks for all three (seq 2 starts from nothing)
    assert all(g.pool.n_used > u for g, u in zip(kv.groups, used))
    q = rng.standard_normal((15, H_Q, D)).astype(np.float32)
    k = rng.standard_normal((15, H_KV, D)).astype(np.float32)
    kv.attend(0, q, k, k, n_past=0, scale=SCALE, window=0)  # layer 0 stored, then the step fails
    kv.abandon()
    assert snapshot(kv) == before
    assert kv.seqs[2].shift == [None, None]  # a sequence the failed step started holds nothing
    for s, old in zip(kv.seqs[:2], shifts[:2]):
        assert all(a is b for a, b in zip(s.shift, old))
    check_invariants(kv)
    write(kv, [(2, 2)], rng)  # and the cache goes on
    check_invariants(kv)


def test_begin_checks_the_write_position() -> None:
    kv = make_kv()
    grow(kv, [(0, 5)])
    with pytest.raises(ValueError):
        kv.begin([Segment(0, 0, 1, 4)])
    kv.abandon()
    assert kv.length(0) == 5
    check_invariants(kv)


# -- accounting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "fp8"])
def test_nbytes_is_used_blocks_times_block_bytes(dtype: str) -> None:
    kv = make_kv(dtype=dtype, windows=(0, 8, 8), n_seq=3, block=4)
    assert kv.nbytes() == 0
    grow(kv, [(0, 9), (1, 4)])
    grow(kv, [(2, 1), (0, 8)])
    expect = sum(g.pool.n_used * kv.block_bytes(i) for i, g in enumerate(kv.groups))
    assert kv.nbytes() == expect > 0
    # a block of a group holds `block` positions of each of its layers: bytes_per_token says the same
    per_pos = sum(kv.block_bytes(i) / kv.block / len(g.layers) for i, g in enumerate(kv.groups) for _ in g.layers)
    assert per_pos == kv.bytes_per_token()
    assert kv.capacity_bytes() == sum(g.pool.n_blocks * kv.block_bytes(i) for i, g in enumerate(kv.groups))
    for s in range(3):
        kv.truncate(s, 0)
    assert kv.nbytes() == 0


@pytest.mark.parametrize("head_dim", [64, 256])
def test_fp8_bytes_per_token_at_most_027_of_fp32(head_dim: int) -> None:
    fp8 = make_kv(dtype="fp8", head_dim=head_dim)
    fp32 = make_kv(dtype="fp32", head_dim=head_dim)
    assert fp8.bytes_per_token() <= 0.27 * fp32.bytes_per_token()
    assert fp8.block_bytes(0) <= 0.27 * fp32.block_bytes(0)  # what the pool really holds per block


# -- attention through the pages -----------------------------------------------------------------


def reference_caches(ops: ModuleType, dtype: str, windows: tuple[int, ...], n: int, chunk: int) -> list[KVCache]:
    return [KVCache(ops, n_layer=len(windows), n_ctx=512, n_head_kv=H_KV, head_dim_k=D, head_dim_v=D, dtype=dtype,
                    windows=windows, max_chunk=chunk) for _ in range(n)]


def check_step(kv: PagedKV, refs: list[KVCache], counts: list[tuple[int, int]], windows: tuple[int, ...],
               rng: np.random.Generator) -> None:
    segs = segments(kv, counts)
    out = write(kv, counts, rng, windows)
    for il, (q, k, v, got) in enumerate(out):
        for sg in segs:
            r = refs[sg.seq]
            rows = slice(sg.start, sg.start + sg.count)
            if il == 0:
                r.reserve(sg.pos + sg.count)
            want = r.attend(il, q[rows], k[rows], v[rows], n_past=sg.pos, scale=SCALE, window=windows[il])
            np.testing.assert_array_equal(got[rows], want, err_msg=f"layer {il} seq {sg.seq} at {sg.pos}")


@pytest.mark.parametrize("ops_name", OPS_PARAMS)
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "fp8"])
def test_attend_equals_single_sequence_cache(ops_name: str, dtype: str) -> None:
    """Three sequences of different lengths, prefill chunks and decode rows mixed in each step,
    full-attention and sliding-window layers: each sequence's attention through the pages is the
    single-sequence KVCache's, bit for bit."""
    ops = ops_of(ops_name)
    windows = (0, 12, 12)
    chunk = 10
    kv = make_kv(ops, dtype=dtype, windows=windows, n_seq=3, n_cells=300, block=4, max_chunk=chunk + 3)
    refs = reference_caches(ops, dtype, windows, 3, chunk + 3)
    rng = np.random.default_rng(5)
    check_step(kv, refs, [(0, 7), (1, 10)], windows, rng)  # two prompts at once
    check_step(kv, refs, [(0, 1), (1, 1), (2, 9)], windows, rng)  # decode rows + a third prompt
    for i in range(30):  # decode, with a prompt chunk now and then
        counts = [(0, 1), (1, 1), (2, 1)]
        if i % 7 == 3:
            counts[1] = (1, 5)
        check_step(kv, refs, counts, windows, rng)
    assert kv.length(2) > 12 + 4  # past the window: blocks were released
    assert any(b < 0 for b in kv.seqs[2].tables[1])


def test_attend_after_fork_equals_single_sequence_cache() -> None:
    """A forked prefix continued by both sequences (copy on write in the partial block) attends as
    two independent single-sequence caches that hold the same prefix."""
    from capibara6 import kernels

    windows = (0, 12)
    kv = make_kv(kernels, windows=windows, n_seq=2, n_cells=200, block=4, max_chunk=12)
    refs = reference_caches(kernels, "fp32", windows, 2, 12)
    rng = np.random.default_rng(6)
    segs = segments(kv, [(0, 10)])
    out = write(kv, [(0, 10)], rng, windows)
    for r in refs:  # both references hold the same 10-token prefix
        r.reserve(10)
        for il, (q, k, v, _) in enumerate(out):
            r.attend(il, q, k, v, n_past=0, scale=SCALE, window=windows[il])
    assert segs[0].count == 10
    kv.fork(0, 1, 10)
    for _ in range(20):
        check_step(kv, refs, [(1, 1), (0, 1)], windows, rng)
    check_invariants(kv)


def _bad_paged_calls() -> list[tuple[dict[str, object], str]]:
    """Calls of attention_paged over a 3-sequence pool that must fail before anything is read."""
    block, n_blocks = 4, 12
    tables = np.array([[0, 1, 2, -1], [3, 4, 5, 6], [7, -1, -1, -1]], np.int32)  # seq 1 reads keys 0..14
    ok: dict[str, object] = dict(q_start=np.array([0, 1, 6, 6], np.int64), n_past=np.array([9, 10, 2], np.int64),
                                 tables=tables, block=block)
    freed = tables.copy()
    freed[1, 2] = -1
    outside = tables.copy()
    outside[0, 2] = n_blocks
    return [(dict(ok, tables=freed), "tables"), (dict(ok, tables=outside), "tables"),
            (dict(ok, tables=tables[:, :2].copy()), "tables"),
            (dict(ok, q_start=np.array([0, 6, 1, 6], np.int64)), "q_start"),
            (dict(ok, q_start=np.array([1, 1, 6, 6], np.int64)), "q_start"),
            (dict(ok, n_past=np.array([9, -1, 2], np.int64)), "n_past"), (dict(ok, block=8), "k"), (ok, "")]


def test_numpy_reference_refuses_what_the_kernel_refuses() -> None:
    """ops_numpy.attention_paged (the engine's reference) raises the kernel's ValueError, naming the
    same argument, for the same bad tables, q_start, n_past and block; a good call passes both."""
    from capibara6 import kernels

    rng = np.random.default_rng(9)
    k = rng.standard_normal((12, 4, 1, 8)).astype(np.float32)
    v = rng.standard_normal((12, 4, 1, 8)).astype(np.float32)
    q = rng.standard_normal((6, 2, 8)).astype(np.float32)
    for call, name in _bad_paged_calls():
        for ops in (kernels, ops_numpy):
            if not name:
                ops.attention_paged(q, k, v, scale=0.3, **call)  # type: ignore[attr-defined]
                continue
            with pytest.raises(ValueError, match=name):
                ops.attention_paged(q, k, v, scale=0.3, **call)  # type: ignore[attr-defined]
