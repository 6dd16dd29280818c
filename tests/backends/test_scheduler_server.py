"""Continuous batching through the real server: pool leases, HTTP, SSE and the openai client."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from openai import OpenAI

from tests.conftest import gemma_registry
from tests.serverproc import ServerProcess

MODEL = "gemma3-270m"
SYSTEM = "You are a helpful assistant. Answer briefly and plainly, in one sentence, without lists."


@pytest.fixture(scope="module")
def batched_server(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    registry = gemma_registry(gemma_path)
    registry["models"][MODEL].update(parallel=4, n_ctx=2048, prefill_chunk=64)
    proc = ServerProcess(registry, tmp_path_factory.mktemp("sched-server"))
    yield proc.wait_healthy()
    proc.stop()


def test_concurrent_streams_run_together_and_reuse_the_system_prompt(batched_server: ServerProcess) -> None:
    client = OpenAI(base_url=batched_server.url["standard"] + "/v1", api_key="unused", max_retries=0, timeout=180)
    questions = ["What is the sea?", "Why is the sky blue?", "What is bread?", "Who was Ada Lovelace?"]
    first_at: dict[int, float] = {}
    done_at: dict[int, float] = {}
    texts: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            stream = client.chat.completions.create(
                model=MODEL, temperature=0, max_tokens=24, stream=True,
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": questions[i]}],
            )
            parts = []
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first_at.setdefault(i, time.monotonic())
                    parts.append(chunk.choices[0].delta.content)
            texts[i] = "".join(parts)
            done_at[i] = time.monotonic()
        except BaseException as err:
            errors.append(err)

    client.chat.completions.create(model=MODEL, max_tokens=1, messages=[{"role": "user", "content": "hi"}])  # load
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors
    assert all(texts.get(i) for i in range(4)), texts
    # one-at-a-time serving would start each stream after the previous one ended
    assert max(first_at.values()) < min(done_at.values()), "the streams did not run concurrently"
    metrics = httpx.get(batched_server.url["standard"] + "/metrics").text
    hits = [line for line in metrics.splitlines() if line.startswith(f'capibara6_prefix_cache_hits_total{{model="{MODEL}"}}')]
    assert hits and float(hits[0].split()[-1]) >= 1, "the shared system prompt was not reused"
