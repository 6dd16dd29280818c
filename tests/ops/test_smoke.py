"""capibara6.smoke: real checks in child processes; a child's death by a signal is an answer."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import pytest

from capibara6 import smoke
from tests.serverproc import ROOT

SEGV = "import os, signal; print('C6SMOKE-STAGE prefill', flush=True); os.kill(os.getpid(), signal.SIGSEGV)"
SIGILL = "import os, signal; print('C6SMOKE-STAGE qmatmul Q4_K M=1', flush=True); os.kill(os.getpid(), signal.SIGILL)"


def scripted(code: str) -> smoke.Runner:
    """A runner that ignores the real child's argv and runs `code` instead (a scripted crash)."""

    def run(_args: Sequence[str], timeout_s: float) -> smoke.ChildRun:
        return smoke.run_code(code, timeout_s)

    return run


def test_a_child_killed_by_sigsegv_is_reported_as_the_signal_with_the_fix() -> None:
    r = smoke.interpret("llama", smoke.run_code(SEGV), 60)
    assert (r.ok, r.signal, r.info["stage"]) == (False, "SIGSEGV", "prefill")
    assert "llama.cpp died with SIGSEGV at its first decode" in r.detail
    assert "CMAKE_ARGS=" in r.detail and "GGML_NATIVE=OFF" in r.detail
    assert any("Segmentation fault" in ln for ln in r.info["stderr_tail"])  # faulthandler's traceback came back
    assert smoke.exit_code(r) == smoke.EXIT_SIGNAL == 3


def test_cli_exits_3_and_prints_one_json_line_when_the_child_dies(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc = smoke.main(["llama", "--model-path", str(tmp_path / "x.gguf")], runner=scripted(SEGV))
    out, err = capsys.readouterr()
    assert rc == 3
    lines = out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["signal"] == "SIGSEGV" and result["ok"] is False and result["target"] == "llama"
    assert set(result) >= {"target", "ok", "detail", "signal", "tokens", "tok_s", "seconds"}
    assert "FAILED" in err and "SIGSEGV" in err


def test_kernels_cli_names_the_op_and_the_portable_rebuild_on_sigill(capsys: pytest.CaptureFixture[str]) -> None:
    assert smoke.main(["kernels"], runner=scripted(SIGILL)) == 3
    result = json.loads(capsys.readouterr().out)
    assert result["signal"] == "SIGILL"
    assert "qmatmul Q4_K M=1" in result["detail"] and "CAPIBARA6_PORTABLE=1" in result["detail"]


def test_a_failure_without_a_signal_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    r = smoke.smoke_llama_cpp(bad, n_tokens=2, timeout_s=120)
    assert (r.ok, r.signal, smoke.exit_code(r)) == (False, None, 1)
    assert str(bad) in r.detail


def test_timeout_kills_the_child_and_its_children() -> None:
    code = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '60']); "
            "print('C6SMOKE-STAGE waiting', p.pid, flush=True); time.sleep(60)")
    t0 = time.monotonic()
    run = smoke.run_code(code, timeout_s=2)
    assert run.timed_out and run.signal is None and time.monotonic() - t0 < 30
    grandchild = int(run.stages()[-1].split()[-1])
    assert _dead(grandchild), "the child's own child survived the timeout"  # the whole process group went
    r = smoke.interpret("kernels", run, 2)
    assert not r.ok and smoke.exit_code(r) == 1 and "no answer within 2 s" in r.detail


def _dead(pid: int, wait_s: float = 5.0) -> bool:
    """Gone, or a zombie (dead; reparented to an init that has not reaped it yet)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_kernels_smoke_runs_every_kernel_against_numpy() -> None:
    r = smoke.smoke_kernels()
    assert r.ok, r.detail
    errors = r.info["errors"]
    for name in ("matmul", "rmsnorm", "softmax", "attention", "qdequant Q4_K", "qmatmul Q4_K M=1 act_bits=16",
                 "qmatmul Q6_K M=20 act_bits=8", "qmatmul Q8_0 M=1 act_bits=8"):
        assert name in errors
    assert errors["qmatmul Q4_K M=1 act_bits=16"] < 1e-4  # real numbers came back, not a constant
    assert set(r.info["build"]) >= {"neon", "avx2", "avx512"}


def test_llama_cli_on_the_real_model(gemma_path: Path) -> None:
    """The installer's exact contract: one JSON line on stdout, exit 0, decode speed measured."""
    p = subprocess.run([sys.executable, "-m", "capibara6.smoke", "llama", "--model-path", str(gemma_path), "--tokens", "6"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert r["ok"] and r["signal"] is None and r["tokens"] == 6 and r["tok_s"] > 0
    assert r["info"]["system_info"].startswith("CPU :")
    assert r["info"]["buffers_mib"], "llama.cpp's load log gave no model buffer sizes"
    assert "smoke llama: ok, 6 tokens" in p.stderr
