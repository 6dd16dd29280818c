"""Token sampling in numpy, in llama-cpp-python's order: logit bias -> penalties -> grammar -> top-k ->
top-p -> min-p -> temperature -> draw. Works on a small candidate set (argpartition), never a full
262k-vocab sort.

With a grammar (capibara6/engine/grammar.py) the token is drawn from the distribution the masked
logits define, exactly as if every excluded token were at -inf, but the grammar is asked about as
few tokens as that takes (a full mask of Gemma's 262k vocabulary costs 70-450 ms per token):
greedy takes the best allowed token; with top_k the k best allowed tokens are the whole candidate
pool (top-p and min-p then cut inside it, as they do without a grammar); pure temperature draws
by rejection (draw, keep it if allowed: P(t) = p(t) / P(allowed) exactly), falling back to the
whole allowed set after REJECTION_DRAWS misses, which keeps the distribution exact; top-p or
min-p without top_k ask in chunks until the drawn token is certain (`_constrained_cut`). Measured under the JSON grammar on Gemma 3 270M
(scripts/bench_native_grammar.py, 1 thread, shared 2-core VM; 57.3 tokens/s unconstrained): greedy
55.3, temperature 1 (rejection) 54.7, top_p 0.9 32.0, top_k 40 15.7 (where fewer than 40 tokens
are allowed, e.g. after `{`, finding the 40 best allowed asks the whole vocabulary, ~100 ms). Logprobs stay those of the
unmasked logits, as the llama.cpp backends report them.
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
        """The token `_draw` / argmax would pick from `g.mask(x)`, asking `g` about few tokens."""
        if self.temperature <= 0.0:
            return g.best(x)
        if self.top_k > 0:  # the k best allowed tokens are the pool; the other cuts work inside it
            keep = g.top_allowed(x, self.top_k)
            only = np.full(x.shape, -np.inf, dtype=np.float32)
            only[keep] = x[keep]
            return self._draw(only)
        if self.top_p >= 1.0 and self.min_p <= 0.0:
            for _ in range(REJECTION_DRAWS):
                tok = self._draw(x)
                if g.allows(tok):
                    return tok
        return self._constrained_cut(x, g)

    def _constrained_cut(self, x: np.ndarray, g: Grammar) -> int:
        """`_draw(g.mask(x))` with top_k 0: the same token for the same random number, found
        before every token is asked when it is already certain. The allowed tokens found so far
        come first in the true order (every unasked token has a lower logit) and the unasked
        allowed mass lies in [0, tail], tail = the unmasked mass not asked yet. min-p alone is
        certain once the lowest asked logit is below its threshold (best allowed + log min_p).
        Top-p keeps a prefix of k tokens, k_lo <= k <= k_hi (the cut for no allowed mass left
        and for all of `tail`); the drawn index only grows with k, so when the draw is the same
        token for k_lo and k_hi, it is that token for the true k."""
        fin = np.isfinite(x)
        w = np.zeros(x.shape, dtype=np.float64)
        w[fin] = np.exp(x[fin].astype(np.float64) - x[fin].max())
        tail = float(w.sum())
        lowest = np.inf
        u = float(self.rng.random())
        for r in g.rounds(x):
            if r.asked.size:
                tail -= float(w[r.asked].sum())
                lowest = min(lowest, float(x[r.asked].min()))
            ids = r.allowed
            if ids.size == 0:
                if r.complete:
                    return g.best(x)  # raises: no token can continue the grammar
                continue
            if self.top_p >= 1.0:
                certain = r.complete or (self.min_p > 0.0 and lowest < float(x[ids[0]]) + np.log(self.min_p))
                if certain:  # in id order, as `_draw` walks a pool it does not cut
                    return self._pick(x, np.sort(ids), u)
                continue
            c = np.cumsum(w[ids])
            k_lo = int(np.searchsorted(c, self.top_p * c[-1], side="left")) + 1
            if r.complete:
                return self._pick(x, ids[:k_lo], u)
            hi = self.top_p * (c[-1] + max(0.0, tail))
            if c[-1] < hi:
                continue  # the cut may lie past what has been asked
            k_hi = int(np.searchsorted(c, hi, side="left")) + 1
            tok = self._pick(x, ids[:k_lo], u)
            if k_hi == k_lo or self._pick(x, ids[:k_hi], u) == tok:
                return tok
        raise AssertionError("rounds() ends with a complete round")

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

    def _pick(self, x: np.ndarray, cand: np.ndarray, u: float | None = None) -> int:
        """min-p, temperature and the draw (random number `u` in [0, 1), drawn here if None),
        over the candidate ids `cand` of x, in their order."""
        c = x[cand].astype(np.float64)
        if self.min_p > 0.0:
            keep = c >= c.max() + np.log(self.min_p)  # p_i >= min_p * p_max, in log space
            cand, c = cand[keep], c[keep]
        c = c / self.temperature
        p = np.exp(c - c.max())
        cdf = np.cumsum(p)
        u = self.rng.random() if u is None else u
        i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
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
