"""API key, CORS, limits, request ids, logs and path-safety over real HTTP with the real openai client."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest
from openai import OpenAI

from capibara6.api.middleware import RequestContext
from capibara6.config import ConfigError, build_settings
from capibara6.logs import JsonFormatter
from tests.conftest import gemma_registry
from tests.serverproc import ServerProcess

MODEL = "gemma3-270m"
KEY = "s3cret-key-for-tests"
ORIGIN = "https://ui.example"
MARKER = "zebra-quokka-marker"  # prompt text that must never reach the logs
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def ssrv(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("security")
    key_file = tmp / "key"
    key_file.write_text(KEY + "\n")
    args = [
        "--api-key-file", str(key_file), "--cors-origins", ORIGIN, "--max-body-bytes", "65536",
        "--max-tokens-cap", "64", "--max-prompt-tokens", "16", "--max-n", "2", "--max-stop", "2",
    ]
    proc = ServerProcess(gemma_registry(gemma_path), tmp, args=args)
    yield proc.wait_healthy()
    proc.stop()


def client(srv: ServerProcess, key: str) -> OpenAI:
    return OpenAI(base_url=srv.url["standard"] + "/v1", api_key=key, max_retries=0, timeout=120)


def error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err  # type: ignore[no-any-return]


def test_openai_client_needs_the_right_key(ssrv: ServerProcess) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(ssrv, "wrong-key").models.list()
    with pytest.raises(openai.AuthenticationError):
        client(ssrv, KEY + "x").completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    out = client(ssrv, KEY).completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert out.choices[0].text is not None and out.usage is not None


def test_missing_or_malformed_key_is_401_everywhere_but_health(ssrv: ServerProcess) -> None:
    for role, url in ssrv.url.items():
        r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        err = error(r, 401)
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key", role
        assert r.headers["www-authenticate"] == "Bearer"
        error(httpx.get(url + "/v1/models", headers={"Authorization": KEY}), 401)  # no scheme
        error(httpx.get(url + "/v1/models", headers={"Authorization": "Basic " + KEY}), 401)
        error(httpx.get(url + "/admin/anything"), 401)
        error(httpx.get(url + "/nope"), 401)  # no route discovery without the key
        for open_path in ("/health", "/metrics"):
            assert httpx.get(url + open_path).status_code == 200, open_path
        assert httpx.get(url + "/ready", timeout=60).status_code == 200
    metrics = httpx.get(ssrv.url["standard"] + "/metrics").text
    assert 'capibara6_rejected_requests_total{reason="unauthorized",role="standard"}' in metrics


def test_limits_give_clear_errors(ssrv: ServerProcess) -> None:
    url = ssrv.url["standard"] + "/v1/completions"
    err = error(httpx.post(url, json={"model": MODEL, "prompt": "x" * 70_000}, headers=AUTH), 413)
    assert err["code"] == "request_too_large" and "65536" in err["message"]
    err = error(httpx.post(url, json={"model": MODEL, "prompt": "word " * 40, "max_tokens": 2}, headers=AUTH, timeout=60), 400)
    assert err["param"] == "prompt" and "limit is 16" in err["message"]
    err = error(httpx.post(url, json={"model": MODEL, "prompt": "Hi", "max_tokens": 65}, headers=AUTH), 400)
    assert err["param"] == "max_tokens" and "64" in err["message"]
    err = error(httpx.post(url, json={"model": MODEL, "prompt": "Hi", "n": 3}, headers=AUTH), 400)
    assert err["param"] == "n"
    err = error(httpx.post(url, json={"model": MODEL, "prompt": "Hi", "stop": ["a", "b", "c"]}, headers=AUTH), 400)
    assert err["param"] == "stop"
    # the server keeps serving after every refusal
    ok = httpx.post(url, json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "n": 2, "stop": ["a", "b"]}, headers=AUTH, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2


def test_path_like_model_ids_are_404_and_touch_no_file(ssrv: ServerProcess, gemma_path: Path, tmp_path: Path) -> None:
    link = tmp_path / "copy.gguf"
    link.symlink_to(gemma_path)
    missing = tmp_path / "never-created.gguf"
    before = httpx.get(ssrv.url["standard"] + "/metrics").text
    for mid in (str(link), str(missing), "../" * 8 + str(gemma_path).lstrip("/"), "file://" + str(link), "~/x.gguf"):
        r = httpx.post(ssrv.url["standard"] + "/v1/completions", json={"model": mid, "prompt": "Hi", "max_tokens": 1}, headers=AUTH)
        assert error(r, 404)["code"] == "model_not_found", mid
        error(httpx.get(ssrv.url["standard"] + "/v1/models/" + mid, headers=AUTH), 404)
    assert not missing.exists()
    after = httpx.get(ssrv.url["standard"] + "/metrics").text
    loads = [line for line in after.splitlines() if line.startswith("capibara6_model_loads_total")]
    assert loads == [line for line in before.splitlines() if line.startswith("capibara6_model_loads_total")]
    assert str(tmp_path) not in after


def test_cors_only_for_configured_origins(ssrv: ServerProcess) -> None:
    url = ssrv.url["standard"] + "/v1/chat/completions"
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(url, headers=pre)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.options(url, headers={**pre, "Origin": "https://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.get(ssrv.url["standard"] + "/v1/models", headers={**AUTH, "Origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()


def test_cors_off_by_default(server: ServerProcess) -> None:
    r = httpx.options(server.url["standard"] + "/v1/models", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(server.url["standard"] + "/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_request_id_on_every_response(ssrv: ServerProcess) -> None:
    base = ssrv.url["streaming"]
    r = httpx.get(base + "/v1/models", headers={**AUTH, "X-Request-ID": "client-id.42"})
    assert r.headers["x-request-id"] == "client-id.42"
    for bad in ("has space", "x" * 200, "new\u00e9line"):
        r = httpx.get(base + "/health", headers={"X-Request-ID": bad.encode("utf-8")})  # type: ignore[dict-item]
        rid = r.headers["x-request-id"]
        assert rid != bad and len(rid) == 32 and rid.isalnum()
    assert httpx.get(base + "/v1/models").headers["x-request-id"]  # 401
    assert httpx.post(base + "/v1/completions", json={"model": "nope", "prompt": "a"}, headers=AUTH).headers["x-request-id"]  # 404
    big = httpx.post(base + "/v1/completions", content=b"{" + b" " * 70_000, headers={**AUTH, "content-type": "application/json"})
    assert big.status_code == 413 and big.headers["x-request-id"]
    body = {"model": MODEL, "prompt": MARKER, "max_tokens": 3}
    with httpx.stream("POST", base + "/v1/completions", json=body, headers={**AUTH, "X-Request-ID": "sse-1"}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream") and r.headers["x-request-id"] == "sse-1"
        assert r.read().decode().endswith("data: [DONE]\n\n")


def test_logs_are_json_lines_without_prompts(ssrv: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": MARKER, "max_tokens": 2}
    httpx.post(ssrv.url["standard"] + "/v1/completions", json=body, headers={**AUTH, "X-Request-ID": "log-check-1"}, timeout=60)
    deadline = time.monotonic() + 10  # the access line is written once the response has gone out
    while True:
        lines = [ln for ln in ssrv.log.read_text().splitlines() if ln.startswith("{")]
        records = [json.loads(ln) for ln in lines]
        access = [r for r in records if r.get("request_id") == "log-check-1"]
        if access or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert access, lines[-5:]
    rec = access[-1]
    assert rec["status"] == 200 and rec["model"] == MODEL and rec["path"] == "/v1/completions" and rec["duration_ms"] > 0
    assert MARKER not in ssrv.log.read_text()
    assert KEY not in ssrv.log.read_text()


async def _echo_app(scope: Any, receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("log_prompts", [False, True])
def test_log_prompts_switch(log_prompts: bool) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("capibara6.access")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        app = RequestContext(_echo_app, "standard", log_prompts=log_prompts)

        async def call() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return await c.post("/v1/completions", json={"model": MODEL, "prompt": MARKER})

        r = asyncio.run(call())
        assert r.status_code == 200 and r.headers["x-request-id"]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    rec = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert rec["request_id"] == r.headers["x-request-id"] and rec["model"] == MODEL
    assert (MARKER in stream.getvalue()) is log_prompts


def test_api_key_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPIBARA6_API_KEY", "from-env")
    assert build_settings({}, {}).api_key == "from-env"
    assert build_settings({}, {"api_key": "from-flag"}).api_key == "from-flag"
    monkeypatch.delenv("CAPIBARA6_API_KEY")
    f = tmp_path / "key"
    f.write_text("from-file\n")
    assert build_settings({}, {"api_key_file": str(f)}).api_key == "from-file"
    with pytest.raises(ConfigError, match="api_key_file"):
        build_settings({}, {"api_key_file": str(tmp_path / "missing")})
    assert build_settings({}, {}).api_key is None and os.environ.get("CAPIBARA6_API_KEY") is None


def test_open_health_off_protects_probes_too() -> None:
    from capibara6.api.security import ApiKeyAuth

    async def call(open_health: bool, path: str, headers: dict[str, str]) -> int:
        app = ApiKeyAuth(_echo_app, KEY, open_health=open_health)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return (await c.get(path, headers=headers)).status_code

    for path in ("/health", "/ready", "/metrics"):
        assert asyncio.run(call(True, path, {})) == 200
        assert asyncio.run(call(False, path, {})) == 401
        assert asyncio.run(call(False, path, AUTH)) == 200
