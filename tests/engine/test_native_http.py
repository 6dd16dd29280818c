"""The native backend through the real server: the openai client gets the engine's greedy text."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
from openai import OpenAI

from capibara6.backends.native import NativeBackend
from capibara6.engine.runner import Runner
from capibara6.types import GenerationOutcome, SamplingParams
from tests.conftest import gemma_registry
from tests.fakes import prepared
from tests.serverproc import ServerProcess

PROMPT = "The three primary colors are"


def test_native_over_http_matches_engine(gemma_path: Path, gemma_model, gemma_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    direct = NativeBackend("gemma3-270m-native", Runner(gemma_model, n_ctx=256, kv_cache="fp8", ops="kernels"), gemma_tokenizer, "gemma")
    expected = "".join(e.text for e in direct.generate(prepared(direct, PROMPT), SamplingParams(max_tokens=12, temperature=0.0), GenerationOutcome(), threading.Event()))
    native = {"backend": "native", "source": {"path": str(gemma_path)}, "chat_format": "gemma", "kv_cache": "fp8", "n_ctx": 256}
    srv = ServerProcess(gemma_registry(gemma_path, **{"gemma3-270m-native": native}), tmp_path).wait_healthy()
    try:
        client = OpenAI(base_url=srv.url["standard"] + "/v1", api_key="x", max_retries=0, timeout=300)
        out = client.completions.create(model="gemma3-270m-native", prompt=PROMPT, max_tokens=12, temperature=0)
        assert out.choices[0].text == expected and expected
        assert out.usage is not None and out.usage.completion_tokens == 12
        streamed = client.completions.create(model="gemma3-270m-native", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
        card = client.models.retrieve("gemma3-270m-native")
        assert card.model_extra and card.model_extra["status"] in ("ready", "busy")
        # What the FP8 cache really holds: one 256-token growth step of 18 layers x 520 bytes.
        metrics = httpx.get(srv.url["standard"] + "/metrics", timeout=30).text
        line = next(ln for ln in metrics.splitlines() if ln.startswith('capibara6_kv_cache_bytes{model="gemma3-270m-native"}'))
        assert float(line.split()[-1]) == direct.runner.kv.nbytes() > 0
    finally:
        srv.stop()


def test_native_parallel_batches_in_one_instance(gemma_path: Path, gemma_model, gemma_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """parallel: 2 on a native entry is ONE batched instance (one mapping, one paged KV pool) that
    runs both requests at once; each gets the single-sequence engine's greedy text."""
    direct = NativeBackend("n", Runner(gemma_model, n_ctx=256, kv_cache="fp8", ops="kernels"), gemma_tokenizer, "gemma")
    expected = "".join(e.text for e in direct.generate(prepared(direct, PROMPT), SamplingParams(max_tokens=16, temperature=0.0), GenerationOutcome(), threading.Event()))
    native = {"backend": "native", "source": {"path": str(gemma_path)}, "chat_format": "gemma", "kv_cache": "fp8",
              "n_ctx": 512, "parallel": 2}
    srv = ServerProcess(gemma_registry(gemma_path, **{"gemma3-270m-native": native}), tmp_path).wait_healthy()
    try:
        client = OpenAI(base_url=srv.url["standard"] + "/v1", api_key="x", max_retries=0, timeout=300)
        texts: list[str] = []

        def ask() -> None:
            out = client.completions.create(model="gemma3-270m-native", prompt=PROMPT, max_tokens=16, temperature=0)
            texts.append(out.choices[0].text)

        workers = [threading.Thread(target=ask) for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert texts == [expected, expected]
        info = httpx.get(srv.url["standard"] + "/admin/models", timeout=30).json()
        entry = next(m for m in info["data"] if m["id"] == "gemma3-270m-native")
        assert entry["instances"] == 1
    finally:
        srv.stop()
