"""Sliding-window layers keep a ring of window + chunk - 1 KV rows: same logits as a full cache,
bounded memory, and prefix reuse only where the ring still holds what the next query sees."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from capibara6.engine.kv_cache import KVCache
from capibara6.engine.runner import Runner

from .conftest import TINY_GEMMA3

CHUNK = 5


def runner(path: pathlib.Path, kv: str, ring: bool) -> Runner:
    r = Runner.load(path, n_ctx=TINY_GEMMA3["n_ctx"], prefill_chunk=CHUNK, kv_cache=kv, ops="kernels")
    if not ring:  # the same runner with every layer on a full-length cache
        c = r.config
        r.kv = KVCache(r.ops, n_layer=c.n_layer, n_ctx=r.n_ctx, n_head_kv=c.n_head_kv,
                       head_dim_k=c.head_dim_k, head_dim_v=c.head_dim_v, dtype=kv)
    return r


def tokens(n: int, seed: int = 0) -> list[int]:
    return [1] + [int(t) for t in np.random.default_rng(seed).integers(3, 260, size=n - 1)]


@pytest.mark.parametrize("kv", ["fp32", "fp16", "fp8"])
def test_ring_equals_full_cache(tiny_gemma3_gguf: pathlib.Path, kv: str) -> None:
    ring = runner(tiny_gemma3_gguf, kv, ring=True)
    full = runner(tiny_gemma3_gguf, kv, ring=False)
    w = TINY_GEMMA3["window"]
    assert [lay.ring for lay in ring.kv.layers] == [w + CHUNK - 1 if s else 0 for s in ring.config.swa_layers]
    toks = tokens(100)
    a = np.concatenate([ring.forward(toks[:60], all_logits=True)] + [ring.forward([t], all_logits=True) for t in toks[60:]])
    b = np.concatenate([full.forward(toks[:60], all_logits=True)] + [full.forward([t], all_logits=True) for t in toks[60:]])
    np.testing.assert_array_equal(a, b)
    # 5 of 6 layers hold 12 rows instead of 100 (grown in 256-row chunks on the full cache)
    assert ring.kv.nbytes() < 0.3 * full.kv.nbytes()


def test_prefix_reuse_respects_the_ring(tiny_gemma3_gguf: pathlib.Path) -> None:
    r = runner(tiny_gemma3_gguf, "fp32", ring=True)
    first = tokens(100)
    r.prefill(first)
    fresh = runner(tiny_gemma3_gguf, "fp32", ring=True)
    for keep in (98, 60):  # 98: the ring still holds positions 91..97; 60: long overwritten
        nxt = first[:keep] + tokens(12, seed=keep)[1:]
        held = len(r.tokens)
        got = r.prefill(nxt)
        fresh.reset()
        want = fresh.prefill(nxt)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert r.kv.reusable_prefix(held, keep) == (keep if keep == 98 else 0)
        r.prefill(first)  # back to the long sequence
