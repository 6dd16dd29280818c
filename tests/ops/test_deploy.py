"""Deployment files: systemd units verified by systemd-analyze, scripts parsed by bash, the
Prometheus config checked by promtool, the Grafana dashboard's PromQL against what /metrics
exports, and a start script run for real."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from capibara6.config import parse_registry
from capibara6.pool import ModelPool
from tests.conftest import gemma_registry
from tests.serverproc import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNITS = ["capibara6.service", "capibara6@.service", "capibara6-roles.target"]


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"`{name}` is missing (apt: systemd for systemd-analyze, prometheus for promtool)"
    return path


def test_every_script_parses() -> None:
    scripts = sorted((ROOT / "scripts").glob("*.sh"))
    assert {p.name for p in scripts} >= {
        "start_all_models_server.sh", "start_streaming_server.sh", "start_consensus_server.sh", "install_c4a.sh",
    }
    for p in scripts:
        r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, f"{p.name}: {r.stderr}"
        text = p.read_text()
        if text.startswith("# Sourced by"):  # a function library (scripts/_llama.sh): never run on its own
            assert not os.access(p, os.X_OK), f"{p.name} is sourced, not run: it should not be executable"
            continue
        assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text, p.name
        assert os.access(p, os.X_OK), f"{p.name} is not executable"


def _fake_root(tmp: Path) -> Path:
    """A root with the system's own units, our units and the paths ExecStart names."""
    root = tmp / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(DEPLOY / unit, etc / unit)
    exe = root / "opt/capibara6/.venv/bin/capibara6"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    return root


def test_systemd_units_verify(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    instances = ["capibara6.service", "capibara6@standard.service", "capibara6@streaming.service",
                 "capibara6@consensus.service", "capibara6-roles.target"]
    r = subprocess.run([tool("systemd-analyze"), "verify", f"--root={root}", *instances], capture_output=True, text=True, cwd=tmp_path)
    ours = [ln for ln in (r.stdout + r.stderr).splitlines() if "capibara6" in ln]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr  # unknown keys only warn: no line may name our units


def _unit(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize("name", ["capibara6.service", "capibara6@.service"])
def test_units_are_hardened_and_outlast_the_grace(name: str) -> None:
    u = _unit(name)
    for key, value in {
        "User": "capibara6", "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "Restart": "on-failure", "KillSignal": "SIGTERM", "ReadWritePaths": "/var/lib/capibara6",
    }.items():
        assert u.get(key) == [value], (name, key)
    assert "/etc/capibara6/capibara6.env" in u["EnvironmentFile"]
    assert int(u["LimitNOFILE"][0]) >= 4096 and u["MemoryMax"] and u["MemoryHigh"]
    env = dict(line.split("=", 1) for line in (DEPLOY / "capibara6.env").read_text().splitlines() if line and not line.startswith("#"))
    assert int(u["TimeoutStopSec"][0]) > float(env["CAPIBARA6_SHUTDOWN_GRACE_S"])
    if name.startswith("capibara6@"):
        assert u["ExecStart"][0].endswith("--role %i")


def test_env_file_names_only_real_settings() -> None:
    from capibara6.config import ServerSettings

    known = {"CAPIBARA6_" + f.upper() for f in ServerSettings.model_fields} | {"CAPIBARA6_LOG_LEVEL"}
    names = re.findall(r"^#?(CAPIBARA6_[A-Z_]+)=", (DEPLOY / "capibara6.env").read_text(), re.M)
    assert names and set(names) <= known, set(names) - known


def test_prometheus_config_checks() -> None:
    r = subprocess.run([tool("promtool"), "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _exported_names(gemma_path: Path) -> tuple[set[str], str]:
    """Every series name the real collectors export (a real pool; one observation per metric)."""
    registry = parse_registry(gemma_registry(gemma_path))
    pool = ModelPool(registry)
    m = pool.metrics
    for h in (m.ttft, m.itl, m.e2e, m.queue_time, m.load_time):
        h.labels("gemma3-270m").observe(0.1)
    for c in (m.prompt_tokens, m.generation_tokens, m.loads):
        c.labels("gemma3-270m").inc()
    m.requests.labels("gemma3-270m", "standard", "chat", "200").inc()
    m.unloads.labels("gemma3-270m", "idle").inc()
    m.rejected.labels("standard", "unauthorized").inc()
    m.expert_latency.labels("gemma3-270m").observe(1.0)
    m.agreement.observe(1.0)
    text = m.render().decode()
    names = set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
    return names, text


def test_metrics_text_passes_promtool_lint(gemma_path: Path) -> None:
    _, text = _exported_names(gemma_path)
    r = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def test_grafana_dashboard_queries_real_metrics(gemma_path: Path, tmp_path: Path) -> None:
    dash = json.loads((DEPLOY / "grafana-capibara6.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    assert len(exprs) >= 15
    exported, _ = _exported_names(gemma_path)
    used = {n for e in exprs for n in re.findall(r"\b((?:capibara6|process)_[a-z0-9_]+)\b", e)}
    assert used and used <= exported, used - exported
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("first token", "tokens/s", "queue", "model state", "expert"):
        assert topic in titles, topic
    # the PromQL parses: promtool checks it as recording rules (Grafana macros replaced)
    macros = {"$__rate_interval": "1m", "$__range": "1h", "$model": ".*", "$job": ".*"}
    rules = []
    for i, e in enumerate(e for e in exprs if not e.startswith("label_values")):
        for k, v in macros.items():
            e = e.replace(k, v)
        rules.append({"record": f"capibara6:dashboard_{i}", "expr": e})
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([tool("promtool"), "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_start_script_serves_its_role_and_stops_cleanly(gemma_path: Path, tmp_path: Path) -> None:
    config = tmp_path / "models.yaml"
    config.write_text(yaml.safe_dump(gemma_registry(gemma_path)))
    port = free_port()
    env = {**os.environ, "CAPIBARA6_CONFIG": str(config), "CAPIBARA6_PORT": str(port)}
    log = (tmp_path / "log").open("wb")
    proc = subprocess.Popen([str(ROOT / "scripts/start_streaming_server.sh")], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"model": "gemma3-270m", "prompt": "Hi", "max_tokens": 2}  # no `stream`: the streaming role streams
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        assert r.headers["content-type"].startswith("text/event-stream") and r.text.endswith("data: [DONE]\n\n")
        proc.send_signal(signal.SIGTERM)  # exec'd: the signal reaches the server itself
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
