"""/metrics over real HTTP: values move as requests flow, one set across ports, bounded labels,
and a real Prometheus server scrapes it and answers a query."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import yaml
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import gemma_registry
from tests.serverproc import ServerProcess, free_port

MODEL = "gemma3-270m"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def msrv(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(gemma_registry(gemma_path), tmp_path_factory.mktemp("metrics"), args=["--max-tokens-cap", "256"])
    yield proc.wait_healthy()
    proc.stop()


def scrape(url: str) -> Samples:
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every series of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_values_move_as_requests_flow(msrv: ServerProcess) -> None:
    url = msrv.url["standard"]
    before = scrape(url)
    assert val(before, "capibara6_model_state", model=MODEL, state="unloaded") == 1  # lazy: nothing loaded yet
    assert val(before, "capibara6_models_loaded") == 0
    c = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    comp = c.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0)
    chunks = list(c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    usage = chunks[-1].usage
    assert comp.usage is not None and usage is not None
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("capibara6_time_to_first_token_seconds_count", model=MODEL) == 2
    assert delta("capibara6_e2e_request_latency_seconds_count", model=MODEL) == 2
    assert delta("capibara6_request_queue_time_seconds_count", model=MODEL) == 2
    # inter-token gaps: one fewer than the tokens of each request
    assert delta("capibara6_inter_token_latency_seconds_count", model=MODEL) == (
        comp.usage.completion_tokens - 1 + usage.completion_tokens - 1
    )
    assert delta("capibara6_prompt_tokens_total", model=MODEL) == comp.usage.prompt_tokens + usage.prompt_tokens
    assert delta("capibara6_generation_tokens_total", model=MODEL) == comp.usage.completion_tokens + usage.completion_tokens
    assert delta("capibara6_requests_total", model=MODEL, endpoint="completions", status="200", role="standard") == 1
    assert delta("capibara6_requests_total", model=MODEL, endpoint="chat", status="200", role="standard") == 1
    assert val(after, "capibara6_num_requests_running") == 0
    assert val(after, "capibara6_num_requests_waiting") == 0
    assert val(after, "capibara6_model_state", model=MODEL, state="ready") == 1
    assert val(after, "capibara6_model_state", model=MODEL, state="unloaded") == 0
    assert val(after, "capibara6_models_loaded") == 1
    # llama.cpp holds f16 K and V for 18 layers x 1 KV head x 256 dims x n_ctx 1024 cells
    assert val(before, "capibara6_kv_cache_bytes", model=MODEL) == 0
    assert val(after, "capibara6_kv_cache_bytes", model=MODEL) == 18 * 1 * (256 + 256) * 2 * 1024
    assert delta("capibara6_model_loads_total", model=MODEL) == 1
    assert delta("capibara6_model_load_seconds_count", model=MODEL) == 1


def test_error_statuses_and_bounded_labels(msrv: ServerProcess) -> None:
    url = msrv.url["standard"]
    before = scrape(url)
    weird = "../../etc/passwd-" + "x" * 40
    assert httpx.post(url + "/v1/completions", json={"model": weird, "prompt": "a"}).status_code == 404
    assert httpx.post(url + "/v1/chat/completions", json={"model": "no-such-model", "messages": []}).status_code in (400, 404)
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 10_000})
    assert r.status_code == 400
    after_text = httpx.get(url + "/metrics").text
    after = scrape(url)
    assert weird not in after_text and "no-such-model" not in after_text  # never a label value
    labels = {v for (_, ls) in after for (_, v) in ls}
    assert not any("passwd" in v for v in labels)
    d404 = total(after, "capibara6_requests_total", status="404") - total(before, "capibara6_requests_total", status="404")
    assert d404 >= 1 and total(after, "capibara6_requests_total", model="_unknown", status="404") >= 1
    d400 = total(after, "capibara6_requests_total", model=MODEL, status="400") - total(before, "capibara6_requests_total", model=MODEL, status="400")
    assert d400 == 1
    models = {dict(ls)["model"] for (n, ls) in after if "model" in dict(ls)}
    assert models <= {MODEL, "_unknown"}


def test_one_process_one_set_of_metrics(msrv: ServerProcess) -> None:
    # a request on the streaming port is seen on every port's /metrics
    c = OpenAI(base_url=msrv.url["streaming"] + "/v1", api_key="x", max_retries=0, timeout=120)
    list(c.completions.create(model=MODEL, prompt="One", max_tokens=2, stream=True))
    name = "capibara6_requests_total"
    seen = [total(scrape(msrv.url[role]), name, role="streaming", status="200") for role in ("standard", "streaming", "consensus")]
    assert seen[0] >= 1 and seen == [seen[0]] * 3


def test_metrics_answer_while_generating(msrv: ServerProcess) -> None:
    url = msrv.url["streaming"]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 250, "temperature": 0.8, "stop": []}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        t0 = time.monotonic()
        during = scrape(msrv.url["standard"])
        assert time.monotonic() - t0 < 5  # a scrape never waits for the generation to end
        assert val(during, "capibara6_num_requests_running") == 1
        assert val(during, "capibara6_model_state", model=MODEL, state="busy") == 1
    deadline = time.monotonic() + 30
    while val(scrape(url), "capibara6_num_requests_running") != 0:  # the disconnect cancels it
        assert time.monotonic() < deadline, "running gauge never returned to 0"
        time.sleep(0.2)


def test_real_prometheus_scrapes_and_answers(msrv: ServerProcess, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    assert binary, "the `prometheus` binary is missing: apt-get install prometheus (see .ci/run)"
    target = msrv.url["standard"].removeprefix("http://")
    cfg = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "capibara6", "static_configs": [{"targets": [target]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        # a request so that a per-model counter exists, then ask Prometheus for it
        httpx.post(msrv.url["standard"] + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1}, timeout=60)
        query = f'capibara6_requests_total{{job="capibara6",model="{MODEL}",status="200"}}'
        deadline = time.monotonic() + 45
        result: list[dict[str, object]] = []
        while time.monotonic() < deadline and not result:
            time.sleep(0.5)
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5)
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                result = r.json()["data"]["result"]
        assert result, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert float(result[0]["value"][1]) >= 1  # type: ignore[index]
        up = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": "up"}, timeout=5).json()
        assert up["data"]["result"][0]["value"][1] == "1"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_scrapes_in_parallel_with_load(msrv: ServerProcess) -> None:
    """Scrapes from many threads while requests run: every scrape parses, counters never go back."""
    stop = threading.Event()
    errors: list[str] = []
    values: list[float] = []

    def scraper() -> None:
        while not stop.is_set():
            try:
                values.append(total(scrape(msrv.url["consensus"]), "capibara6_requests_total"))
            except Exception as err:  # collected, asserted below
                errors.append(repr(err))

    threads = [threading.Thread(target=scraper) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(3):
            httpx.post(msrv.url["standard"] + "/v1/completions", json={"model": MODEL, "prompt": f"{i}", "max_tokens": 2}, timeout=60)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors and len(values) > 3


def test_label_guard_keeps_values_in_their_vocabulary(gemma_path: Path) -> None:
    from capibara6.config import parse_registry
    from capibara6.pool import ModelPool

    raw = gemma_registry(gemma_path)
    raw["ensembles"] = {"duo": {"experts": [MODEL, MODEL]}}
    m = ModelPool(parse_registry(raw)).metrics
    m.requests.labels("duo", "consensus", "chat", "200").inc()  # an ensemble id is a registry id
    m.requests.labels("/etc/passwd", "standard", "chat", "404").inc()
    m.requests.labels(MODEL, "evil-role", "chat", "200 OK; x").inc()
    m.unloads.labels(MODEL, "because I said so").inc()
    m.expert_latency.labels("not-an-expert").observe(1.0)
    fams = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    req = {tuple(sorted(s.labels.items())) for s in fams["capibara6_requests"].samples if s.name.endswith("_total")}
    assert (("endpoint", "chat"), ("model", "duo"), ("role", "consensus"), ("status", "200")) in req
    assert (("endpoint", "chat"), ("model", "_unknown"), ("role", "standard"), ("status", "404")) in req
    assert (("endpoint", "chat"), ("model", MODEL), ("role", "_other"), ("status", "_other")) in req
    assert {s.labels["reason"] for s in fams["capibara6_model_unloads"].samples} == {"_other"}
    assert {s.labels["expert"] for s in fams["capibara6_consensus_expert_latency_seconds"].samples} == {"_unknown"}


def test_requests_refused_by_validation_are_counted(msrv: ServerProcess) -> None:
    """400s from request validation (before any model work) still reach requests_total."""
    url = msrv.url["standard"]
    key = dict(model=MODEL, role="standard", endpoint="chat", status="400")
    before = val(scrape(url), "capibara6_requests_total", **key)
    assert httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": []}, timeout=10).status_code == 400
    assert httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "temperature": 9}, timeout=10).status_code == 400
    assert val(scrape(url), "capibara6_requests_total", **key) == before + 2
