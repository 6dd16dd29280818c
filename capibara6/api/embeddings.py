"""POST /v1/embeddings (OpenAI's shape) and POST /tokenize, /detokenize (llama-server's shape).

A thin HTTP layer: the request schemas (the field rule of capibara6/api/protocol.py: unknown
fields are a 400 naming them, OpenAI's no-effect fields such as `user` are dropped), then
`embed_inputs` / `tokenize_text` / `detokenize_ids`, which know nothing of HTTP: they lease the
model from the pool and run the backend in a worker thread, so the event loop never waits on a
forward pass. A client that disconnects cancels the request: the worker stops between batches
and the lease is given back only once the worker has returned (the instance is never shared
with a thread still inside it).

Embeddings are refused, before any lease, for a model whose registry entry has no `embedding`
(400 naming the model). Every input is tokenized and checked before anything is computed: one
over the model's context is a 400 `context_length_exceeded` naming its index. `dimensions`
keeps the first `dimensions` values and renormalises them (Matryoshka truncation), allowed where
the entry normalises its vectors; a vector of unit norm cut short is then scaled back to 1.

/tokenize and /detokenize take an optional `model` (llama-server serves one model and its
clients send none): absent, the first model of the registry answers.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Any, Callable, Literal, TypeVar, Union

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..backends import capabilities
from ..backends.base import Backend
from ..backends.pooling import normalized
from ..crash import model_context
from ..errors import InvalidRequest, ModelNotFound
from ..types import BackendError, InputTooLong, InvalidPrompt, Prompt, TextPrompt, TokenPrompt
from .protocol import _apply_rule
from .responses import counted
from .state import AppState, app_state

MAX_INPUTS = 2048  # inputs per request (OpenAI's limit)
MAX_TOTAL_TOKENS = 300_000  # tokens over all inputs of one request (OpenAI's limit)

T = TypeVar("T")
router = APIRouter()

EmbeddingInput = Union[str, list[str], list[int], list[list[int]]]


class EmbeddingRequest(BaseModel):
    """OpenAI's `EmbeddingCreateParams`: `user` has no effect; anything unknown is a 400."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _one_rule(cls, data: Any) -> Any:
        return _apply_rule(data, {})

    def prompts(self) -> list[Prompt]:
        """`input` as one prompt per input (text, or token ids); empty ones are a 400."""
        x = self.input
        if isinstance(x, str):
            items: list[str | list[int]] = [x]
        elif not x:
            raise InvalidRequest("input must not be empty.", param="input")
        elif all(isinstance(i, int) for i in x):
            items = [[i for i in x if isinstance(i, int)]]
        else:
            items = [i for i in x if isinstance(i, (str, list))]
        if len(items) > MAX_INPUTS:
            raise InvalidRequest(f"input has {len(items)} items; the limit is {MAX_INPUTS}.", param="input")
        for i, item in enumerate(items):
            if not item:
                raise InvalidRequest(f"input {i} is empty.", param="input")
        return [TextPrompt(i) if isinstance(i, str) else TokenPrompt(tuple(i)) for i in items]


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # capibara6's multi-model twist; absent: the registry's first model
    content: str
    add_special: bool = False  # llama-server's default: no BOS
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


# -- logic (no HTTP) ------------------------------------------------------------------------------


async def _leased(state: AppState, model: str, fn: Callable[[Backend, threading.Event], T]) -> T:
    """`fn(backend, cancel)` on a leased instance, in a worker thread. Cancelled: `cancel` is set
    and the lease is kept until the thread has returned."""
    async with state.pool.lease(model) as backend:
        cancel = threading.Event()

        def run() -> T:
            with model_context(model):  # a fatal signal in native code names the model
                return fn(backend, cancel)

        fut = asyncio.ensure_future(asyncio.to_thread(run))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            cancel.set()
            await asyncio.gather(fut, return_exceptions=True)
            raise


def _input_error(err: BackendError) -> InvalidRequest:
    """A backend's refusal of one input, with `param` input (never the completions' `prompt`)."""
    if isinstance(err, InputTooLong):
        return InvalidRequest(str(err), param="input", code="context_length_exceeded")
    return InvalidRequest(str(err), param="input" if isinstance(err, InvalidPrompt) else err.param, code=err.code)


def check_embedding_model(state: AppState, model: str) -> Any:
    """The entry's EmbeddingSpec; 404 for an unknown model, 400 naming one that does not embed."""
    spec = state.registry.models.get(model)
    if spec is None:
        raise ModelNotFound(model)
    if spec.embedding is None or not capabilities(spec).embeddings:
        raise InvalidRequest(
            f"Model '{model}' does not serve embeddings: its registry entry has no `embedding` "
            "(e.g. `embedding: {pooling: mean}`).", param="model", code="model_not_embedding",
        )
    return spec.embedding


async def embed_inputs(state: AppState, model: str, prompts: list[Prompt], dimensions: int | None) -> tuple[list[np.ndarray], int]:
    """(one vector per prompt, total input tokens). Every input is checked before any is computed."""
    emb = check_embedding_model(state, model)
    if dimensions is not None and not emb.normalize:
        raise InvalidRequest(f"Model '{model}' does not allow `dimensions`: its vectors are not normalised "
                             "(`embedding.normalize: false`), so a truncated one could not be.", param="dimensions")

    def job(backend: Backend, cancel: threading.Event) -> tuple[list[np.ndarray], int]:
        prepared = []
        total = 0
        for i, p in enumerate(prompts):
            try:
                one = backend.prepare(p)
            except BackendError as err:
                raise InvalidRequest(f"input {i}: {err}", param="input", code=err.code) from None
            if one.n_tokens > backend.n_ctx:
                raise _input_error(InputTooLong(i, one.n_tokens, backend.n_ctx))
            total += one.n_tokens
            prepared.append(one)
        if total > MAX_TOTAL_TOKENS:
            raise InvalidRequest(f"The inputs have {total} tokens together; the limit is {MAX_TOTAL_TOKENS}.", param="input")
        try:
            vecs = backend.embed(prepared, emb.pooling, emb.normalize, cancel)
        except BackendError as err:
            raise _input_error(err) from None
        if cancel.is_set():
            raise asyncio.CancelledError("client disconnected")
        return vecs, total

    vecs, total = await _leased(state, model, job)
    if dimensions is not None:
        if dimensions > vecs[0].shape[0]:
            raise InvalidRequest(f"dimensions is {dimensions}; model '{model}' has {vecs[0].shape[0]}.", param="dimensions")
        vecs = [normalized(v[:dimensions]) for v in vecs]
    return vecs, total


def _model_or_first(state: AppState, model: str | None) -> str:
    if model is None:
        return next(iter(state.registry.models))
    if model not in state.registry.models:
        raise ModelNotFound(model)
    return model


async def tokenize_text(
    state: AppState, model: str | None, text: str, add_special: bool, with_pieces: bool = False
) -> tuple[list[int], list[str]]:
    """(token ids, each one's text if `with_pieces`)."""
    mid = _model_or_first(state, model)

    def job(backend: Backend, cancel: threading.Event) -> tuple[list[int], list[str]]:
        try:
            ids = backend.tokenize(text, add_bos=add_special)
        except BackendError as err:
            raise InvalidRequest(str(err), param="content", code=err.code) from None
        return ids, [backend.detokenize([i]) for i in ids] if with_pieces else []

    return await _leased(state, mid, job)


async def detokenize_ids(state: AppState, model: str | None, ids: list[int]) -> str:
    mid = _model_or_first(state, model)

    def job(backend: Backend, cancel: threading.Event) -> str:
        if not ids:
            return ""
        try:
            backend.prepare(TokenPrompt(tuple(ids)))  # ids outside the vocabulary: a 400, never a crash in C
            return backend.detokenize(ids)
        except BackendError as err:
            raise InvalidRequest(str(err), param="tokens") from None

    return await _leased(state, mid, job)


# -- HTTP -----------------------------------------------------------------------------------------


def _encode(v: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":  # OpenAI's: the little-endian float32 bytes, base64
        return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in v.tolist()]


async def _until_disconnect(request: Request, work: asyncio.Future[T]) -> T:
    """Await `work`; cancel it when the client goes away (as api/responses.until_disconnect)."""
    while True:
        done, _ = await asyncio.wait({work}, timeout=0.05)
        if done:
            return work.result()
        if await request.is_disconnected():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            raise asyncio.CancelledError("client disconnected")


@router.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest, request: Request) -> Response:
    """Counted once in capibara6_requests_total{endpoint="embeddings"} (api/responses.py counted)."""
    return await counted(request, req.model, _embeddings(req, request))


async def _embeddings(req: EmbeddingRequest, request: Request) -> Response:
    state = app_state(request)
    m = state.pool.metrics
    prompts = req.prompts()
    vecs, total = await _until_disconnect(request, asyncio.ensure_future(embed_inputs(state, req.model, prompts, req.dimensions)))
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)} for i, v in enumerate(vecs)]
    m.embedding_requests.labels(req.model).inc()
    m.embedding_tokens.labels(req.model).inc(total)
    return JSONResponse({"object": "list", "data": data, "model": req.model,
                         "usage": {"prompt_tokens": total, "total_tokens": total}})


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request) -> dict[str, Any]:
    ids, pieces = await _until_disconnect(
        request, asyncio.ensure_future(tokenize_text(app_state(request), req.model, req.content, req.add_special, req.with_pieces)))
    if req.with_pieces:
        return {"tokens": [{"id": i, "piece": p} for i, p in zip(ids, pieces)]}
    return {"tokens": ids}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request) -> dict[str, Any]:
    content = await _until_disconnect(request, asyncio.ensure_future(detokenize_ids(app_state(request), req.model, req.tokens)))
    return {"content": content}


__all__ = ["MAX_INPUTS", "MAX_TOTAL_TOKENS", "EmbeddingRequest", "embed_inputs", "router", "tokenize_text"]
