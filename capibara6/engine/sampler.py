"""Token sampling in numpy, in llama-cpp-python's order: logit bias -> penalties -> grammar -> top-k ->
top-p -> min-p -> temperature -> draw. Works on a small candidate set (argpartition), never a full
262k-vocab sort.

With a grammar (capibara6/engine/grammar.py) the token is drawn from the distribution the masked
logits define, exactly as if every excluded token were at -inf, but the grammar is asked about as
few tokens as that takes (a full mask of Gemma's 262k vocabulary costs ~100 ms per token): greedy
takes the best allowed token; pure temperature draws by rejection (draw, keep it if allowed:
P(t) = p(t) / P(allowed) exactly, then the chunked draw after REJECTION_DRAWS misses); top-k,
top-p and min-p ask in chunks, best logit first, until the token drawn for the step's random
number is the one the full mask would draw (`_constrained_draw`; tested token for token).
Measured under the JSON grammar on Gemma 3 270M (scripts/bench_native_grammar.py, 1 thread,
shared 2-core VM; 59.5 tokens/s unconstrained): greedy 58.1, temperature 1 51.3, top_k 40 54.3,
top_p 0.9 30.0 (inside a JSON string nearly every token is allowed and top-p's pool is wide, so
the cut is often certain only after the 16384-token chunk). Logprobs stay those of the unmasked
logits, as the llama.cpp backends report them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..types import SamplingParams
from .grammar import Grammar

PENALTY_LAST_N = 64  # llama.cpp's default window for repeat/presence/frequency penalties
_TOP_P_CANDIDATES = 2048  # top-p first tries this many best tokens before a full sort
REJECTION_DRAWS = 16  # unconstrained draws tried under a grammar before masking the whole vocabulary


@dataclass(frozen=True)
class SampleResult:
    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] | None = None  # (token id, logprob), best first


def log_softmax(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    m = x64.max()
    return x64 - (m + np.log(np.exp(x64 - m).sum()))


class Sampler:
    def __init__(
        self,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        seed: int | None = None,
        logprobs: int | None = None,
        logit_bias: tuple[tuple[int, float], ...] = (),
        grammar: Grammar | None = None,
    ) -> None:
        """`grammar`: every sampled token is accepted into it (the caller owns and closes it)."""
        self.grammar = grammar
        self.temperature = temperature
        self._bias_ids = np.array([i for i, _ in logit_bias], dtype=np.int64)
        self._bias = np.array([b for _, b in logit_bias], dtype=np.float32)
        self.top_k = top_k
        self.top_p = top_p
        self.min_p = min_p
        self.repeat_penalty = repeat_penalty
        self.presence_penalty = presence_penalty
        self.frequency_penalty = frequency_penalty
        self.logprobs = logprobs
        self.rng = np.random.Generator(np.random.PCG64(seed))

    @classmethod
    def from_params(cls, p: SamplingParams, grammar: Grammar | None = None) -> Sampler:
        return cls(
            temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p, repeat_penalty=p.repeat_penalty,
            presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty, seed=p.seed,
            logprobs=p.logprobs, logit_bias=p.logit_bias, grammar=grammar,
        )

    def _penalize(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        if not history or (
            self.repeat_penalty == 1.0 and self.presence_penalty == 0.0 and self.frequency_penalty == 0.0
        ):
            return logits
        ids, counts = np.unique(np.asarray(history[-PENALTY_LAST_N:], dtype=np.int64), return_counts=True)
        out = logits.copy()
        sel = out[ids]
        if self.repeat_penalty != 1.0:
            sel = np.where(sel > 0, sel / self.repeat_penalty, sel * self.repeat_penalty)
        sel = sel - counts * self.frequency_penalty - (counts > 0) * self.presence_penalty
        out[ids] = sel
        return out

    def sample(self, logits: np.ndarray, history: list[int]) -> SampleResult:
        """Pick the next token from logits [vocab]; `history` is the sequence so far (for penalties)."""
        raw = np.asarray(logits, dtype=np.float32)
        if self._bias_ids.size:  # on the raw logits, as OpenAI (and llama.cpp's chain) apply it
            raw = raw.copy()
            raw[self._bias_ids] += self._bias
        x = self._penalize(raw, history)
        if self.grammar is not None:
            tok = self._constrained(x, self.grammar)
            self.grammar.accept(tok)
        elif self.temperature <= 0.0:
            tok = int(np.argmax(x))
        else:
            tok = self._draw(x)
        return self._with_logprobs(raw, tok)

    def _constrained(self, x: np.ndarray, g: Grammar) -> int:
        """A token drawn from the distribution `_draw` draws from on `g.mask(x)`, asking `g` about few tokens."""
        if self.temperature <= 0.0:
            return g.best(x)
        if self.top_k <= 0 and self.top_p >= 1.0 and self.min_p <= 0.0:
            for _ in range(REJECTION_DRAWS):
                tok = self._draw(x)
                if g.allows(tok):
                    return tok
        return self._constrained_draw(x, g)

    def _constrained_draw(self, x: np.ndarray, g: Grammar) -> int:
        """Draw from the masked logits' pool, best first, with one random number u, as soon as
        the token is certain. After a round, the allowed tokens found are the pool's head in its
        true order (every unasked token has a lower logit, <= `lowest`); what may follow them is
        at most `unknown` of unmasked mass: the mass not asked yet, and with top_k at most
        (k - found) tokens of logit <= lowest. The drawn index only grows with that mass (top-p
        keeps more, the draw's total grows), so a token drawn both with none and with all of it
        is the token the full mask draws for this u."""
        fin = np.isfinite(x)
        top = float(x[fin].max())
        w = np.zeros(x.shape, dtype=np.float64)
        w[fin] = np.exp(x[fin].astype(np.float64) - top)
        tail, n_unasked = float(w.sum()), int(fin.sum())
        lowest = np.inf
        u = float(self.rng.random())
        k = self.top_k if self.top_k > 0 else None
        for r in g.rounds(x):
            if r.asked.size:
                tail -= float(w[r.asked].sum())
                n_unasked -= r.asked.size
                lowest = min(lowest, float(x[r.asked].min()))
            ids = r.allowed if k is None else r.allowed[:k]
            if ids.size == 0:
                if r.complete:
                    return g.best(x)  # raises: no token can continue the grammar
                continue
            if r.complete or (k is not None and ids.size == k):
                n_more, unknown = 0, 0.0
            else:
                n_more = n_unasked if k is None else min(n_unasked, k - ids.size)
                unknown = min(max(0.0, tail), n_more * float(np.exp(lowest - top)))
            tok = self._certain(x, ids, w, n_more, unknown, lowest, u)
            if tok is not None:
                return tok
        raise AssertionError("rounds() ends with a complete round")

    def _certain(
        self, x: np.ndarray, ids: np.ndarray, w: np.ndarray, n_more: int, unknown: float, lowest: float, u: float
    ) -> int | None:
        """The token for u when `ids` (best first) may be followed by up to n_more tokens of
        total unmasked mass <= unknown, each of logit <= lowest; None when that is not certain."""
        if self.top_p < 1.0:
            c = np.cumsum(w[ids])
            k_lo = int(np.searchsorted(c, self.top_p * c[-1], side="left")) + 1
            hi = self.top_p * (c[-1] + unknown)
            if c[-1] < hi:
                return None  # the cut may keep tokens not asked yet
            k_hi = int(np.searchsorted(c, hi, side="left")) + 1
            tok = self._pick(x, ids[:k_lo], u)
            return tok if k_hi == k_lo or self._pick(x, ids[:k_hi], u) == tok else None
        if n_more == 0 or (self.min_p > 0.0 and lowest < float(x[ids[0]]) + np.log(self.min_p)):
            return self._pick(x, ids, u)  # nothing unasked can be in the pool
        # the draw's total may grow by up to n_more tokens of tempered weight <= that of `lowest`
        extra = n_more * float(np.exp((lowest - float(x[ids[0]])) / self.temperature))
        tok = self._pick(x, ids, u)
        return tok if self._pick(x, ids, u, extra) == tok else None

    def _draw(self, x: np.ndarray) -> int:
        n = x.shape[0]
        if 0 < self.top_k < n:
            cand = np.argpartition(-x, self.top_k - 1)[: self.top_k]
        else:
            cand = None
        if self.top_p < 1.0:
            cand = self._top_p(x, cand)
        if cand is None:
            cand = np.arange(n)
        return self._pick(x, cand)

    def _pick(self, x: np.ndarray, cand: np.ndarray, u: float | None = None, extra: float = 0.0) -> int:
        """min-p, temperature and the draw (random number `u` in [0, 1), drawn here if None),
        over the candidate ids `cand` of x, in their order. `extra`: tempered weight (relative
        to the best candidate's) of tokens after them; -1 when the draw falls among those."""
        c = x[cand].astype(np.float64)
        if self.min_p > 0.0:
            keep = c >= c.max() + np.log(self.min_p)  # p_i >= min_p * p_max, in log space
            cand, c = cand[keep], c[keep]
        c = c / self.temperature
        p = np.exp(c - c.max())
        cdf = np.cumsum(p)
        u = self.rng.random() if u is None else u
        i = int(np.searchsorted(cdf, u * (cdf[-1] + extra), side="right"))
        if extra > 0.0 and i >= len(cand):
            return -1
        return int(cand[min(i, len(cand) - 1)])

    def _top_p(self, x: np.ndarray, cand: np.ndarray | None) -> np.ndarray:
        """Smallest best-first set with cumulative probability >= top_p (at least one token)."""
        pool = np.arange(x.shape[0]) if cand is None else cand
        v = x[pool].astype(np.float64)
        m = v.max()
        total = np.exp(v - m).sum()
        if len(pool) > _TOP_P_CANDIDATES:
            part = np.argpartition(-v, _TOP_P_CANDIDATES - 1)[:_TOP_P_CANDIDATES]
            if np.exp(v[part] - m).sum() / total < self.top_p:
                part = np.arange(len(pool))  # the head is too flat: sort everything
        else:
            part = np.arange(len(pool))
        order = part[np.argsort(-v[part], kind="stable")]
        cum = np.cumsum(np.exp(v[order] - m)) / total
        keep = int(np.searchsorted(cum, self.top_p, side="left")) + 1
        return pool[order[: min(keep, len(order))]]

    def _with_logprobs(self, raw: np.ndarray, tok: int) -> SampleResult:
        if self.logprobs is None:
            return SampleResult(tok)
        lp = log_softmax(raw)
        k = int(self.logprobs)
        top: tuple[tuple[int, float], ...] = ()
        if k > 0:
            idx = np.argpartition(-lp, k - 1)[:k]
            idx = idx[np.argsort(-lp[idx], kind="stable")]
            top = tuple((int(i), float(lp[i])) for i in idx)
        return SampleResult(tok, float(lp[tok]), top)
