"""Remote backend: another OpenAI-compatible server (a capibara6 on another C4A VM, llama-server,
vLLM, ...) reached over HTTP with httpx, behind the same Backend interface as a local model.

There is no local tokenizer: `prepare` keeps the prompt as it came (chat messages, text or token
ids) and estimates its size (4 bytes a token) for our prompt limit. A chat request reaches the
remote `/v1/chat/completions` as messages and the remote server applies its own model's chat
template (the only one that is right for its model); text and token prompts go to
`/v1/completions`. What the remote is not asked for is refused by `capabilities`, never dropped:
OpenAI's own fields (seed, penalties, stop, logit_bias) pass through; grammar, logprobs and
llama.cpp's extensions (top_k, min_p, repeat_penalty) are 400s on a remote model. Both stream (SSE); each content delta becomes one TokenEvent, and the remote's
`usage` (asked for with stream_options.include_usage) fills the outcome's token counts.

Cancellation: `cancel` is checked between chunks, and a watcher shuts the socket down as soon as
it is set, so a remote that stalls mid-answer cannot hold the lease (the remote server sees the
disconnect and stops generating too).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import httpx
import numpy as np

from ..errors import InvalidRequest, ServiceUnavailable
from ..types import (
    ZERO_ESTIMATE,
    Capabilities,
    ChatPrompt,
    Estimate,
    GenerationOutcome,
    Pooling,
    Prepared,
    Prompt,
    SamplingParams,
    TextPrompt,
    TokenEvent,
    Unsupported,
)

if TYPE_CHECKING:
    from ..config import ModelSpec

_BYTES_PER_TOKEN = 4  # prompt-size estimate without a tokenizer
CONNECT_TIMEOUT_S = 5.0
CAPABILITIES = Capabilities(
    grammar=False, logprobs=False, top_k=False, min_p=False, repeat_penalty=False, echo=False, local=False, tools=False
)


def estimate_tokens(prompt: Prompt) -> int:
    """A prompt's size in tokens without a tokenizer (only our prompt limit uses it)."""
    if isinstance(prompt, ChatPrompt):
        size = sum(len(str(m.get("content") or "")) + 4 * _BYTES_PER_TOKEN for m in prompt.messages)
    elif isinstance(prompt, TextPrompt):
        size = len(prompt.text)
    else:
        return len(prompt.ids)
    return max(1, size // _BYTES_PER_TOKEN)


def base_url(url: str) -> str:
    """'http://h:8082/v1/' -> 'http://h:8082' (endpoints are added with their /v1 prefix)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


class RemoteBackend:
    def __init__(self, model_id: str, client: httpx.Client, remote_model: str, n_ctx: int) -> None:
        self.model_id = model_id
        self.n_ctx = n_ctx
        self.remote_model = remote_model
        self._client = client

    # -- class side (backends/base.py BackendClass) --------------------------------------------

    @classmethod
    def capabilities(cls, spec: ModelSpec) -> Capabilities:
        return CAPABILITIES

    @classmethod
    def max_concurrency(cls, spec: ModelSpec) -> int:
        return 1

    @classmethod
    def threads(cls, spec: ModelSpec) -> int:
        return 1  # no local inference

    @classmethod
    def estimate(cls, spec: ModelSpec, path: Path | None) -> Estimate:
        return ZERO_ESTIMATE  # the weights live on the remote server

    @classmethod
    def load(cls, model_id: str, spec: ModelSpec, path: Path | None, n_threads: int) -> RemoteBackend:
        """Check that the remote answers /v1/models; no weights are loaded here (n_threads unused)."""
        headers = {}
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise ValueError(f"environment variable {spec.api_key_env} (api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key}"
        assert spec.source.url is not None
        url = base_url(spec.source.url)
        timeout = httpx.Timeout(connect=CONNECT_TIMEOUT_S, read=spec.queue_timeout_s + 60.0, write=30.0, pool=30.0)
        client = httpx.Client(base_url=url, headers=headers, timeout=timeout)
        try:
            r = client.get("/v1/models", timeout=CONNECT_TIMEOUT_S)
            r.raise_for_status()
        except httpx.HTTPError as err:
            client.close()
            raise ConnectionError(f"remote server {url} is not answering /v1/models: {err}") from None
        return cls(model_id, client, spec.remote_model or model_id, spec.n_ctx)

    # -- instance side (backends/base.py Backend) ----------------------------------------------

    def prepare(self, prompt: Prompt) -> Prepared:
        """The prompt as it came: the remote templates and tokenizes for its own model."""
        text = prompt.text if isinstance(prompt, TextPrompt) else None
        return Prepared(prompt, None, estimate_tokens(prompt), (), text)

    def detokenize(self, ids: Sequence[int]) -> str:
        raise Unsupported(self.model_id, "tokens", "a remote model has no local vocabulary")  # capabilities: echo=False

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        raise Unsupported(self.model_id, "content", "a remote model has no local vocabulary")

    def embed(
        self, prepared: Sequence[Prepared], pooling: Pooling, normalize: bool, cancel: threading.Event | None = None
    ) -> list[np.ndarray]:
        """Refused (capabilities: embeddings=False, and config refuses `embedding` on a remote
        entry): the remote's pooling and normalisation are its own, not what the entry would say."""
        raise Unsupported(self.model_id, "input", "a remote model does not embed here; register it where it runs")

    def set_threads(self, n_threads: int) -> None:
        return None  # nothing runs here

    def current_threads(self) -> int | None:
        return None

    def kv_cache_bytes(self) -> int:
        return 0

    def generate(
        self, prepared: Prepared, params: SamplingParams, outcome: GenerationOutcome, cancel: threading.Event
    ) -> Iterator[TokenEvent]:
        body = self._body(params)
        prompt = prepared.prompt
        if isinstance(prompt, ChatPrompt):
            path, body["messages"] = "/v1/chat/completions", list(prompt.messages)
        else:
            path = "/v1/completions"
            body["prompt"] = prompt.text if isinstance(prompt, TextPrompt) else list(prompt.ids)
        outcome.prompt_tokens = prepared.n_tokens  # an estimate until the remote's usage arrives
        return self._stream(path, body, outcome, cancel)

    def _body(self, p: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.remote_model, "max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p,
            "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
            "stream": True, "stream_options": {"include_usage": True},
        }
        if p.seed is not None:
            body["seed"] = p.seed
        if p.stop:
            body["stop"] = list(p.stop)
        if p.logit_bias:
            body["logit_bias"] = {str(t): b for t, b in p.logit_bias}
        return body

    def _stream(self, path: str, body: dict[str, Any], outcome: GenerationOutcome, cancel: threading.Event) -> Iterator[TokenEvent]:
        done = threading.Event()
        try:
            with self._client.stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    _raise_remote(resp)
                threading.Thread(target=_watch, args=(resp, cancel, done), daemon=True).start()
                counted = 0
                for line in resp.iter_lines():
                    if cancel.is_set():
                        return
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        outcome.prompt_tokens = int(chunk["usage"].get("prompt_tokens", outcome.prompt_tokens))
                        outcome.completion_tokens = int(chunk["usage"].get("completion_tokens", counted))
                    for choice in chunk.get("choices") or []:
                        text = _choice_text(choice)
                        if choice.get("finish_reason"):
                            outcome.finish_reason = choice["finish_reason"]
                        if text:
                            counted += 1
                            outcome.completion_tokens = max(outcome.completion_tokens, counted)
                            yield TokenEvent(-1, text)
        except httpx.HTTPError as err:
            if cancel.is_set():
                return  # our own watcher closed the socket
            raise ServiceUnavailable(f"remote model '{self.model_id}' failed: {err}") from None
        finally:
            done.set()

    def memory_bytes(self) -> int:
        return 0

    def close(self) -> None:
        self._client.close()


def _choice_text(choice: dict[str, Any]) -> str:
    if "delta" in choice:
        return str((choice.get("delta") or {}).get("content") or "")
    return str(choice.get("text") or "")


def _raise_remote(resp: httpx.Response) -> None:
    resp.read()
    try:
        message = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = resp.text[:500]
    if 400 <= resp.status_code < 500:
        raise InvalidRequest(f"remote server: {message}")
    raise ServiceUnavailable(f"remote server answered {resp.status_code}: {message}")


def _watch(resp: httpx.Response, cancel: threading.Event, done: threading.Event) -> None:
    """Shut the connection's socket down when `cancel` is set, waking a read blocked on it."""
    while not done.is_set():
        if cancel.wait(0.05):
            stream = resp.extensions.get("network_stream")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if isinstance(sock, socket.socket):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return
