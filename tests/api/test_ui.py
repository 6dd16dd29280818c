"""The built-in web page (capibara6/api/ui.py, capibara6/ui/) in a real browser.

Debian's `chromium` (apt-get install chromium), driven by Playwright for Python pointed at that
executable (no `playwright install`), against a real server on loopback with the embedded Gemma
3 270M. A screenshot of each view is saved under pytest's temporary directory, or in
$CAPIBARA6_UI_SHOTS when set (never committed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, Playwright, sync_playwright

from capibara6.api.ui import CSP, summarize
from capibara6.metrics import Metrics
from tests.conftest import gemma_registry
from tests.serverproc import ROOT, ServerProcess

MODEL = "gemma3-270m"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # greedy counting runs on for as long as it may
SCRIPT_LINE = "<script>window.pwned=1;alert(1)</script>"  # the base model copies it, greedily


def chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        pytest.fail("chromium is missing: apt-get install -y chromium (Debian's package; .ci/run installs it)")
    return path


@pytest.fixture(scope="module")
def ui_server(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The test registry plus `spare` (same file, for load/unload), `broken` (a corrupt file) and
    `twin`, an ensemble of the same model twice, so a consensus run has two experts on one model."""
    tmp = tmp_path_factory.mktemp("ui-server")
    bad = tmp / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    registry = gemma_registry(
        gemma_path, spare={"source": {"path": str(gemma_path)}, "chat_format": "gemma"},
        broken={"source": {"path": str(bad)}, "chat_format": "gemma"},
    )
    registry["ensembles"] = {"twin": {"experts": [MODEL, MODEL], "strategy": "vote", "timeout_s": 120}}
    proc = ServerProcess(registry, tmp).wait_healthy()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def playwright_driver() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright_driver: Playwright) -> Iterator[BrowserContext]:
    profile = tempfile.mkdtemp(prefix="capibara6-chromium-")  # a fresh user-data-dir
    ctx = playwright_driver.chromium.launch_persistent_context(
        profile, executable_path=chromium(), headless=True, args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 800},
    )
    yield ctx
    ctx.close()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("CAPIBARA6_UI_SHOTS")
    folder = Path(given) if given else tmp_path_factory.mktemp("ui-shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Watched:
    """A page plus everything that would mean the page misbehaved: script errors, console errors
    (CSP refusals are reported there), and dialogs (an `alert` from model text that ran)."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("dialog", self._dialog)

    def _dialog(self, d: Any) -> None:
        self.dialogs.append(d.message)
        d.dismiss()

    def open(self, url: str) -> Page:
        self.page.goto(url)
        self.page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        return self.page


@pytest.fixture
def watched(browser: BrowserContext) -> Iterator[Watched]:
    w = Watched(browser.new_page())
    yield w
    w.page.close()
    assert w.errors == [] and w.dialogs == []


def gauge(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def wait_until(check: Any, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step)
    return bool(check())


def last_answer(page: Page) -> Any:
    return page.locator(".msg.assistant").last


def set_fields(page: Page, **values: Any) -> None:
    for field, value in values.items():
        page.fill(f"#{field}", str(value))


# -- served files, the summary endpoint, --no-ui ----------------------------------------------


def test_page_and_assets_on_every_port(ui_server: ServerProcess) -> None:
    for url in ui_server.url.values():
        r = httpx.get(url + "/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert r.headers["content-security-policy"] == CSP
        assert "'unsafe-inline'" not in CSP and "'unsafe-eval'" not in CSP and "default-src 'self'" in CSP
        scripts = re.findall(r"<script[^>]*>", r.text)
        assert scripts and all('src="/ui/' in s for s in scripts)  # no inline script
        assert not re.search(r"\son[a-z]+\s*=", r.text)  # no inline handlers
        assert httpx.get(url + "/ui/app.js").headers["content-type"].startswith("text/javascript")
        assert httpx.get(url + "/ui/style.css").headers["content-type"].startswith("text/css")
    for path in ("/ui/nope.js", "/ui/ui.py", "/ui/..%2Fapi%2Fui.py", "/ui/%2e%2e/config.py"):
        assert httpx.get(ui_server.url["standard"] + path).status_code == 404, path
    js = (ROOT / "capibara6" / "ui" / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js, f"app.js uses {sink}"


def test_summary_reads_the_servers_own_metrics(ui_server: ServerProcess) -> None:
    url = ui_server.url["standard"]
    body = httpx.get(url + "/ui/api/summary").json()
    assert body["role"] == "standard" and body["consensus_port"] == ui_server.ports["consensus"]
    assert [m["id"] for m in body["pool"]] == [MODEL, "spare", "broken"] and body["ensembles"] == ["twin"]
    assert {"status", "leases", "capacity", "waiting", "memory_bytes", "backend"} <= set(body["pool"][0])
    assert body["running"] == gauge(url, "capibara6_num_requests_running")
    assert set(body["histograms"]) == {"ttft", "itl", "e2e", "queue"}
    assert httpx.get(ui_server.url["consensus"] + "/ui/api/summary").json()["role"] == "consensus"


def test_summarize_sums_every_model() -> None:
    m = Metrics()
    m.ttft.labels("a").observe(0.03)
    m.ttft.labels("b").observe(0.3)
    m.generation_tokens.labels("a").inc(5)
    m.generation_tokens.labels("b").inc(2)
    m.running.inc()
    s = summarize(m.registry.collect())
    assert s["running"] == 1 and s["waiting"] == 0 and s["generation_tokens"] == 7
    ttft = s["histograms"]["ttft"]
    assert ttft["count"] == 2 and ttft["sum"] == pytest.approx(0.33)
    assert ttft["counts"][ttft["le"].index(0.04)] == 1 and ttft["counts"][-1] == 2  # cumulative, +Inf left out
    assert s["histograms"]["itl"] == {"le": [], "counts": [], "count": 0.0, "sum": 0.0}


def test_no_ui_turns_the_page_off(gemma_path: Path, tmp_path: Path) -> None:
    proc = ServerProcess(gemma_registry(gemma_path), tmp_path, args=["--no-ui"]).wait_healthy()
    try:
        url = proc.url["standard"]
        for path in ("/", "/ui/app.js", "/ui/api/summary"):
            assert httpx.get(url + path).status_code == 404, path
        assert httpx.get(url + "/v1/models").status_code == 200
    finally:
        proc.stop()


# -- the page in chromium ---------------------------------------------------------------------


def test_chat_streams_tokens_into_the_page(watched: Watched, ui_server: ServerProcess, shots: Path) -> None:
    page = watched.open(ui_server.url["standard"] + "/")
    assert page.locator("#model option").all_inner_texts()[0].startswith(MODEL)
    page.evaluate("""() => {  // every length the answer had, with the message's state then
        window.lens = [];
        new MutationObserver(() => {
            const m = [...document.querySelectorAll('.msg.assistant')].pop();
            if (m) window.lens.push([m.dataset.state, m.querySelector('.body').textContent.length]);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    bodies: list[str] = []
    page.on("request", lambda r: bodies.append(r.post_data or "") if r.url.endswith("/v1/chat/completions") else None)
    set_fields(page, temperature=0, max_tokens=48, prompt="Name three rivers.")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant[data-state='done']", timeout=120_000)
    streaming = sorted({n for state, n in page.evaluate("window.lens") if state == "streaming" and n > 0})
    assert len(streaming) >= 3, f"the answer did not grow token by token: {streaming}"
    stats = last_answer(page).locator(".stats").inner_text()
    assert re.search(r"TTFT \d", stats) and re.search(r"[\d.]+ tok/s", stats) and re.search(r"\b\d+ tokens", stats), stats
    assert last_answer(page).locator(".body").inner_text().strip()
    page.screenshot(path=str(shots / "chat.png"))

    set_fields(page, prompt="And three mountains?")  # the conversation is kept and sent again
    page.click("#send")
    page.wait_for_function("() => document.querySelectorAll(\".msg.assistant[data-state='done']\").length == 2", timeout=120_000)
    sent = json.loads(bodies[-1])
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"] and sent["stream"] is True
    assert sent["temperature"] == 0 and sent["max_tokens"] == 48


def test_stop_closes_the_stream_and_frees_the_model(watched: Watched, ui_server: ServerProcess, shots: Path) -> None:
    url = ui_server.url["standard"]
    page = watched.open(url + "/")
    page.check("input[name=mode][value=completion]")
    set_fields(page, temperature=0, max_tokens=900, prompt=COUNTING)  # ~20 s of tokens if not stopped
    page.click("#send")
    page.wait_for_function(
        "() => { const m = [...document.querySelectorAll('.msg.assistant')].pop();"
        " return m && m.dataset.state === 'streaming' && m.querySelector('.body').textContent.length > 20; }",
        timeout=120_000,
    )
    assert gauge(url, "capibara6_num_requests_running") == 1
    page.click("#stop-button")
    page.wait_for_selector(".msg.assistant[data-state='stopped']", timeout=5_000)
    assert wait_until(lambda: gauge(url, "capibara6_num_requests_running") == 0, timeout=5), "running gauge stayed up"
    shown = len(last_answer(page).locator(".body").inner_text())
    time.sleep(1.0)
    assert len(last_answer(page).locator(".body").inner_text()) == shown  # nothing arrives after stop
    page.wait_for_selector("#live[data-running='0']", timeout=5_000)
    assert last_answer(page).locator(".stats").inner_text().endswith("stopped")
    page.screenshot(path=str(shots / "chat-stopped.png"))


def test_errors_are_shown_where_they_happen(watched: Watched, ui_server: ServerProcess) -> None:
    page = watched.open(ui_server.url["standard"] + "/")
    page.select_option("#model", "broken")  # its load fails once the stream's headers are out
    set_fields(page, prompt="Hello?")
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-state='error']", timeout=30_000)
    assert "model_unavailable" in last_answer(page).locator(".error").inner_text()
    assert not page.is_disabled("#send") and page.is_disabled("#stop-button")
    page.goto(ui_server.url["standard"] + "/#pool")
    page.click("tr[data-model='broken'] button.load")
    page.wait_for_selector("#pool-message.error", timeout=30_000)
    assert page.inner_text("#pool-message").startswith("broken: 503 model_unavailable")
    assert page.get_attribute("tr[data-model='broken']", "data-state") == "unloaded"
    watched.errors = [e for e in watched.errors if "status of 503" not in e]  # the load's own 503, logged by chromium


def test_pool_view_follows_load_and_unload(watched: Watched, ui_server: ServerProcess, shots: Path) -> None:
    url = ui_server.url["standard"]
    page = watched.open(url + "/#pool")
    row = "tr[data-model='spare']"
    page.wait_for_selector(f"{row}[data-state='unloaded']", timeout=5_000)
    page.click(f"{row} button.load")  # the page's button: POST /admin/models/spare/load
    page.wait_for_selector(f"{row}[data-state='ready']", timeout=60_000)
    assert httpx.get(url + "/admin/models").json()["data"][1]["status"] == "ready"
    assert page.inner_text(f"{row} .memory") != "0" and page.inner_text(f"{row} .slots") == "0 / 1"
    page.screenshot(path=str(shots / "pool.png"))
    page.click(f"{row} button.unload")
    page.wait_for_selector(f"{row}[data-state='unloaded']", timeout=30_000)
    assert httpx.get(url + "/admin/models").json()["data"][1]["status"] == "unloaded"
    # and changes made elsewhere (the admin API) show up by themselves
    assert httpx.post(url + "/admin/models/spare/load", timeout=60).status_code == 200
    page.wait_for_selector(f"{row}[data-state='ready']", timeout=5_000)
    assert httpx.post(url + "/admin/models/spare/unload", timeout=60).status_code == 200
    page.wait_for_selector(f"{row}[data-state='unloaded']", timeout=5_000)


def test_consensus_shows_one_panel_per_expert(watched: Watched, ui_server: ServerProcess, shots: Path) -> None:
    page = watched.open(ui_server.url["standard"] + "/#consensus")  # elsewhere: a link to the consensus port
    link = page.locator("#consensus-elsewhere a")
    assert link.get_attribute("href") == f"http://127.0.0.1:{ui_server.ports['consensus']}/#consensus"
    assert page.locator("#consensus-form").is_hidden()

    page = watched.open(ui_server.url["consensus"] + "/#consensus")
    page.select_option("#ensemble", "twin")
    set_fields(page, **{"c-max-tokens": 16, "c-temperature": 0.7, "c-prompt": "Is the sky blue? Answer yes or no."})
    page.click("#c-run")
    assert page.locator(".expert-panel[data-status='running']").count() == 2  # a panel per expert at once
    page.wait_for_selector("#merged[data-state='done']", timeout=180_000)
    panels = page.locator(".expert-panel")
    assert panels.count() == 2
    for i in range(2):
        panel = panels.nth(i)
        assert panel.get_attribute("data-status") == "ok"
        assert panel.locator("strong").inner_text() == MODEL
        assert re.search(r"\d+ tokens", panel.locator(".meta").inner_text())
        assert panel.locator(".body").inner_text().strip()
    assert page.locator(".expert-panel.chosen").count() == 1
    assert "strategy vote" in page.inner_text("#merged-meta")
    assert page.inner_text("#merged-body").strip()
    page.screenshot(path=str(shots / "consensus.png"))

    # Stop during a run cancels every expert (parallel 1: one generates, the other waits its turn)
    url = ui_server.url["consensus"]
    busy = ("capibara6_num_requests_running", "capibara6_num_requests_waiting")
    set_fields(page, **{"c-max-tokens": 600, "c-prompt": COUNTING})
    page.click("#c-run")
    assert wait_until(lambda: [gauge(url, g) for g in busy] == [1, 1], timeout=60), "the experts never ran"
    page.click("#c-stop")
    page.wait_for_selector("#merged[data-state='stopped']", timeout=5_000)
    assert page.locator(".expert-panel[data-status='stopped']").count() == 2
    assert wait_until(lambda: [gauge(url, g) for g in busy] == [0, 0], timeout=5), "experts kept running"

    # the chat tab takes an ensemble too, and says how the answer was made
    page.click("#tabs a[data-view='chat']")
    page.select_option("#model", "twin")
    set_fields(page, max_tokens=8, prompt="Say hello.")
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-state='done']", timeout=120_000)
    assert "merged by vote from 2 experts" in last_answer(page).locator(".stats").inner_text()


def test_markup_from_the_model_and_the_user_is_shown_as_text(watched: Watched, ui_server: ServerProcess, shots: Path) -> None:
    page = watched.open(ui_server.url["standard"] + "/")
    never_ran = "() => window.pwned === undefined && document.querySelectorAll('#messages script, #messages img, #messages b').length === 0"

    # 1. the model's own output: a base model greedily copies the line it was shown three times
    page.check("input[name=mode][value=completion]")
    set_fields(page, temperature=0, max_tokens=30, prompt=(SCRIPT_LINE + "\n") * 3)
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-state='done']", timeout=120_000)
    answer = last_answer(page).locator(".body").inner_text()
    assert SCRIPT_LINE in answer, f"the model did not copy the line: {answer!r}"
    assert SCRIPT_LINE in page.locator(".msg.user").last.inner_text()  # the prompt, same renderer
    assert page.evaluate(never_ran)

    # 2. echo: the prompt comes back inside the model's response text
    page.check("#echo")
    tags = '<img src=x onerror="window.pwned=2"><b>bold?</b>'
    set_fields(page, max_tokens=2, prompt=tags)
    page.click("#send")
    page.wait_for_function("() => document.querySelectorAll(\".msg.assistant[data-state='done']\").length == 2", timeout=120_000)
    assert last_answer(page).locator(".body").inner_text().startswith(tags)
    assert page.evaluate(never_ran)

    # 3. chat: the user's message, with markdown that should render and markup that should not
    page.check("input[name=mode][value=chat]")
    set_fields(page, max_tokens=4, prompt="<script>window.pwned=3</script> **strong** and `<b>code</b>`")
    page.click("#send")
    page.wait_for_function("() => document.querySelectorAll(\".msg.assistant[data-state='done']\").length == 3", timeout=120_000)
    user = page.locator(".msg.user").last
    assert user.locator(".body").inner_text().startswith("<script>window.pwned=3</script> strong")
    assert user.locator("strong").inner_text() == "strong" and user.locator("code").inner_text() == "<b>code</b>"
    assert page.evaluate(never_ran)

    # the renderer itself: fenced code keeps its text, structure comes from markdown only
    shape = page.evaluate("""() => {
        const box = document.createElement('div');
        box.append(window.capibara6.renderMarkdown('# Title\\n- a\\n- b\\n\\n```html\\n<script>x()</script>\\n```\\ntail <i>x</i>'));
        return {h: box.querySelector('h3').textContent, li: box.querySelectorAll('li').length,
                code: box.querySelector('pre code').textContent, tags: box.querySelectorAll('script, i').length,
                tail: box.lastChild.textContent};
    }""")
    assert shape == {"h": "Title", "li": 2, "code": "<script>x()</script>", "tags": 0, "tail": "tail <i>x</i>"}
    page.screenshot(path=str(shots / "markup-as-text.png"))


def test_metrics_view_charts_the_traffic(watched: Watched, ui_server: ServerProcess, shots: Path) -> None:
    url = ui_server.url["standard"]
    page = watched.open(url + "/#metrics")
    for _ in range(3):  # some traffic for the charts
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": COUNTING, "max_tokens": 24, "temperature": 0}, timeout=60)
        assert r.status_code == 200
        time.sleep(1.0)
    generated = httpx.get(url + "/ui/api/summary").json()["generation_tokens"]
    assert generated >= 24
    page.wait_for_function(f"() => window.capibara6 && Number(document.querySelector('#stats .stat:nth-child(5) .value').textContent) >= {generated}", timeout=5_000)
    labels = page.locator("#stats .label").all_inner_texts()
    assert labels[:2] == ["running", "waiting"] and "TTFT p50 (all)" in labels
    assert page.inner_text("#stats .stat:nth-child(7) .value") not in ("–", "")  # a TTFT percentile exists now
    drawn = page.evaluate("""() => [...document.querySelectorAll('canvas')].map(c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let ink = 0; for (let i = 3; i < d.length; i += 4) ink += d[i] > 0; return ink; })""")
    assert len(drawn) == 4 and all(n > 0 for n in drawn)
    time.sleep(2)  # a few points on the charts
    page.screenshot(path=str(shots / "metrics.png"))


def test_api_key_is_asked_once_and_sent_as_bearer(browser: BrowserContext, gemma_path: Path, tmp_path: Path) -> None:
    proc = ServerProcess(gemma_registry(gemma_path), tmp_path, args=["--api-key", "s3cret"]).wait_healthy()
    page = browser.new_page()
    try:
        url = proc.url["standard"]
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/ui/api/summary").status_code == 401  # the page's data needs the key
        assert httpx.get(url + "/").status_code == 200  # the page itself opens in a plain browser
        sent: list[str | None] = []
        page.on("request", lambda r: sent.append(r.headers.get("authorization")) if "/v1/models" in r.url else None)
        page.goto(url + "/")
        page.wait_for_selector("#key-dialog[open]", timeout=10_000)
        page.fill("#key-input", "s3cret")
        page.click("#key-ok")
        page.wait_for_selector("body[data-ready='1']", timeout=10_000)
        assert page.locator("#model option").count() == 1
        assert sent[-1] == "Bearer s3cret"
        time.sleep(1.5)  # polls keep going with the key: no second question
        assert page.locator("#key-dialog[open]").count() == 0
        assert page.evaluate("sessionStorage.getItem('capibara6.apiKey')") == "s3cret"
    finally:
        page.close()
        proc.stop()
