"""Continuous batching with chunked prefill: many sequences, one context, one decode per step.

One scheduler thread per loaded model owns the native context. Request threads `submit` a
`SeqState` and read its events from a queue; the scheduler thread runs steps while any sequence
is admitted and sleeps on a condition variable otherwise (it never spins). Each step builds ONE
batch: first one decode token for every running sequence (latency first), then prompt tokens of
admitted-but-prefilling sequences, in arrival order, up to `prefill_chunk` tokens. So a long
prompt costs the running streams at most one chunk per step, never a whole prefill.

Admission is FIFO: the head joins at the next step when a slot (sequence id) is free and its
first KV budget fits the cells not budgeted to running sequences; otherwise it waits (queued,
never crashed). A budget is the prompt plus min(max_tokens, a fair share of the cache) and grows
by GROW cells as the sequence generates, so a request that omits max_tokens does not hold the
whole cache. When the cache is truly full the youngest running sequence is preempted: its KV is
dropped and it goes back to the head of the queue with its generated tokens appended to its
prompt, to be recomputed later (vLLM's "recompute" preemption); its stream just pauses. Finished sequences keep their KV in their slot as a
prefix cache: a new prompt that starts with tokens held by any slot (finished or still running)
reuses them (trim in place, or `seq_cp` in the unified KV cache, which shares cells, not copies).

`recurrent=True` (SSM, RWKV and hybrid models: one state per sequence id that summarises every
token fed, see batched.py) narrows prefix reuse to what such a state can do: a FINISHED slot whose
whole token history is a prefix of the new prompt continues in place; no trim, no copy from another
slot, no sharing with a running one. Preemption and eviction drop whole states, which works as
for KV.

The native calls sit behind `Decoder`, so scheduling can be tested with a scripted decoder; the
same scheduler drives llama.cpp (llamacpp/batched.py) and the native engine (native_batched.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol
from typing import Sequence as Seq

from ... import crash
from ...types import GenerationOutcome, SamplingParams

log = logging.getLogger("capibara6.scheduler")

GROW = 32  # KV cells a generating sequence's budget grows by
MIN_PREFIX_REUSE = 8  # shorter shared prefixes (BOS, chat header) are not worth a cache lookup


class Decoder(Protocol):
    """The native side the scheduler drives: llama.cpp (llamacpp/batched.py: LlamaDecoder) or our
    engine (backends/native_batched.py: NativeDecoder). May also have `reusable(seq_id, n) -> bool`,
    `keep(seq_id) -> Any` and `restore(seq_id, kept)` (see Scheduler.__init__)."""

    n_cells: int  # KV cells shared by all sequences

    def decode(self, tokens: Seq[int], pos: Seq[int], seq_ids: Seq[int], logits: Seq[bool]) -> None:
        """One llama_decode of the batch; raises on failure."""
        ...

    def sample(self, sampler: Any, index: int) -> int:
        """Sample from the logits of batch output row `index` (the i-th token with logits)."""
        ...

    def logprobs(self, index: int, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
        ...

    def is_eog(self, token: int) -> bool:
        ...

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> None:
        ...

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        ...

    def free_sampler(self, sampler: Any) -> None:
        ...


@dataclass(eq=False)
class SeqState:
    """One generation. Mutated by the scheduler thread only, except `abort` (any thread)."""

    prompt: list[int]
    params: SamplingParams
    sampler: Any = None
    events: queue.SimpleQueue[tuple[Any, ...]] = field(default_factory=queue.SimpleQueue)
    abort: str | None = None  # "cancel" (drop KV) | "stop" (keep KV as cache), set by the reader
    slot: int = -1
    n_past: int = 0  # tokens of this sequence whose KV is in the cache
    pending: int | None = None  # last sampled token, fed at the next step
    generated: int = 0
    reused: int = 0  # prompt tokens taken from the prefix cache
    kept: Any = None  # a preempted sequence's `decoder.keep(slot)`, handed to `decoder.restore` on recompute
    chunks: list[int] = field(default_factory=list)  # sizes of the prompt chunks as first fed
    replay: list[int] | None = None  # exact recompute: the chunk sizes still to feed (see _preempt)
    done: bool = False

    budget: int = 0  # KV cells set aside for this sequence now (grows while it generates)
    max_cells: int = 0  # worst case: the original prompt and every token it may generate

    def __post_init__(self) -> None:
        self.max_cells = len(self.prompt) + self.params.max_tokens


@dataclass
class StepStat:
    """What one step did (kept for tests, benchmarks and debugging)."""

    t0: float
    t1: float
    n_decode: int  # running sequences that got a token
    n_prefill: int  # prompt tokens processed
    decode_slots: tuple[int, ...]


@dataclass
class _Slot:
    owner: SeqState | None = None
    tokens: list[int] = field(default_factory=list)  # tokens whose KV this sequence id holds
    last_used: float = 0.0


class Scheduler:
    def __init__(
        self,
        decoder: Decoder,
        n_slots: int,
        prefill_chunk: int,
        *,
        on_prefix_hit: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        keep_stats: int = 4096,
        model_id: str | None = None,
        recurrent: bool = False,
    ) -> None:
        """`model_id`: named by the crash log line if a decode dies by a fatal signal; None: the
        model the creating thread runs (the pool builds a backend, hence its scheduler, inside
        that model's `crash.model_context`)."""
        self.model_id = model_id if model_id is not None else crash.current_model()
        self.decoder = decoder
        # optional on a Decoder: `reusable(seq_id, n)`, False when the first n positions of that
        # sequence can no longer be continued (the native paged cache frees out-of-window blocks)
        self._reusable: Callable[[int, int], bool] | None = getattr(decoder, "reusable", None)
        # optional too: `keep(seq_id)` before a preemption drops a sequence, `restore(seq_id, kept)`
        # when it is recomputed from scratch (the native cache keeps its FP8 key shift this way)
        self._keep: Callable[[int], Any] | None = getattr(decoder, "keep", None)
        self._restore: Callable[[int, Any], None] | None = getattr(decoder, "restore", None)
        # and `exact_recompute = True`: a preempted sequence is recomputed in the chunks it was
        # first computed in (its prompt's chunks, then its generated tokens one per step, as they
        # were decoded), so a decoder whose rows are batch-independent gives it the same logits
        self._exact_recompute = bool(getattr(decoder, "exact_recompute", False))
        self.prefill_chunk = prefill_chunk
        self.recurrent = recurrent  # whole-state reuse only (see the module docstring)
        self._slots = [_Slot() for _ in range(n_slots)]
        self._waiting: list[SeqState] = []  # FIFO, guarded by _cond
        self._running: list[SeqState] = []  # admission order, scheduler thread only
        self._cond = threading.Condition()
        self._closed = False
        self._held = 0
        self._on_prefix_hit = on_prefix_hit
        self._clock = clock
        self._keep_stats = keep_stats
        self.stats: list[StepStat] = []
        self.peak_running = 0
        self.preemptions = 0
        self._thread = threading.Thread(target=self._loop, name="capibara6-sched", daemon=True)
        self._thread.start()

    # -- request threads ---------------------------------------------------------------------

    def submit(self, seq: SeqState) -> None:
        if seq.max_cells > self.decoder.n_cells:
            raise ValueError(f"sequence needs {seq.max_cells} KV cells; the cache has {self.decoder.n_cells}")
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._waiting.append(seq)
            self._cond.notify()

    def abort(self, seq: SeqState, reason: str) -> None:
        """Stop a sequence before its next step ("cancel" drops its KV, "stop" keeps it cached)."""
        with self._cond:
            if not seq.done and seq.abort is None:
                seq.abort = reason
                self._cond.notify()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Admit nothing while held, then everything that fits at one step (tests, benchmarks)."""
        with self._cond:
            self._held += 1
        try:
            yield
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        for seq in [*self._waiting, *self._running]:
            self._finish(seq, ("error", RuntimeError("the model was unloaded")))

    # -- scheduler thread --------------------------------------------------------------------

    def _loop(self) -> None:
        with crash.model_context(self.model_id):  # this thread runs every decode of the model
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._work_ready():
                    self._cond.wait()
                if self._closed:
                    return
                self._reap_aborted()
                self._admit()
            if self._running:
                try:
                    self._step()
                except Exception as err:  # a failed decode ends every sequence in it, not the thread
                    log.exception("scheduler step failed")
                    for seq in list(self._running):
                        self._finish(seq, ("error", err), drop_kv=True)

    def _work_ready(self) -> bool:
        return bool(self._running) or any(s.abort for s in self._waiting) or self._can_admit_head()

    def _reap_aborted(self) -> None:
        for seq in [s for s in self._waiting if s.abort]:
            self._waiting.remove(seq)
            self._finish(seq, None)
        for seq in [s for s in self._running if s.abort]:
            self._finish(seq, None, drop_kv=seq.abort == "cancel")

    def _reserved(self) -> int:
        held = sum(s.budget for s in self._running)
        cached = sum(len(sl.tokens) for sl in self._slots if sl.owner is None)
        return held + cached

    def _can_admit_head(self) -> bool:
        if self._held or not self._waiting or all(sl.owner is not None for sl in self._slots):
            return False
        running = sum(s.budget for s in self._running)
        return running + self._first_budget(self._waiting[0]) <= self.decoder.n_cells  # cached KV can be evicted

    def _first_budget(self, seq: SeqState) -> int:
        fair = self.decoder.n_cells // len(self._slots)
        return min(seq.max_cells, max(len(seq.prompt) + GROW, fair))

    def _admit(self) -> None:
        while self._can_admit_head():
            seq = self._waiting.pop(0)
            src, k = self._best_prefix(seq.prompt) if seq.replay is None else (-1, 0)
            seq.budget = self._first_budget(seq)
            self._make_room(seq.budget, keep=src)
            self._place(seq, src, k)
            self._running.append(seq)
            self.peak_running = max(self.peak_running, len(self._running))

    def _best_prefix(self, prompt: list[int]) -> tuple[int, int]:
        """(slot, tokens) of the longest cached prefix of `prompt`; ties prefer finished slots."""
        limit = len(prompt) - 1  # the last prompt token is always decoded (we need its logits)
        best, key = (-1, 0), (0, False)
        for i, sl in enumerate(self._slots):
            k = _common_prefix(sl.tokens, prompt, limit)
            if self.recurrent and (sl.owner is not None or k != len(sl.tokens)):
                continue  # a state cannot be cut back or shared: only a finished, whole history
            if k and self._reusable is not None and not self._reusable(i, k):
                continue  # a sliding-window layer no longer holds what the next query would see
            if (k, sl.owner is None) > key:
                best, key = (i, k), (k, sl.owner is None)
        return best if best[1] >= MIN_PREFIX_REUSE else (-1, 0)

    def _make_room(self, need: int, keep: int = -1) -> bool:
        """Evict cached (finished) sequences' KV, least recently used first, until `need` fits."""
        free = [sl for i, sl in enumerate(self._slots) if sl.owner is None and sl.tokens and i != keep]
        free.sort(key=lambda sl: sl.last_used)
        if keep >= 0 and self._slots[keep].owner is None:
            free.append(self._slots[keep])  # the prefix source goes last
        while self._reserved() + need > self.decoder.n_cells and free:
            sl = free.pop(0)
            self.decoder.seq_rm(self._slots.index(sl), 0, -1)
            sl.tokens = []
        return self._reserved() + need <= self.decoder.n_cells

    def _grow_budgets(self) -> None:
        """Before a step: every decoding sequence needs a cell for its next token."""
        for seq in list(self._running):  # oldest first: the oldest always progresses
            if seq not in self._running or seq.pending is None or seq.n_past < seq.budget:
                continue
            grow = max(1, min(GROW, seq.max_cells - seq.budget))
            while not self._make_room(grow):
                victim = self._running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                seq.budget += grow

    def _preempt(self, seq: SeqState) -> None:
        """Drop `seq`'s KV and queue it first again, its generated tokens now part of its prompt."""
        sl = self._slots[seq.slot]
        # a decoding sequence: its KV tokens + the sampled one; a prefilling one: its whole prompt
        tokens = [*sl.tokens, seq.pending] if seq.pending is not None else seq.prompt
        if self._keep is not None:
            seq.kept = self._keep(seq.slot)
        if self._exact_recompute:
            fed = sum(seq.chunks)
            seq.replay = [*seq.chunks, *([1] * (len(tokens) - fed if seq.pending is not None else 0))]
        self.decoder.seq_rm(seq.slot, 0, -1)
        sl.owner, sl.tokens = None, []
        self._running.remove(seq)
        seq.prompt, seq.pending, seq.n_past, seq.budget, seq.slot = tokens, None, 0, 0, -1
        self.preemptions += 1
        with self._cond:
            self._waiting.insert(0, seq)

    def _place(self, seq: SeqState, src: int, k: int) -> None:
        """Give `seq` a free slot holding the first `k` prompt tokens of slot `src` (if k > 0)."""
        if src >= 0 and k > len(self._slots[src].tokens):
            src, k = -1, 0  # the source was evicted to make room
        if src >= 0 and self._slots[src].owner is None:
            dst = src  # trim the cached sequence in place
        else:
            dst = min(
                (i for i, sl in enumerate(self._slots) if sl.owner is None),
                key=lambda i: (len(self._slots[i].tokens) > 0, self._slots[i].last_used),
            )
        if dst == src:
            self.decoder.seq_rm(dst, k, -1)
        else:
            self.decoder.seq_rm(dst, 0, -1)
            if src >= 0:
                self.decoder.seq_cp(src, dst, 0, k)
        sl = self._slots[dst]
        sl.owner, sl.tokens = seq, seq.prompt[:k]
        seq.slot, seq.n_past, seq.reused = dst, k, k
        if seq.kept is not None and k == 0 and self._restore is not None:
            self._restore(dst, seq.kept)  # recompute as the sequence was first computed
        seq.kept = None
        if k and self._on_prefix_hit is not None:
            self._on_prefix_hit(k)

    def _step(self) -> None:
        self._grow_budgets()
        if not self._running:
            return
        tokens: list[int] = []
        pos: list[int] = []
        ids: list[int] = []
        logits: list[bool] = []
        outputs: list[SeqState] = []  # one per token with logits, in batch order
        decoding = [s for s in self._running if s.pending is not None]
        for seq in decoding:
            tokens.append(seq.pending)  # type: ignore[arg-type]
            pos.append(seq.n_past)
            ids.append(seq.slot)
            logits.append(True)
            outputs.append(seq)
        budget = self.prefill_chunk
        fed: list[tuple[SeqState, int]] = []
        for seq in self._running:
            if budget == 0:
                break
            if seq.pending is not None:
                continue
            if seq.replay:
                if seq.replay[0] > budget:
                    continue  # the next step has the room (a recorded chunk fitted one step's budget)
                take = seq.replay.pop(0)
            else:
                take = min(budget, len(seq.prompt) - seq.n_past)
                if seq.replay is None:
                    seq.chunks.append(take)
            last = seq.n_past + take == len(seq.prompt)
            for j in range(take):
                tokens.append(seq.prompt[seq.n_past + j])
                pos.append(seq.n_past + j)
                ids.append(seq.slot)
                logits.append(last and j == take - 1)
            if last:
                outputs.append(seq)
            fed.append((seq, take))
            budget -= take
        t0 = self._clock()
        self.decoder.decode(tokens, pos, ids, logits)
        for seq in decoding:
            self._slots[seq.slot].tokens.append(seq.pending)  # type: ignore[arg-type]
            seq.n_past += 1
        for seq, take in fed:
            self._slots[seq.slot].tokens.extend(seq.prompt[seq.n_past : seq.n_past + take])
            seq.n_past += take
        for index, seq in enumerate(outputs):
            self._sampled(seq, index)
        self._record(StepStat(t0, self._clock(), len(decoding), sum(t for _, t in fed), tuple(s.slot for s in decoding)))

    def _sampled(self, seq: SeqState, index: int) -> None:
        token = self.decoder.sample(seq.sampler, index)
        if self.decoder.is_eog(token):
            self._finish(seq, ("end", "stop"))
            return
        lp = self.decoder.logprobs(index, token, seq.params.logprobs) if seq.params.logprobs is not None else None
        seq.generated += 1
        seq.events.put(("token", token, lp))
        if seq.generated >= seq.params.max_tokens:
            self._finish(seq, ("end", "length"))
        else:
            seq.pending = token

    def _finish(self, seq: SeqState, event: tuple[Any, ...] | None, *, drop_kv: bool = False) -> None:
        # the slot first, then `running`: a reader that sees the count drop sees the slot settled
        if 0 <= seq.slot < len(self._slots) and self._slots[seq.slot].owner is seq:
            sl = self._slots[seq.slot]
            sl.owner, sl.last_used = None, self._clock()
            if drop_kv:
                self.decoder.seq_rm(seq.slot, 0, -1)
                sl.tokens = []
        if seq in self._running:
            self._running.remove(seq)
        if seq.sampler is not None:
            self.decoder.free_sampler(seq.sampler)
            seq.sampler = None
        seq.done = True
        if event is not None:
            seq.events.put(event)

    def _record(self, stat: StepStat) -> None:
        self.stats.append(stat)
        if len(self.stats) > self._keep_stats:
            del self.stats[: len(self.stats) // 2]


def submit_new(scheduler: Scheduler, decoder: Any, tokens: list[int], params: SamplingParams) -> SeqState:
    """A sequence with its own sampler (`decoder.new_sampler`: a bad grammar raises here, before
    anything streams), queued on `scheduler`; the sampler is freed if the queueing fails."""
    seq = SeqState(tokens, params, sampler=decoder.new_sampler(params))
    try:
        scheduler.submit(seq)
    except BaseException:
        decoder.free_sampler(seq.sampler)
        raise
    return seq


def read_tokens(seq: SeqState, outcome: GenerationOutcome, cancel: threading.Event, poll_s: float) -> Iterator[tuple[int, Any]]:
    """A request thread's side of a sequence: (token, logprobs or None) as the scheduler emits
    them, counted into `outcome`. Ends when the sequence ends (outcome.finish_reason set) or when
    `cancel` is set (re-checked every poll_s while waiting); a failed step is raised."""
    while True:
        try:
            item = seq.events.get(timeout=poll_s)
        except queue.Empty:
            if cancel.is_set():
                return
            continue
        if cancel.is_set():
            return
        if item[0] == "end":
            outcome.finish_reason = item[1]
            return
        if item[0] == "error":
            raise item[1]
        outcome.completion_tokens += 1
        outcome.cached_tokens = seq.reused
        yield item[1], item[2]


def _common_prefix(a: Seq[int], b: Seq[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
