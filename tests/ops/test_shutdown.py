"""SIGTERM on a real server subprocess: drain (503 for newcomers), streams finish, exit 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import gemma_registry
from tests.serverproc import ServerProcess

MODEL = "gemma3-270m"


def _stream_in_thread(url: str, body: dict[str, object], first: threading.Event, out: dict[str, object]) -> threading.Thread:
    def run() -> None:
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                out["status"] = r.status_code
                raw = []
                for chunk in r.iter_text():
                    raw.append(chunk)
                    first.set()
                out["raw"] = "".join(raw)
        except httpx.HTTPError as err:
            out["error"] = repr(err)
        finally:
            first.set()

    t = threading.Thread(target=run)
    t.start()
    return t


def _events(raw: str) -> list[str]:
    assert raw.endswith("\n\n"), raw[-200:]
    return raw.split("\n\n")[:-1]


def test_sigterm_drains_running_stream_then_exits_0(gemma_path: Path, tmp_path: Path) -> None:
    srv = ServerProcess(gemma_registry(gemma_path), tmp_path, args=["--shutdown-grace-s", "60"]).wait_healthy()
    try:
        url = srv.url["streaming"]
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0.8, "stop": [], "seed": 1}
        first, out = threading.Event(), {}
        t = _stream_in_thread(url, body, first, out)
        assert first.wait(90) and "error" not in out, out
        t_signal = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # a newcomer during the drain: a clear 503, on every port; liveness and metrics still answer
        for role_url in srv.url.values():
            r = httpx.post(role_url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=10)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "shutting_down"
            assert httpx.get(role_url + "/ready", timeout=10).status_code == 503
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        assert "capibara6_num_requests_running 1.0" in httpx.get(url + "/metrics", timeout=10).text
        t.join(90)
        assert out.get("status") == 200, out
        events = _events(str(out["raw"]))
        assert events[-1] == "data: [DONE]"
        payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert payloads[-1]["choices"][0]["finish_reason"] == "length"  # ran to max_tokens, not cut
        assert srv.proc.wait(60) == 0
        assert time.monotonic() - t_signal < 60
    finally:
        srv.stop()
    log = srv.log.read_text()
    assert '"msg": "draining"' in log and "cancelling" not in log


def test_grace_over_cancels_and_still_exits_0(gemma_path: Path, tmp_path: Path) -> None:
    srv = ServerProcess(gemma_registry(gemma_path), tmp_path, args=["--shutdown-grace-s", "1"]).wait_healthy()
    try:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 900, "temperature": 0.8, "stop": []}
        first, out = threading.Event(), {}
        t = _stream_in_thread(srv.url["streaming"], body, first, out)
        assert first.wait(90)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0
        elapsed = time.monotonic() - t0
        t.join(30)
        assert not t.is_alive() and out.get("status") == 200, out
        raw = str(out.get("raw", ""))
        assert "data: [DONE]" not in raw  # cut at the grace, not finished ...
        last = json.loads(_events(raw)[-1].removeprefix("data: "))  # ... but said so, in the stream
        assert last["error"]["code"] == "shutting_down"
        assert elapsed < 20
    finally:
        srv.stop()
    log = srv.log.read_text()
    assert "grace period over: cancelling requests" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_idle_server_exits_0_promptly(gemma_path: Path, tmp_path: Path, sig: signal.Signals) -> None:
    srv = ServerProcess(gemma_registry(gemma_path), tmp_path).wait_healthy()
    t0 = time.monotonic()
    srv.proc.send_signal(sig)
    assert srv.proc.wait(30) == 0 and time.monotonic() - t0 < 10
    srv.stop()


def test_second_signal_skips_the_rest_of_the_grace() -> None:
    import asyncio

    from capibara6.shutdown import Drain

    async def main() -> tuple[float, int, bool]:
        drain = Drain()
        cancelled = False

        async def request() -> None:
            nonlocal cancelled
            with drain.track():
                try:
                    await asyncio.sleep(60)
                except asyncio.CancelledError:
                    cancelled = True
                    raise

        task = asyncio.create_task(request())
        await asyncio.sleep(0)
        assert drain.begin() and drain.in_flight == 1
        t0 = time.monotonic()
        runner = asyncio.create_task(drain.run(grace_s=30))
        await asyncio.sleep(0.1)
        assert not drain.begin()  # the second signal
        n = await runner
        await asyncio.gather(task, return_exceptions=True)
        return time.monotonic() - t0, n, cancelled

    elapsed, n, cancelled = asyncio.run(main())
    assert elapsed < 5 and n == 1 and cancelled
