"""Remote backend: another OpenAI-compatible server (a capibara6 on another C4A VM, llama-server,
vLLM, ...) reached over HTTP with httpx, behind the same Backend interface as a local model.

There is no local tokenizer, so `tokenize` returns a `RemotePrompt`: a list of placeholder ids
whose length estimates the token count (for our prompt-size limits) and which carries the text.
`chat_prompt` does not apply a template: it encodes the messages themselves, so a chat request
reaches the remote `/v1/chat/completions` as messages and the remote server applies its own
model's chat template (the only one that is right for its model). Plain prompts go to
`/v1/completions`. Both stream (SSE); each content delta becomes one TokenEvent, and the remote's
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
from typing import Any, Iterator, Sequence

import httpx

from ..errors import InvalidRequest, ServiceUnavailable
from .base import GenerationOutcome, SamplingParams, TokenEvent

_CHAT_MARK = "\x00capibara6-remote-chat\x00"
_BYTES_PER_TOKEN = 4  # prompt-size estimate without a tokenizer
CONNECT_TIMEOUT_S = 5.0


class RemotePrompt(list):  # type: ignore[type-arg]
    """Placeholder token ids (len = estimated tokens) carrying the real text or chat messages."""

    def __init__(self, text: str | None = None, messages: list[dict[str, Any]] | None = None) -> None:
        size = len(text or "") if messages is None else sum(len(str(m.get("content") or "")) + 4 for m in messages)
        super().__init__([0] * max(1, size // _BYTES_PER_TOKEN))
        self.text = text
        self.messages = messages


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

    @classmethod
    def load(cls, model_id: str, path: Any, spec: Any, n_threads: int) -> "RemoteBackend":
        """Check that the remote answers /v1/models; no weights are loaded here (n_threads unused)."""
        headers = {}
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise ValueError(f"environment variable {spec.api_key_env} (api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key}"
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

    # -- Backend protocol ---------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        if text.startswith(_CHAT_MARK):
            return RemotePrompt(messages=json.loads(text[len(_CHAT_MARK):]))
        return RemotePrompt(text=text)

    def chat_prompt(self, messages: Sequence[dict[str, object]]) -> tuple[str, tuple[str, ...]]:
        return _CHAT_MARK + json.dumps(list(messages), ensure_ascii=False), ()

    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        outcome: GenerationOutcome,
        cancel: threading.Event,
    ) -> Iterator[TokenEvent]:
        if isinstance(prompt, str):
            prompt = self.tokenize(prompt)
        body = self._body(params)
        if isinstance(prompt, RemotePrompt) and prompt.messages is not None:
            path, body["messages"] = "/v1/chat/completions", prompt.messages
        else:
            path = "/v1/completions"
            body["prompt"] = prompt.text if isinstance(prompt, RemotePrompt) else list(prompt)
        outcome.prompt_tokens = len(prompt)  # an estimate until the remote's usage arrives
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
