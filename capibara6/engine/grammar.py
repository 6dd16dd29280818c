"""GBNF grammar constraints for the native sampler: llama.cpp's own grammar engine on our logits.

We do not reimplement GBNF: `llama_sampler_init_grammar` (llama-cpp-python's ctypes API) is built
on the vocabulary the Tokenizer already loaded from the same GGUF (vocab_only), so the native
engine accepts exactly the grammars, tokens and partial-UTF-8 rules the llama.cpp backends do,
and a grammar that completes leaves only end-of-generation tokens allowed (llama.cpp's rule).

Cost, measured on Gemma 3 270M (262,144 tokens), 1 thread on the 2-core dev VM
(scripts/bench_native_grammar.py): one `llama_sampler_apply` over the whole vocabulary takes
~100 ms (median; 70-450 ms seen), six decode steps of this model (~16 ms each), because llama.cpp
decodes every piece to code points and walks the grammar stacks for each. Filling the
`llama_token_data` array through a numpy view over the ctypes buffer is ~0.4 ms, so the array is
not the cost; the number of candidates is. So a constrained pick asks the grammar about as few
candidates as give the *same* token the full mask would give:

- `best`: the allowed token of highest logit. Candidates in descending logit order, in chunks of
  1, 64, 1024, 16384, then the rest; the first allowed one wins (exact argmax of the masked
  logits). Greedy under the JSON grammar: 0.2-0.3 ms per token, 0.97-0.99x the unconstrained
  rate (58.1 vs 59.5 tokens/s); llama-cpp-python's chain, which masks every candidate, runs at
  0.18-0.22x its own unconstrained rate on the same file (17.3 vs 78.1 tokens/s), same run.
- `rounds`: those chunks one at a time, for a sampler that stops once its draw is certain
  (top-k, top-p, min-p: capibara6/engine/sampler.py).
- `top_allowed(k)`: the k best allowed tokens, the same way (exact top-k of the masked logits;
  where fewer than k tokens are allowed, e.g. after `{`, that asks the whole vocabulary).
- `allows`: one candidate (rejection sampling in the sampler).
- `mask`: the whole vocabulary, for samplers whose cut needs every allowed token's mass.

Invariants: a Grammar is used by one generation on one thread; `accept` must only be given a
token `allows` accepts (llama.cpp throws through the C API on any other, which aborts the
process), and `Grammar.accept` checks it. The C sampler is freed by `close()` (idempotent), or when
the object is collected (a generation iterator dropped before it started never runs `finally`).
`live_grammars()` counts the C samplers not yet freed (the leak test reads it).
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..types import BackendError

_CHUNKS = (1, 64, 1024, 16384)  # candidates asked per round before the whole vocabulary
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data, 12 bytes

_live = 0
_live_lock = threading.Lock()


class GrammarError(BackendError):
    """A grammar llama.cpp cannot parse, or one no token of the vocabulary can continue."""

    param = "response_format"
    code = "invalid_grammar"


def live_grammars() -> int:
    """C grammar samplers allocated in this process and not yet freed."""
    return _live


def _count(delta: int) -> None:
    global _live
    with _live_lock:
        _live += delta


def _free(lc: Any, ptr: Any) -> None:
    lc.llama_sampler_free(ptr)
    _count(-1)


class Grammar:
    """One generation's grammar state over a llama.cpp vocabulary of `n_vocab` tokens."""

    def __init__(self, vocab: Any, n_vocab: int, gbnf: str, root: str = "root") -> None:
        import llama_cpp

        self._lc = llama_cpp
        ptr = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), root.encode("utf-8"))
        if not ptr:  # NULL: llama.cpp logged the parse error to stderr
            raise GrammarError("the grammar (response_format) could not be parsed as GBNF with a 'root' rule")
        _count(+1)
        self._ptr = ptr
        self._finalizer = weakref.finalize(self, _free, llama_cpp, ptr)
        self.n_vocab = n_vocab
        self._buf = (llama_cpp.llama_token_data * n_vocab)()
        self._view = np.frombuffer(memoryview(self._buf).cast("B"), dtype=_TOKEN_DATA)  # writes reach C
        self._arr = llama_cpp.llama_token_data_array(self._buf, 0, -1, False)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, gbnf: str) -> Grammar:
        """On the vocabulary the engine's Tokenizer holds (no second copy of a 262k vocabulary)."""
        return cls(tokenizer._vocab, tokenizer.n_vocab, gbnf)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        self._finalizer()  # frees once; later calls do nothing

    # -- asking the grammar -------------------------------------------------------------------

    def _allowed(self, ids: np.ndarray) -> np.ndarray:
        """Boolean per id in `ids` (< n_vocab): may it come next? One llama_sampler_apply."""
        assert not self.closed, "grammar is closed"
        n = len(ids)
        v = self._view[:n]
        v["id"] = ids
        v["logit"] = 0.0  # any finite value: the grammar sets excluded ones to -inf
        v["p"] = 0.0
        a = self._arr
        a.data, a.size, a.selected, a.sorted = self._buf, n, -1, False
        self._lc.llama_sampler_apply(self._ptr, ctypes.byref(a))
        return np.isfinite(self._view["logit"][:n])

    def allows(self, token: int) -> bool:
        return bool(self._allowed(np.array([token], dtype=np.int32))[0])

    def mask(self, x: np.ndarray) -> np.ndarray:
        """`x` [n_vocab] with every token the grammar excludes at -inf (a copy)."""
        ok = self._allowed(np.arange(self.n_vocab, dtype=np.int32))
        out = np.full(x.shape, -np.inf, dtype=np.float32)
        out[: self.n_vocab][ok] = x[: self.n_vocab][ok]
        return out

    def rounds(self, x: np.ndarray) -> Iterator[Round]:
        """Ask the grammar about the candidates in descending logit order, a chunk at a time
        (1, 64, 1024, 16384, then the rest), each token once (ties at a cut included); -inf logits
        are never asked (they cannot be drawn). The caller stops when it knows enough."""
        x = x[: self.n_vocab]
        found = np.zeros(0, dtype=np.int64)
        asked = np.zeros(self.n_vocab, dtype=bool)
        for m in (*_CHUNKS, self.n_vocab):
            top = _best_first(x, min(m, self.n_vocab))
            new = top[~asked[top] & np.isfinite(x[top])]
            asked[top] = True
            if new.size:
                found = np.concatenate([found, new[self._allowed(new.astype(np.int32))]])
                found = found[np.lexsort((found, -x[found]))]
            yield Round(found, new, m >= self.n_vocab)
            if m >= self.n_vocab:
                return

    def top_allowed(self, x: np.ndarray, k: int) -> np.ndarray:
        """Up to k allowed token ids, best logit first (ties: lower id first, as np.argmax)."""
        for r in self.rounds(x):
            if r.allowed.size >= k or r.complete:
                if r.allowed.size == 0:
                    raise GrammarError("no token of the vocabulary can continue the grammar (response_format) here")
                return r.allowed[:k]
        raise AssertionError("rounds() ends with a complete round")

    def best(self, x: np.ndarray) -> int:
        """The allowed token of highest logit: argmax of `mask(x)`, asking far fewer tokens."""
        return int(self.top_allowed(x, 1)[0])

    def accept(self, token: int) -> None:
        """Advance the grammar past `token`, which it must allow."""
        if not self.allows(token):
            raise GrammarError(f"token {token} is not allowed by the grammar here")
        self._lc.llama_sampler_accept(self._ptr, token)


@dataclass(frozen=True)
class Round:
    """What `Grammar.rounds` knows after one round of questions."""

    allowed: np.ndarray  # every allowed id found so far, best logit first
    asked: np.ndarray  # ids asked in this round (all finite logits below the ones asked before)
    complete: bool  # every token with a finite logit has been asked


def _best_first(x: np.ndarray, m: int) -> np.ndarray:
    """The m ids of highest x, in descending order (stable: lower id first among equal values)."""
    n = x.shape[0]
    if m >= n:
        return np.argsort(-x, kind="stable")
    if m == 1:
        return np.array([int(np.argmax(x))])
    part = np.sort(np.argpartition(-x, m - 1)[:m])
    return part[np.argsort(-x[part], kind="stable")]
