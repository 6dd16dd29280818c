"""Runs many sequences of one loaded GGUF model over a paged KV cache: one forward per step.

`BatchRunner.step` takes the scheduler's batch (a token, position and sequence id per row, and
which rows want logits) and evaluates it in ONE pass of the graph: decode rows of every running
sequence and chunks of waiting prompts together, so each weight matrix is read once per step
whatever the number of sequences (decode on a CPU is bound by reading the weights).

Exactness: every row takes the kernel path it takes when its sequence runs alone (weights.RowPlan:
the row kernels for decode rows and short chunks, the panel / GEMM kernels for long prompt chunks,
each row-independent), and attention is per sequence over its own blocks, bit-identical to the
contiguous kernel. So a sequence's logits equal the single-sequence Runner's bit for bit whenever
its prompt is cut into the same chunks (prompts that fit one step's prefill budget; a prompt
split differently between steps takes other tiles in windowed attention and may differ ~1e-6).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import numpy as np

from .gguf_loader import GGUFModel
from .paged_kv import PagedKV, Segment
from .runner import ModelRun


class BatchRunner(ModelRun):
    def __init__(
        self,
        model: GGUFModel,
        *,
        n_seq: int,
        n_ctx: int,
        kv_cache: str = "fp8",
        prefill_chunk: int = 256,
        block: int = 16,
        n_threads: int = 1,
        ops: str | ModuleType = "auto",
        matmul: str = "int16",
    ) -> None:
        """n_ctx: KV positions shared by all sequences (each may fill it alone, as llama.cpp's
        unified cache); n_seq: sequence ids 0..n_seq-1."""
        super().__init__(model, ops, matmul, n_threads)
        c = self.config
        self.n_ctx = n_ctx
        self.n_seq = n_seq
        self.kv = PagedKV(
            self.ops, n_layer=c.n_layer, n_head_kv=c.n_head_kv, head_dim_k=c.head_dim_k, head_dim_v=c.head_dim_v,
            dtype=kv_cache, windows=tuple(self.graph.window(il) for il in range(c.n_layer)),
            n_seq=n_seq, n_cells=n_ctx, block=block, max_chunk=prefill_chunk + n_seq,
        )

    def step(self, tokens: Sequence[int], pos: Sequence[int], seq_ids: Sequence[int], want: Sequence[bool]) -> np.ndarray:
        """Evaluate one batch; logits [rows wanting them, vocab] in batch order. Every sequence's
        rows must be consecutive positions starting at what it holds (`kv.length`). On an error
        no sequence advances (what was written past a sequence's length is never read)."""
        n = len(tokens)
        if not n:
            raise ValueError("a step needs at least one token")
        first: dict[int, int] = {}
        counts: dict[int, int] = {}
        for i, s in enumerate(seq_ids):
            first.setdefault(s, i)
            counts[s] = counts.get(s, 0) + 1
        order = sorted(range(n), key=lambda i: (first[seq_ids[i]], i))  # each sequence's rows together, in order
        segments: list[Segment] = []
        for s, count in counts.items():  # in order of first appearance, as `order`
            if not 0 <= s < self.n_seq:
                raise ValueError(f"sequence id {s} out of range 0..{self.n_seq - 1}")
            p0 = pos[first[s]]
            if p0 + count > self.n_ctx:
                raise ValueError(f"sequence {s} would exceed n_ctx={self.n_ctx}")
            segments.append(Segment(s, segments[-1].start + segments[-1].count if segments else 0, count, p0))
        toks = np.asarray([tokens[i] for i in order], dtype=np.int64)
        positions = np.asarray([pos[i] for i in order], dtype=np.int32)
        if not np.array_equal(positions, np.concatenate([np.arange(sg.pos, sg.pos + sg.count) for sg in segments])):
            raise ValueError("a sequence's positions in one step must be consecutive")
        where = {i: j for j, i in enumerate(order)}  # batch row -> row of the grouped pass
        out_rows = np.asarray([where[i] for i in range(n) if want[i]], dtype=np.int64)
        self.ops.use_threads(self.n_threads)
        try:
            self.kv.begin(segments)
            logits = self.graph.forward_batch(toks, positions, self.kv, [sg.count for sg in segments], out_rows)
        except BaseException:
            self.kv.abandon()
            raise
        self.kv.end()
        return logits

    def memory_bytes(self) -> int:
        return self.model.weight_bytes + self.kv.nbytes()

