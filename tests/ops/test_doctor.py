"""`capibara6 doctor` on the real install: a subprocess, as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from capibara6 import doctor
from tests.conftest import gemma_registry
from tests.serverproc import ROOT


def run_doctor(registry: dict[str, Any], tmp: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    config = tmp / "models.yaml"
    config.write_text(yaml.safe_dump(registry, sort_keys=False))
    p = subprocess.run([sys.executable, "-m", "capibara6", "doctor", "--json", "--config", str(config), "--tokens", "4", *extra],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, (p.stdout[-2000:], p.stderr[-2000:])
    return p.returncode, json.loads(lines[0])


@pytest.fixture(scope="module")
def good(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any]]:
    return run_doctor(gemma_registry(gemma_path), tmp_path_factory.mktemp("doctor"))


def test_doctor_json_on_the_real_install(good: tuple[int, dict[str, Any]]) -> None:
    rc, report = good
    assert rc == 0, report["problems"]
    assert report["ok"] is True and report["problems"] == []
    assert set(report) >= {"cpu", "install", "llama_cpp", "kernels", "threads", "memory", "models"}
    cpu = report["cpu"]
    assert cpu["model"] and cpu["machine"] and cpu["reported"]
    if cpu["probes"] is not None:  # capibara6.hw installed: every probe answers ok or says why not
        assert all(isinstance(p["ok"], bool) and p["detail"] for p in cpu["probes"].values())
    assert "recorded" in report["install"]
    ll = report["llama_cpp"]
    assert ll["ok"] and ll["system_info"].startswith("CPU :") and ll["version"]
    assert ll["ggml"]["devices"][0]["device"] == "CPU"
    assert isinstance(ll["extra_buffer_types"], list)
    assert sum(ll["model_buffers_mib"]["gemma3-270m"].values()) > 100  # MiB of weights, from llama.cpp's load log
    assert set(ll["active_repack_buffer_types"]) <= set(ll["extra_buffer_types"])  # used => offered
    assert report["kernels"]["ok"] and report["kernels"]["paths"] is not None
    assert report["threads"]["models"]["gemma3-270m"]["threads"] == 1  # the test registry pins 1
    assert report["threads"]["inference"] >= 1 and report["memory"]["budget"] > 0
    assert report["memory"]["models"]["gemma3-270m"]["weights"] > 100 * 1024**2
    s = report["models"]["gemma3-270m"]["smoke"]
    assert s["ok"] and s["signal"] is None and s["tokens"] == 4 and s["tok_s"] > 0


def test_text_report_is_readable(good: tuple[int, dict[str, Any]]) -> None:
    text = doctor.render(good[1])
    for needle in ("CPU ", "llama.cpp  llama-cpp-python", "extra buffer types offered", "kernels    ok",
                   "threads ", "placement  workers on CPU(s)", "memory     budget", "tok/s decode", "ok: every model generates"):
        assert needle in text, needle


def test_a_corrupt_gguf_makes_doctor_fail_and_name_the_model(gemma_path: Path, tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    rc, report = run_doctor(gemma_registry(gemma_path, broken={"source": {"path": str(bad)}}), tmp_path)
    assert rc == 1 and report["ok"] is False
    assert any(p.startswith("model broken:") for p in report["problems"]), report["problems"]
    assert report["models"]["broken"]["smoke"]["ok"] is False
    assert report["models"]["gemma3-270m"]["smoke"]["ok"] is True  # one bad model does not hide the good one


def test_no_smoke_still_catches_a_corrupt_header(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    rc, report = run_doctor({"models": {"broken": {"source": {"path": str(bad)}}}}, tmp_path, "--no-smoke")
    assert rc == 1 and report["models"]["broken"]["smoke"] is None
    assert report["problems"] == [f"model broken: not a readable GGUF file: {bad}: GGUF version 0 is not supported"]


def test_install_record_absent_says_not_recorded(tmp_path: Path) -> None:
    rec = doctor.install_record(str(tmp_path))
    assert rec == {"recorded": False, "path": str(tmp_path / "capibara6-build.json")}
    (tmp_path / "capibara6-build.json").write_text(json.dumps({"llama_cpp": {"cmake_args": "-DGGML_NATIVE=OFF"}}))
    assert doctor.install_record(str(tmp_path))["llama_cpp"]["cmake_args"] == "-DGGML_NATIVE=OFF"


def test_remote_model_that_does_not_answer_is_a_failure() -> None:
    from capibara6.config import ModelSpec

    spec = ModelSpec.model_validate({"backend": "remote", "source": {"url": "http://127.0.0.1:9"}})
    r = doctor.remote_check("far", spec, timeout_s=2)
    assert not r.ok and "http://127.0.0.1:9/v1/models" in r.detail


def test_kernel_flags_follow_the_install_record() -> None:
    assert doctor.compile_flags("portable") == []
    assert doctor.compile_flags("-march=x86-64-v3 -mtune=generic") == ["-march=x86-64-v3", "-mtune=generic"]
    assert doctor.compile_flags("", machine="aarch64") == ["-mcpu=native"]
    assert doctor.compile_flags("", machine="x86_64") == ["-march=native"]


def test_doctor_shows_each_worker_on_its_own_cpus(gemma_path: Path, tmp_path: Path) -> None:
    from capibara6.config import load_registry

    reg = gemma_registry(gemma_path, b={"source": {"path": str(gemma_path)}, "isolation": "worker"})
    reg["models"]["gemma3-270m"]["isolation"] = "worker"
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(reg))
    t = doctor.threads_report(load_registry(tmp_path / "models.yaml"))
    a, b = t["models"]["gemma3-270m"]["cpus"], t["models"]["b"]["cpus"]
    assert a and b and set(a).isdisjoint(b)
    assert t["placement"]["http_cpu"] not in a + b
