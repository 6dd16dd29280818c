"""SSM and hybrid experts through the real server and the real `openai` client.

Three tiny random-weight models (tests/backends/ssm_models.py): `mamba2` on the plain backend
(parallel 1), `rwkv7` batched (parallel 4), `falcon-h1` (hybrid) batched (parallel 2). Each
answer is compared with the text the plain backend gives in this process from a fresh load.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from openai import OpenAI

from capibara6.backends.llamacpp.plain import LlamaCppBackend
from capibara6.gguf_header import read_header, sequence_memory_bytes
from capibara6.types import GenerationOutcome, SamplingParams
from tests.fakes import prepared
from tests.serverproc import ServerProcess

from .ssm_models import WRITERS
from .test_ssm_llamacpp import spec

MODELS = {"mamba2": 1, "rwkv7": 4, "falcon-h1": 2}  # arch (= model id) -> parallel
PROMPTS = ["the cat sat on the mat", "a dog ran home", "the mat and the cat", "on a mat the dog sat"]
N_CTX = 4096
MAX_LONG = 4000  # tokens a cancelled stream may ask for


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ssm-files")
    return {arch: WRITERS[arch](tmp / f"tiny-{arch}.gguf") for arch in MODELS}


@pytest.fixture(scope="module")
def srv(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    models = {arch: {"source": {"path": str(path)}, "chat_format": "chatml", "parallel": MODELS[arch], "tags": ["long_context"]}
              for arch, path in files.items()}
    registry = {"defaults": {"n_ctx": N_CTX, "n_threads": 1, "prefill_chunk": 16}, "pool": {"max_loaded": 3}, "models": models}
    proc = ServerProcess(registry, tmp_path_factory.mktemp("ssm-server")).wait_healthy()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def expected(files: dict[str, Path]) -> dict[tuple[str, str], str]:
    """(model, prompt) -> greedy text of 10 tokens from a fresh plain backend."""
    out = {}
    for arch, path in files.items():
        for p in PROMPTS:
            b = LlamaCppBackend.load(arch, spec(path), path, 1)
            events = b.generate(prepared(b, p), SamplingParams(max_tokens=10, temperature=0.0), GenerationOutcome(), threading.Event())
            out[arch, p] = "".join(e.text for e in events)
            b.close()
    return out


def client(srv: ServerProcess, role: str = "standard") -> OpenAI:
    return OpenAI(base_url=srv.url[role] + "/v1", api_key="x", max_retries=0, timeout=120)


def metric(srv: ServerProcess, name: str, model: str) -> float:
    text = httpx.get(srv.url["standard"] + "/metrics", timeout=30).text
    line = next((ln for ln in text.splitlines() if ln.startswith(f'{name}{{model="{model}"')), None)
    return float(line.split()[-1]) if line else 0.0  # a counter appears at its first increment


@pytest.mark.parametrize("model", list(MODELS))
def test_greedy_streaming_and_n(srv: ServerProcess, expected: dict[tuple[str, str], str], model: str) -> None:
    c = client(srv)
    for p in PROMPTS[:2]:
        out = c.completions.create(model=model, prompt=p, max_tokens=10, temperature=0)
        assert out.choices[0].text == expected[model, p]
        assert out.usage is not None and out.usage.completion_tokens == 10
    stream = client(srv, "streaming").completions.create(model=model, prompt=PROMPTS[2], max_tokens=10, temperature=0, stream=True)
    pieces = [ch.choices[0].text for ch in stream if ch.choices]
    assert "".join(pieces) == expected[model, PROMPTS[2]] and len(pieces) >= 2
    many = c.completions.create(model=model, prompt=PROMPTS[3], max_tokens=10, temperature=0, n=3)
    assert [ch.text for ch in many.choices] == [expected[model, PROMPTS[3]]] * 3
    sampled = c.completions.create(model=model, prompt=PROMPTS[3], max_tokens=10, temperature=1.0, n=3, seed=7)
    assert len({ch.text for ch in sampled.choices}) > 1  # seed + i per choice: three different draws
    chat = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "the cat"}], max_tokens=5, temperature=0)
    assert chat.usage is not None and chat.usage.completion_tokens >= 1


@pytest.mark.parametrize("model", ["rwkv7", "falcon-h1"])
def test_parallel_sequences_without_cross_talk(srv: ServerProcess, expected: dict[tuple[str, str], str], model: str) -> None:
    got: dict[str, str] = {}

    def ask(p: str) -> None:
        got[p] = client(srv).completions.create(model=model, prompt=p, max_tokens=10, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == {p: expected[model, p] for p in PROMPTS}


@pytest.mark.parametrize("model", list(MODELS))
def test_cancelled_stream_frees_the_model(srv: ServerProcess, expected: dict[tuple[str, str], str], model: str) -> None:
    before = metric(srv, "capibara6_generation_tokens_total", model)
    with httpx.stream("POST", srv.url["streaming"] + "/v1/completions", timeout=60,
                      json={"model": model, "prompt": PROMPTS[1], "max_tokens": MAX_LONG, "temperature": 0}) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i == 4:
                break  # the client goes away mid-stream
    deadline = time.monotonic() + 30
    while metric(srv, "capibara6_num_requests_running", model) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(srv, "capibara6_num_requests_running", model) == 0
    assert metric(srv, "capibara6_generation_tokens_total", model) - before < MAX_LONG  # cut, not run out
    out = client(srv).completions.create(model=model, prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert out.choices[0].text == expected[model, PROMPTS[0]]


def test_kv_cache_metric_counts_states_per_sequence(srv: ServerProcess, files: dict[str, Path]) -> None:
    for arch, parallel in MODELS.items():
        client(srv).completions.create(model=arch, prompt="the cat", max_tokens=1)
        meta = read_header(files[arch]).metadata
        assert metric(srv, "capibara6_kv_cache_bytes", arch) == sequence_memory_bytes(meta, N_CTX, None, parallel) > 0


