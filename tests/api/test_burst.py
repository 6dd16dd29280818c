"""The default registry (models.yaml as shipped) serves a burst: 64 concurrent streams, none refused.

Before the defaults changed (parallel 1, max_queue 16) 20 concurrent streams got three 429s; the
burst test llama-server passes (32 concurrent streams) got 15. Queued requests cost no model
memory, so the queue is deep; the default model batches 4 streams per decode step.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Iterator

import httpx
import pytest
import yaml

from tests.serverproc import ROOT, ServerProcess

N_STREAMS = 64
pytestmark = pytest.mark.real_model  # the shipped registry's model, from its PyPI package


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    registry = yaml.safe_load((ROOT / "models.yaml").read_text())
    proc = ServerProcess(registry, tmp_path_factory.mktemp("burst")).wait_healthy()
    yield proc
    proc.stop()


def test_default_registry_batches_and_warms_the_default_model() -> None:
    registry = yaml.safe_load((ROOT / "models.yaml").read_text())
    assert registry["models"]["gemma3-270m"]["parallel"] > 1  # continuous batching on
    assert "gemma3-270m" in registry["pool"]["warmup"]
    assert registry["defaults"]["max_queue"] >= N_STREAMS


async def _stream(client: httpx.AsyncClient, url: str, i: int) -> dict[str, Any]:
    body = {"model": "gemma3-270m", "messages": [{"role": "user", "content": f"Count to {i % 7 + 2}."}],
            "max_tokens": 12, "temperature": 0.7, "seed": i}
    lines: list[str] = []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        status = r.status_code
        async for line in r.aiter_lines():
            if line:
                lines.append(line)
    data = [ln[len("data: "):] for ln in lines if ln.startswith("data: ")]
    finish = [c["choices"][0]["finish_reason"] for c in (json.loads(d) for d in data[:-1]) if c["choices"] and c["choices"][0].get("finish_reason")]
    return {"status": status, "last": data[-1] if data else None, "finish": finish}


def test_64_concurrent_streams_all_complete(default_server: ServerProcess) -> None:
    url = default_server.url["streaming"]  # stream defaults to true on 8083
    deadline = time.monotonic() + 300  # warmup: /ready is 200 once the default model has generated
    while httpx.get(url + "/ready", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "never ready"
        time.sleep(0.2)
    models = {m["id"]: m["status"] for m in httpx.get(url + "/v1/models").json()["data"]}
    assert models["gemma3-270m"] in ("ready", "busy")  # warmed up before any request

    async def burst() -> list[dict[str, Any]]:
        limits = httpx.Limits(max_connections=N_STREAMS + 4)
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
            return await asyncio.gather(*(_stream(client, url, i) for i in range(N_STREAMS)))

    results = asyncio.run(burst())
    statuses = [r["status"] for r in results]
    assert statuses.count(200) == N_STREAMS, statuses
    assert all(r["last"] == "[DONE]" for r in results)
    assert all(len(r["finish"]) == 1 and r["finish"][0] in ("stop", "length") for r in results)
    # every lease came back: nothing running, nothing waiting, no request refused
    metrics = {ln.split(" ")[0]: ln.rsplit(" ", 1)[1] for ln in httpx.get(url + "/metrics").text.splitlines() if ln and not ln.startswith("#")}
    assert float(metrics["capibara6_num_requests_running"]) == 0 and float(metrics["capibara6_num_requests_waiting"]) == 0
    assert not [k for k in metrics if k.startswith("capibara6_requests_total") and 'status="429"' in k]
