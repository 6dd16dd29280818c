"""The pool through a real server subprocess: warmup gating /ready, queue limits over HTTP,
disconnect while queued, the admin routes and `capibara6 models --url`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from capibara6.cli import main as cli_main
from tests.conftest import gemma_registry
from tests.serverproc import ServerProcess, free_port

MODEL = "gemma3-270m"
LONG = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 1000, "temperature": 0, "stop": [], "stream": True}  # greedy counting runs on


def same_file(gemma_path: Path, **fields: Any) -> dict[str, Any]:
    return {"source": {"path": str(gemma_path)}, "chat_format": "gemma", **fields}


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err  # type: ignore[no-any-return]


class Holder:
    """A streaming request that keeps a model busy until closed."""

    def __init__(self, url: str, model: str) -> None:
        self._client = httpx.Client(timeout=60)
        self._cm = self._client.stream("POST", url + "/v1/completions", json={"model": model, **LONG})
        r = self._cm.__enter__()
        assert r.status_code == 200
        self._lines = r.iter_lines()  # kept: a collected iterator would close the response
        assert any(next(self._lines).startswith("data: ") for _ in range(4))  # generating now

    def close(self) -> None:
        self._cm.__exit__(None, None, None)
        self._client.close()


@pytest.fixture(scope="module")
def qserver(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    registry = gemma_registry(
        gemma_path,
        q0=same_file(gemma_path, max_queue=0),
        qt=same_file(gemma_path, queue_timeout_s=0.5),
    )
    proc = ServerProcess(registry, tmp_path_factory.mktemp("qserver")).wait_healthy()
    yield proc
    proc.stop()


def test_warmup_gates_ready(gemma_path: Path, tmp_path: Path) -> None:
    registry = gemma_registry(gemma_path, warm2=same_file(gemma_path))
    registry["pool"]["warmup"] = [MODEL, "warm2"]
    proc = ServerProcess(registry, tmp_path).wait_healthy()
    try:
        url = proc.url["standard"]
        first = httpx.get(url + "/ready", timeout=5)
        assert first.status_code == 503 and first.json()["status"] == "warming_up"
        assert httpx.get(url + "/health", timeout=5).status_code == 200  # listening while warming
        deadline = time.monotonic() + 90
        while httpx.get(url + "/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, proc.log.read_text()
            time.sleep(0.1)
        states = {m["id"]: m["status"] for m in httpx.get(url + "/v1/models", timeout=5).json()["data"]}
        assert states == {MODEL: "ready", "warm2": "ready"}
        metrics = httpx.get(url + "/metrics", timeout=5).text
        assert f'capibara6_model_loads_total{{model="{MODEL}"}} 1.0' in metrics
    finally:
        proc.stop()


def test_queue_full_429_and_queue_timeout_503(qserver: ServerProcess) -> None:
    url = qserver.url["standard"]
    body = {"prompt": "Hi", "max_tokens": 2}
    held = Holder(url, "q0")
    try:
        r = httpx.post(url + "/v1/completions", json={"model": "q0", **body}, timeout=30)
        err = _error(r, 429)
        assert err["code"] == "queue_full" and r.headers["retry-after"].isdigit()
    finally:
        held.close()
    held = Holder(url, "qt")
    try:
        t0 = time.monotonic()
        err = _error(httpx.post(url + "/v1/completions", json={"model": "qt", **body}, timeout=30), 503)
        assert err["code"] == "queue_timeout" and time.monotonic() - t0 >= 0.45
    finally:
        held.close()
    for mid in ("q0", "qt"):  # both queues drained: the next request is served
        assert httpx.post(url + "/v1/completions", json={"model": mid, **body}, timeout=60).status_code == 200


def test_disconnect_while_queued_frees_the_place(qserver: ServerProcess) -> None:
    url = qserver.url["standard"]
    held = Holder(url, MODEL)
    try:
        with pytest.raises(httpx.ReadTimeout):  # queued behind the stream, then gone
            httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=httpx.Timeout(30, read=1.0))
        deadline = time.monotonic() + 5
        while _describe(url, MODEL)["waiting"] != 0:
            assert time.monotonic() < deadline, "the disconnected waiter stayed queued"
            time.sleep(0.05)
        assert _describe(url, MODEL)["leases"] == 1
    finally:
        held.close()
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
    assert _describe(url, MODEL)["leases"] == 0


def _describe(url: str, mid: str) -> dict[str, Any]:
    data = httpx.get(url + "/admin/models", timeout=5).json()["data"]
    return next(m for m in data if m["id"] == mid)  # type: ignore[no-any-return]


def test_admin_load_unload(qserver: ServerProcess) -> None:
    url = qserver.url["standard"]
    r = httpx.post(url + "/admin/models/qt/load", timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "ready"
    held = Holder(url, "qt")
    try:
        err = _error(httpx.post(url + "/admin/models/qt/unload", timeout=10), 409)
        assert err["code"] == "model_busy"
    finally:
        held.close()
    deadline = time.monotonic() + 10
    while (r := httpx.post(url + "/admin/models/qt/unload", timeout=30)).status_code == 409:
        assert time.monotonic() < deadline  # the cancelled stream returns its lease promptly
        time.sleep(0.05)
    assert r.status_code == 200 and r.json()["status"] == "unloaded" and r.json()["unloaded"] is True
    card = httpx.get(url + "/v1/models/qt", timeout=5).json()
    assert card["status"] == "unloaded"
    assert 'capibara6_model_unloads_total{model="qt",reason="admin"} 1.0' in httpx.get(url + "/metrics").text
    _error(httpx.post(url + "/admin/models/nope/load", timeout=10), 404)


def test_models_command_shows_states(qserver: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    url = qserver.url["standard"]
    httpx.post(url + "/admin/models/q0/load", timeout=60)
    assert cli_main(["models", "--config", str(qserver.config), "--url", url]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["q0"] == "ready" and rows["qt"] in ("unloaded", "ready") and set(rows) == {MODEL, "q0", "qt"}
    dead = f"http://127.0.0.1:{free_port()}"
    assert cli_main(["models", "--config", str(qserver.config), "--url", dead]) == 0
    assert set(_rows(capsys.readouterr().out).values()) == {"not"}  # "not running"


def _rows(out: str) -> dict[str, str]:
    """id -> state column of the table (log lines, if any, are not table rows)."""
    ids = {MODEL, "q0", "qt"}
    return {line.split()[0]: line.split()[1] for line in out.splitlines() if line.split() and line.split()[0] in ids}
