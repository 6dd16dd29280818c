"""The install's CPU decision: probe answers -> CMake and kernel flags (table-driven), and the probes
themselves run for real (on this CPU, and under qemu on CPUs that really lack an extension)."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from capibara6.hw.decide import X86_NEEDS, decide, enabled_set
from capibara6.hw.probes import Probe, cpu_model, reported_features, run_probes

ROOT = Path(__file__).resolve().parents[2]
X86_ALL = ("sse42", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512", "avx512_vbmi", "avx512_vnni", "avx512_bf16", "amx")
ARM_ALL = ("fp16", "dotprod", "i8mm", "sve", "sve2")


def probes(names: tuple[str, ...], ok: set[str], faults: set[str] | frozenset[str] = frozenset()) -> dict[str, Probe]:
    """ok -> passed; faults -> reported but SIGILL; the rest -> not reported."""
    out = {}
    for n in names:
        if n in ok:
            out[n] = Probe(n, True, "runs and computes right")
        elif n in faults:
            out[n] = Probe(n, False, "faults: SIGILL")
        else:
            out[n] = Probe(n, False, f"not reported ({n})")
    return out


def flag(args: str, option: str) -> str | None:
    for part in args.split():
        if part.startswith(f"-D{option}="):
            return part.split("=", 1)[1]
    return None


SPR_OK = {"sse42", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512", "avx512_vbmi", "avx512_vnni", "avx512_bf16"}


@pytest.mark.parametrize(
    "case, ok, faults, native, on, off",
    [
        # the AMX-reporting Xeon VM of the issue: AMX faults -> explicit flags, AVX-512 kept, AMX off
        ("spr-vm-amx-faults", SPR_OK, {"amx"}, False,
         ["GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AVX_VNNI", "GGML_AVX2"], ["GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"]),
        # bare-metal Sapphire Rapids: everything runs -> native
        ("spr-metal", SPR_OK | {"amx"}, set(), True, [], []),
        # Zen 4 (this CI machine kind): no AMX, no AVX-VNNI reported -> native
        ("zen4", SPR_OK - {"avx_vnni"}, set(), True, [], []),
        # AVX-512 reported, its state not enabled by the hypervisor -> the whole family off
        ("avx512-broken", SPR_OK - {"avx512"}, {"avx512"}, False,
         ["GGML_AVX2", "GGML_FMA", "GGML_AVX_VNNI"], ["GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AMX_TILE"]),
        # AVX-VNNI faults, the rest fine
        ("avx-vnni-broken", SPR_OK - {"avx_vnni"}, {"avx_vnni"}, False, ["GGML_AVX512", "GGML_AVX2"], ["GGML_AVX_VNNI"]),
    ],
)
def test_x86_decision_table(case: str, ok: set[str], faults: set[str], native: bool, on: list[str], off: list[str]) -> None:
    d = decide("x86_64", probes(X86_ALL, ok, faults))
    assert d.source == "probe" and d.native is native, case
    if native:
        assert d.cmake_args == "-DGGML_NATIVE=ON"
        assert d.kernel_arch_flags == ""
    else:
        assert flag(d.cmake_args, "GGML_NATIVE") == "OFF"
        # every ISA option spelled out: with NATIVE=OFF ggml would switch AVX/AVX2/FMA/F16C on by default
        for option in ("GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2", "GGML_AVX512"):
            assert flag(d.cmake_args, option) in ("ON", "OFF")
        assert all(flag(d.cmake_args, o) == "ON" for o in on), (case, d.cmake_args)
        assert all(flag(d.cmake_args, o) == "OFF" for o in off), (case, d.cmake_args)
        assert all(f in d.reason for f in faults)
        assert d.kernel_arch_flags.startswith("-march=native")
    # the fallback after a crashing smoke never has AMX
    assert d.fallback_cmake_args is None or flag(d.fallback_cmake_args, "GGML_AMX_TILE") == "OFF"


def test_x86_kernel_flags_name_what_failed() -> None:
    d = decide("x86_64", probes(X86_ALL, SPR_OK - {"avx512"}, {"avx512", "amx"}))
    assert d.kernel_arch_flags.split() == ["-march=native", "-mno-avx512f", "-mno-amx-tile"]


def test_native_build_falls_back_to_explicit_without_amx() -> None:
    d = decide("x86_64", probes(X86_ALL, SPR_OK | {"amx"}))
    assert d.native and d.fallback_cmake_args is not None
    assert flag(d.fallback_cmake_args, "GGML_NATIVE") == "OFF"
    assert flag(d.fallback_cmake_args, "GGML_AVX512") == "ON"
    assert flag(d.fallback_cmake_args, "GGML_AMX_INT8") == "OFF"


def test_prerequisites_gate_extensions() -> None:
    # AVX-512 VNNI passing alone (a compiler quirk) is not enabled without AVX-512 itself
    on = enabled_set(probes(X86_ALL, {"avx", "avx2", "avx512_vnni"}, {"avx512"}), X86_NEEDS)
    assert on == {"avx", "avx2"}


def test_user_cmake_args_win() -> None:
    d = decide("x86_64", probes(X86_ALL, SPR_OK, {"amx"}), "-DGGML_NATIVE=OFF -DGGML_AVX2=ON")
    assert (d.source, d.cmake_args, d.fallback_cmake_args) == ("user", "-DGGML_NATIVE=OFF -DGGML_AVX2=ON", None)


@pytest.mark.parametrize(
    "ok, faults, expect",
    [
        (set(ARM_ALL), set(), "-DGGML_NATIVE=ON -DGGML_CPU_KLEIDIAI=ON"),  # Neoverse-V2 (Axion)
        ({"fp16", "dotprod", "i8mm"}, {"sve", "sve2"}, "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+fp16+dotprod+i8mm -DGGML_CPU_KLEIDIAI=ON"),
        ({"fp16", "dotprod", "sve"}, {"sve2"}, "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+fp16+dotprod+sve -DGGML_CPU_KLEIDIAI=ON"),
        ({"fp16", "dotprod"}, set(), "-DGGML_NATIVE=ON -DGGML_CPU_KLEIDIAI=ON"),  # Neoverse-N1: nothing reported fails
    ],
)
def test_arm_decision_table(ok: set[str], faults: set[str], expect: str) -> None:
    d = decide("aarch64", probes(ARM_ALL, ok, faults))
    assert d.cmake_args == expect
    if faults:
        assert d.kernel_arch_flags.startswith("-march=armv8.2-a") and "sve2" not in d.kernel_arch_flags
    if d.native and {"sve", "sve2"} <= ok:
        assert d.fallback_cmake_args is not None and "+sve" not in d.fallback_cmake_args


def test_reported_features_and_model_from_cpuinfo() -> None:
    x86 = "processor: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: fpu avx2 amx_tile amx_int8\n"
    assert {"avx2", "amx_tile", "amx_int8"} <= reported_features(x86)
    assert cpu_model(x86) == "Intel(R) Xeon(R) Platinum 8481C"
    arm = "processor\t: 0\nFeatures\t: fp asimd asimddp sve sve2 i8mm\nCPU implementer\t: 0x41\nCPU part\t: 0xd4f\n"
    assert {"asimddp", "sve2", "i8mm"} <= reported_features(arm)
    assert "0xd4f" in cpu_model(arm)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 probes on an x86 host; aarch64 ones are run under qemu below")
def test_probes_on_this_cpu_agree_with_what_it_reports() -> None:
    reported = reported_features()
    result = run_probes()
    assert set(result) == set(X86_ALL)
    for name in ("avx", "avx2", "fma"):
        if name in reported:
            assert result[name].ok, result[name]
    for name, p in result.items():
        assert p.ok or p.detail  # every "no" says why


@pytest.mark.skipif(platform.machine() != "x86_64", reason="needs an x86 host")
def test_a_reported_extension_that_faults_is_a_no_not_a_crash() -> None:
    """Claim AMX and AVX-VNNI are reported on a CPU without them (or where the kernel refuses tile
    state): the probe's child dies or answers no; this process carries on."""
    reported = reported_features()
    if {"amx_tile", "avx_vnni"} <= reported:
        pytest.skip("this CPU really has AMX and AVX-VNNI")
    result = run_probes(reported=reported | {"amx_tile", "amx_int8", "amx_bf16", "avx_vnni"})
    if "avx_vnni" not in reported:
        assert not result["avx_vnni"].ok and "SIGILL" in result["avx_vnni"].detail
    if "amx_tile" not in reported:
        assert not result["amx"].ok


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None or platform.machine() != "x86_64", reason="qemu-user not installed (.ci/run installs it)")
def test_avx512_faults_under_an_emulated_cpu_without_it() -> None:
    # qemu's x86 emulation has AVX2 but no AVX-512: a CPU that "reports" it and cannot run it
    result = run_probes(reported=reported_features() | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}, runner=["qemu-x86_64", "-cpu", "max"])
    assert result["avx2"].ok
    assert not result["avx512"].ok and "SIGILL" in result["avx512"].detail
    d = decide("x86_64", result)
    assert not d.native and flag(d.cmake_args, "GGML_AVX512") == "OFF" and flag(d.cmake_args, "GGML_AVX2") == "ON"


ARM_CC = shutil.which("aarch64-linux-gnu-gcc")
ARM_LIBS = Path("/usr/aarch64-linux-gnu")


@pytest.mark.skipif(ARM_CC is None or shutil.which("qemu-aarch64") is None, reason="cross tools not installed (.ci/run installs them)")
@pytest.mark.parametrize("cpu, expect_ok", [("max", set(ARM_ALL)), ("neoverse-n1", {"fp16", "dotprod"}), ("cortex-a53", set())])
def test_arm_probes_under_qemu(cpu: str, expect_ok: set[str]) -> None:
    """The aarch64 probes on emulated CPUs: all pass on `max` (SVE2, i8mm), SVE/i8mm fault on a
    Neoverse-N1, everything past ARMv8.0 faults on a Cortex-A53."""
    runner = ["qemu-aarch64", "-cpu", cpu, "-L", str(ARM_LIBS)]
    result = run_probes("aarch64", reported={"asimddp", "asimdhp", "i8mm", "sve", "sve2"}, cc=ARM_CC, runner=runner)
    assert {n for n, p in result.items() if p.ok} == expect_ok, result
    assert all("SIGILL" in p.detail for p in result.values() if not p.ok)
    d = decide("aarch64", result)
    assert d.native is (expect_ok == set(ARM_ALL))


def test_state_file_and_shell_lines(tmp_path: Path) -> None:
    """`python -m capibara6.hw decide` (what _install.sh evals) writes the state doctor reads."""
    state = tmp_path / "build.json"
    out = subprocess.run([sys.executable, "-m", "capibara6.hw", "decide", "--state", str(state), "--llama-version", "0.3.36"],
                         cwd=ROOT, capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin", "CMAKE_ARGS": "-DGGML_NATIVE=OFF"})
    lines = dict(line.split("=", 1) for line in out.stdout.splitlines())
    assert set(lines) == {"C6_LLAMA_CMAKE_ARGS", "C6_LLAMA_FALLBACK_CMAKE_ARGS", "C6_LLAMA_SOURCE", "C6_KERNEL_ARCH_FLAGS"}
    assert lines["C6_LLAMA_SOURCE"] == "user" and "CMAKE_ARGS given" in out.stderr
    data = json.loads(state.read_text())
    assert data["llama_cpp"]["cmake_args"] == "-DGGML_NATIVE=OFF" and data["llama_cpp"]["version"] == "0.3.36"
    assert set(data["probes"]) and all({"ok", "detail"} <= set(p) for p in data["probes"].values())
    # the recorded build, after a crash, switches to its fallback only when one exists
    fb = subprocess.run([sys.executable, "-m", "capibara6.hw", "fallback", "--state", str(state), "--why", "test"], cwd=ROOT, capture_output=True, text=True)
    assert fb.returncode == 1 and "no fallback" in fb.stderr
