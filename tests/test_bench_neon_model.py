"""Smoke run of scripts/bench_neon_model.py: the modelled Neoverse-V2 benchmark compiles our
quantized-matmul kernels for aarch64 with the model markers, finds every region it expects and
prints figures and JSON (a smoke run: no speed threshold; the figures are in
capibara6/kernels/README.md)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "bench_neon_model.py")
MISSING = [t for t in ("aarch64-linux-gnu-gcc", os.environ.get("LLVM_MCA", "llvm-mca-19")) if shutil.which(t) is None]


@pytest.mark.skipif(bool(MISSING), reason="needs %s (apt-get install -y gcc-aarch64-linux-gnu llvm-19)"
                    % ", ".join(MISSING))
def test_bench_neon_model_smoke():
    r = subprocess.run([sys.executable, SCRIPT, "--types", "Q5_0,Q4_K", "--iterations", "20",
                        "--ggml-types", "Q5_0"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["unit"] == "cycles per 256 weights per activation row"
    assert "-DC6_MCA_MODEL" in out["flags"] and "-mcpu=demeter" in out["flags"]
    assert [row["type"] for row in out["rows"]] == ["Q5_0", "Q4_K"]
    for row in out["rows"]:
        for col in ("i8_m1", "i8_m4", "i16_m1", "i16_m4"):
            assert row[col] is not None and 1.0 < row[col] < 1000.0, (row["type"], col, row[col])
        # ggml's columns come from the llama-cpp-python sdist when one is found, else a note says why
        if row["type"] != "Q5_0":
            assert row["ggml_v2"] is None
        elif row["ggml_v2"] is None:
            assert any("ggml" in n for n in out["notes"]), out["notes"]
        else:
            assert row["i8_m1_vs_ggml_v2"] is not None
    assert not any("branch" in n for n in out["notes"] if "ggml" not in n), out["notes"]


def test_normal_build_has_no_markers():
    """the markers exist only in a model build: the normal aarch64 build's assembly has none"""
    cc = shutil.which("aarch64-linux-gnu-gcc")
    if cc is None:
        pytest.skip("needs aarch64-linux-gnu-gcc")
    src = os.path.join(REPO, "capibara6", "kernels", "src")
    for f in ("qmatmul.c", "qmatmul16.c"):
        asm = subprocess.run([cc, "-O3", "-std=gnu11", "-mcpu=demeter", "-I", src, "-S", "-o", "-",
                              os.path.join(src, f)], capture_output=True, text=True, check=True).stdout
        assert "LLVM-MCA" not in asm
