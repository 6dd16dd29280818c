"""Backend contract v2: what every backend class and instance provides, and nothing hidden.

A backend class is chosen for a registry entry by `capibara6.backends.backend_class(spec)`; the
pool and the orchestrator talk to it only through these two protocols, never by probing with
`getattr` or branching on `spec.backend`:

- class side (`BackendClass`): `capabilities(spec)` (what requests it honours, checked before any
  lease so a refusal costs nothing), `max_concurrency(spec)` (leases one instance serves: 1, or
  `parallel` for a batching instance), `threads(spec)` (threads per instance: decided here, once),
  `estimate(spec, path)` (bytes before loading) and `load(model_id, spec, path, n_threads)`.
- instance side (`Backend`): `prepare(prompt)` templates and tokenizes in one place (a remote
  passes messages through honestly), `generate(prepared, params, outcome, cancel)` yields
  `TokenEvent`s and checks `cancel` between tokens, `embed(prepared_list, pooling, normalize)`
  (one vector per prepared input, many inputs per forward pass where the backend can), `tokenize`,
  `detokenize`, `set_threads` /
  `current_threads` (None: the instance's threads are not the caller's to change, e.g. shared by
  a batch), `kv_cache_bytes`, `memory_bytes`, `close`.

`generate` is synchronous and runs in a worker thread. It raises `ContextLengthExceeded` (and any
`BackendError`) when it is called, before any prefill, so a prompt's acceptance costs a
tokenization, not a prefill.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

import numpy as np

from ..types import Capabilities, Estimate, GenerationOutcome, Pooling, Prepared, Prompt, SamplingParams, TokenEvent

if TYPE_CHECKING:
    from ..config import ModelSpec


class Backend(Protocol):
    """A loaded model instance. One generation per lease; a batching one serves several at once."""

    model_id: str
    n_ctx: int

    def prepare(self, prompt: Prompt) -> Prepared:
        """Template (chat) and tokenize; raises InvalidPrompt for what this model cannot take."""
        ...

    def generate(
        self, prepared: Prepared, params: SamplingParams, outcome: GenerationOutcome, cancel: threading.Event
    ) -> Iterator[TokenEvent]:
        """Yield tokens until a stop string, EOS, max_tokens or `cancel`; fill `outcome`."""
        ...

    def embed(
        self, prepared: Sequence[Prepared], pooling: Pooling, normalize: bool, cancel: threading.Event | None = None
    ) -> list[np.ndarray]:
        """One float32 vector [n_embd] per prepared input, in order (final hidden states after the
        output norm, pooled; unit L2 norm if `normalize`). Raises InputTooLong naming the index of
        an input over the context, before computing anything; Unsupported if it cannot embed.
        Stops between batches once `cancel` is set (the result is then incomplete: discard it)."""
        ...

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Text -> token ids (special-token markup parsed as such); POST /tokenize."""
        ...

    def detokenize(self, ids: Sequence[int]) -> str:
        """Token ids -> text (the completions `echo` of a token prompt)."""
        ...

    def set_threads(self, n_threads: int) -> None:
        """Threads for the next generations (consensus splits the CPUs between experts)."""
        ...

    def current_threads(self) -> int | None:
        """This instance's own thread count; None when it is not the caller's to change."""
        ...

    def kv_cache_bytes(self) -> int:
        """Bytes the KV cache holds now."""
        ...

    def memory_bytes(self) -> int:
        """Best estimate of the bytes this instance holds (weights + KV cache)."""
        ...

    def close(self) -> None:
        """Free every native resource now (not at garbage collection)."""
        ...


class BackendClass(Protocol):
    """The class side: questions answered from the registry entry alone, before anything loads."""

    def capabilities(self, spec: ModelSpec) -> Capabilities: ...

    def max_concurrency(self, spec: ModelSpec) -> int: ...

    def threads(self, spec: ModelSpec) -> int: ...

    def estimate(self, spec: ModelSpec, path: Path | None) -> Estimate: ...

    def load(self, model_id: str, spec: ModelSpec, path: Path | None, n_threads: int) -> Backend: ...


__all__ = ["Backend", "BackendClass"]
