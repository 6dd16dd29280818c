"""kernels.attention_paged: several sequences over a paged KV pool in one call.

Invariant under test: per sequence, the result is bit-identical (np.array_equal) to
kernels.attention on that sequence's keys gathered contiguously, for fp32 and FP8 pools, GQA and
MHA, any block size, decode and prefill rows, any mix of sequences (0-row ones included),
non-monotonic block ids, sliding windows whose out-of-window blocks are freed (-1), and 1 or 2
threads (2 threads with >= 256 keys takes the split-KV path). Blocks not owned by a sequence hold
NaN (FP8: NaN codes and scales), so a stray read shows. Also: within 1e-5 of float64 attention
(kernels_ref), and ValueError before any read for bad tables, q_start or n_past. The numpy
reference (capibara6.engine.ops_numpy.attention_paged) is tested with the engine
(tests/engine/test_paged_kv.py), which the qemu lane does not install.
"""
import numpy as np
import pytest
from kernels_ref import SMALL, fp8_ref_table, ref_attention

from capibara6 import kernels


def make_pool(rng, seqs, *, Hkv, D, block, fp8, window=0, spare=3, max_blocks=None):
    """seqs: [(rows, n_past)]. Returns (pool dict for attention_paged, per-sequence contiguous
    (k, v, ks, vs) of n_past + rows keys). Block ids are shuffled; blocks wholly before a
    sequence's window are freed (-1 in the table, poison in the pool)."""
    need = [-(-(r + p) // block) for r, p in seqs]
    n_blocks = sum(need) + spare
    mb = max_blocks if max_blocks is not None else max(need + [1]) + 1
    ids = rng.permutation(n_blocks).astype(np.int32)
    shape = (n_blocks, block, Hkv, D)
    if fp8:
        k = np.full(shape, 0x7F, np.uint8)
        v = np.full(shape, 0xFF, np.uint8)
        ks = np.full(shape[:3], np.nan, np.float32)
        vs = np.full(shape[:3], np.nan, np.float32)
    else:
        k = np.full(shape, np.nan, np.float32)
        v = np.full(shape, np.nan, np.float32)
    tables = np.full((len(seqs), mb), -1, np.int32)
    contig = []
    used = 0
    for i, (r, p) in enumerate(seqs):
        s = r + p
        kf = (rng.standard_normal((s, Hkv, D)) * 2).astype(np.float32)
        vf = rng.standard_normal((s, Hkv, D)).astype(np.float32)
        if fp8:
            (kc, kcs), (vc, vcs) = kernels.fp8_quantize_rows(kf), kernels.fp8_quantize_rows(vf)
        else:
            kc, vc, kcs, vcs = kf, vf, None, None
        lo = max(0, p - window + 1) if window > 0 else 0
        for b in range(need[i]):
            bid = ids[used]
            used += 1
            if (b + 1) * block <= lo:
                continue                    # out of every query's window: freed, never read
            tables[i, b] = bid
            j0, j1 = b * block, min(s, (b + 1) * block)
            k[bid, : j1 - j0], v[bid, : j1 - j0] = kc[j0:j1], vc[j0:j1]
            if fp8:
                ks[bid, : j1 - j0], vs[bid, : j1 - j0] = kcs[j0:j1], vcs[j0:j1]
        contig.append((kc, vc, kcs, vcs))
    rows = np.array([r for r, _ in seqs], np.int64)
    pool = dict(k=k, v=v, tables=tables, q_start=np.concatenate([[0], np.cumsum(rows)]).astype(np.int64),
                n_past=np.array([p for _, p in seqs], np.int64), block=block, window=window)
    if fp8:
        pool.update(k_scale=ks, v_scale=vs)
    return pool, contig


def one_by_one(q, pool, contig, scale):
    """kernels.attention per sequence on its contiguous keys."""
    out = np.zeros_like(q)
    qs = pool["q_start"]
    for i, (kc, vc, kcs, vcs) in enumerate(contig):
        kw = {"k_scale": kcs, "v_scale": vcs} if kcs is not None else {}
        out[qs[i]:qs[i + 1]] = kernels.attention(q[qs[i]:qs[i + 1]], kc, vc, n_past=int(pool["n_past"][i]),
                                                 scale=scale, window=pool["window"], **kw)
    return out


def paged(q, pool, scale, **kw):
    p = dict(pool)
    k, v = p.pop("k"), p.pop("v")
    return kernels.attention_paged(q, k, v, scale=scale, **p, **kw)


# decode rows (one with >= 256 keys: the split path with 2 threads), a 0-row sequence, prefill
# chunks of > 16 rows crossing block boundaries, from 0 and after a past
MIXED = [(1, 300), (0, 37), (40, 10), (1, 5), (20, 0), (1, 0), (17, 63)]


@pytest.mark.parametrize("nt", [1, 2])
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("D", [64, 256])
@pytest.mark.parametrize("Hq,Hkv", [(4, 1), (4, 4)])
@pytest.mark.parametrize("fp8", [False, True])
def test_bit_identical_to_attention(rng, threads, fp8, Hq, Hkv, D, block, nt):
    kernels.set_num_threads(nt)
    pool, contig = make_pool(rng, MIXED, Hkv=Hkv, D=D, block=block, fp8=fp8)
    q = rng.standard_normal((int(pool["q_start"][-1]), Hq, D)).astype(np.float32)
    y = paged(q, pool, 1 / np.sqrt(D))
    assert y.shape == q.shape and not np.isnan(y).any()
    assert np.array_equal(y, one_by_one(q, pool, contig, 1 / np.sqrt(D)))


@pytest.mark.parametrize("nt", [1, 2])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("window", [8, 40, 64, 300])
def test_window_with_freed_blocks(rng, threads, fp8, block, window, nt):
    """Blocks that fell out of a sequence's window are -1 (and poisoned in the pool): never read."""
    kernels.set_num_threads(nt)
    seqs = [(1, 400), (30, 100), (0, 90), (1, 260), (18, 3), (1, 70)]
    pool, contig = make_pool(rng, seqs, Hkv=1, D=64, block=block, fp8=fp8, window=window)
    if window < 64:
        assert (pool["tables"][0, :2] == -1).all()
    q = rng.standard_normal((int(pool["q_start"][-1]), 4, 64)).astype(np.float32)
    y = paged(q, pool, 0.125)
    assert not np.isnan(y).any()
    assert np.array_equal(y, one_by_one(q, pool, contig, 0.125))


@pytest.mark.parametrize("nt", [1, 2])
def test_many_decode_sequences(rng, threads, nt):
    """The engine's step: up to 64 one-row sequences in one call, long and short contexts."""
    kernels.set_num_threads(nt)
    n = 16 if SMALL else 64
    seqs = [(1, int(p)) for p in rng.integers(0, 400, n)]
    seqs[3] = (1, 0)
    pool, contig = make_pool(rng, seqs, Hkv=1, D=64, block=16, fp8=True)
    q = rng.standard_normal((n, 4, 64)).astype(np.float32)
    out = np.full_like(q, np.nan)
    y = paged(q, pool, 0.125, out=out)
    assert y is out
    assert np.array_equal(y, one_by_one(q, pool, contig, 0.125))


def test_sequence_result_independent_of_batch(rng, threads):
    """A sequence's rows do not depend on which other sequences share the call."""
    kernels.set_num_threads(2)
    pool, contig = make_pool(rng, MIXED, Hkv=1, D=64, block=16, fp8=True)
    q = rng.standard_normal((int(pool["q_start"][-1]), 4, 64)).astype(np.float32)
    y = paged(q, pool, 0.125)
    for i in range(len(MIXED)):
        a, b = pool["q_start"][i], pool["q_start"][i + 1]
        one = dict(pool, tables=pool["tables"][i:i + 1].copy(), n_past=pool["n_past"][i:i + 1].copy(),
                   q_start=np.array([0, b - a], np.int64))
        assert np.array_equal(paged(q[a:b].copy(), one, 0.125), y[a:b])


def test_empty_calls(rng):
    pool, _ = make_pool(rng, [(0, 5), (0, 0)], Hkv=1, D=16, block=16, fp8=False)
    q = np.zeros((0, 2, 16), np.float32)
    assert paged(q, pool, 0.5).shape == (0, 2, 16)
    none = dict(pool, tables=np.zeros((0, 3), np.int32), q_start=np.zeros(1, np.int64), n_past=np.zeros(0, np.int64))
    assert paged(q, none, 0.5).shape == (0, 2, 16)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("window", [0, 24])
def test_matches_float64_reference(rng, threads, fp8, window):
    """Within 1e-5 of float64 attention on each sequence's (FP8: decoded) keys; kernels_ref runs
    on the host and under qemu alike (its FP8 table needs no ml_dtypes)."""
    kernels.set_num_threads(2)
    pool, contig = make_pool(rng, MIXED, Hkv=2, D=64, block=16, fp8=fp8, window=window)
    q = rng.standard_normal((int(pool["q_start"][-1]), 4, 64)).astype(np.float32)
    y = paged(q, pool, 0.125)
    table, qs = fp8_ref_table(), pool["q_start"]
    ref = np.zeros(q.shape)
    for i, (kc, vc, kcs, vcs) in enumerate(contig):
        if fp8:
            kc, vc = table[kc] * kcs[..., None], table[vc] * vcs[..., None]
        ref[qs[i]:qs[i + 1]] = ref_attention(q[qs[i]:qs[i + 1]], kc, vc, int(pool["n_past"][i]), 0.125, window)
    assert np.max(np.abs(y - ref)) <= 1e-5 * np.max(np.abs(ref))


def _bad_cases(rng):
    """(what to change, match): each must raise ValueError before anything is read."""
    seqs = [(1, 40), (20, 30), (0, 8)]
    pool, _ = make_pool(rng, seqs, Hkv=1, D=16, block=16, fp8=False, window=20)
    t = pool["tables"]
    cases = []
    tt = t.copy()
    tt[1, 2] = -1                               # a block sequence 1 reads (keys 32..47)
    cases.append(({"tables": tt}, r"tables\[1, 2\]"))
    tt = t.copy()
    tt[0, 2] = pool["k"].shape[0]               # one past the pool
    cases.append(({"tables": tt}, r"tables\[0, 2\]"))
    tt = t.copy()
    tt[1, 1] = -7
    cases.append(({"tables": tt}, "tables"))
    cases.append(({"tables": t[:, :3].copy()}, "tables: too small"))   # seq 1 needs 50 keys > 48
    cases.append(({"q_start": np.array([0, 1, 22, 21], np.int64)}, "q_start"))  # last != T_total
    cases.append(({"q_start": np.array([0, 12, 1, 21], np.int64)}, "q_start"))  # decreasing
    cases.append(({"q_start": np.array([1, 2, 21, 21], np.int64)}, "q_start"))  # q_start[0] != 0
    cases.append(({"q_start": np.array([0, 1, 21], np.int64)}, "q_start"))      # wrong length
    cases.append(({"n_past": np.array([40, -1, 8], np.int64)}, "n_past"))
    cases.append(({"n_past": np.array([40, 30], np.int64)}, "n_past"))
    cases.append(({"block": 32}, "k"))                                          # pool's block is 16
    return pool, cases


def test_errors(rng):
    pool, cases = _bad_cases(rng)
    q = rng.standard_normal((21, 2, 16)).astype(np.float32)
    paged(q, pool, 0.25)                        # the unchanged pool is fine (-1 only where unread)
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            paged(q, dict(pool, **change), 0.25)
    with pytest.raises(TypeError, match="q_start"):
        paged(q, dict(pool, q_start=pool["q_start"].astype(np.int32)), 0.25)
    with pytest.raises(TypeError, match="tables"):
        paged(q, dict(pool, tables=pool["tables"].astype(np.int64)), 0.25)
    with pytest.raises(ValueError, match="tables"):
        paged(q, dict(pool, tables=np.asfortranarray(pool["tables"])), 0.25)
    with pytest.raises(ValueError, match="k_scale"):
        paged(q, dict(pool, k=pool["k"].view(np.uint8)[..., :16].copy(), v=pool["v"].view(np.uint8)[..., :16].copy()), 0.25)
