"""From probe answers to build flags: llama.cpp's CMake options and our kernels' compiler flags.

Policy (each rule has a measured reason):
- An explicit `CMAKE_ARGS` from the user wins, untouched: they know their machine.
- Every reported extension probed runs: `GGML_NATIVE=ON`, as llama.cpp builds by default; on
  aarch64 plus `GGML_CPU_KLEIDIAI=ON` (Arm's micro-kernels for quantized matmul on Neoverse).
- A reported extension fails its probe: `GGML_NATIVE=OFF` with every ggml ISA option spelled out,
  ON for what passed (and whose prerequisites passed), OFF for the rest. Spelled out, because with
  `GGML_NATIVE=OFF` ggml turns SSE4.2/AVX/AVX2/BMI2/FMA/F16C on by default. Measured: on an
  AMX-reporting Xeon VM, `-DGGML_NATIVE=OFF` plus the AVX/AVX2/AVX-512 options passes the whole
  suite where the native build faults in `ggml_backend_amx_mul_mat`.
- A fallback for when the smoke generation after the build still dies by a signal (a probe can
  pass where ggml's real kernels fault: the AMX fault above is inside ggml's tile code, after the
  kernel granted tile permission): the probed set without AMX (x86) or without SVE (aarch64),
  the extensions most often reported but broken under hypervisors.
- Our kernels: `-march=native` (`-mcpu=native`) unless a reported extension fails; then x86 turns
  the failing ones off by name (`-march=native -mno-avx512f ...`), aarch64 names what passed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

from .probes import Probe

# probe name -> ggml CMake options it switches (x86)
X86_CMAKE: dict[str, tuple[str, ...]] = {
    "sse42": ("GGML_SSE42",),
    "avx": ("GGML_AVX",),
    "avx2": ("GGML_AVX2",),
    "fma": ("GGML_FMA",),
    "f16c": ("GGML_F16C",),
    "bmi2": ("GGML_BMI2",),
    "avx_vnni": ("GGML_AVX_VNNI",),
    "avx512": ("GGML_AVX512",),
    "avx512_vbmi": ("GGML_AVX512_VBMI",),
    "avx512_vnni": ("GGML_AVX512_VNNI",),
    "avx512_bf16": ("GGML_AVX512_BF16",),
    "amx": ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"),
}
# an extension is only switched on when what it builds on is on too
X86_NEEDS: dict[str, str] = {
    "avx2": "avx", "fma": "avx", "f16c": "avx", "avx_vnni": "avx2", "avx512": "avx2",
    "avx512_vbmi": "avx512", "avx512_vnni": "avx512", "avx512_bf16": "avx512", "amx": "avx512",
}
# gcc switches that take one extension back out of -march=native (-mno-avx512f takes the family)
X86_GCC_OFF: dict[str, str] = {
    "sse42": "-mno-sse4.2", "avx": "-mno-avx", "avx2": "-mno-avx2", "fma": "-mno-fma", "f16c": "-mno-f16c",
    "bmi2": "-mno-bmi2", "avx_vnni": "-mno-avxvnni", "avx512": "-mno-avx512f", "avx512_vbmi": "-mno-avx512vbmi",
    "avx512_vnni": "-mno-avx512vnni", "avx512_bf16": "-mno-avx512bf16", "amx": "-mno-amx-tile",
}
ARM_ORDER: tuple[str, ...] = ("fp16", "dotprod", "i8mm", "sve", "sve2")
ARM_NEEDS: dict[str, str] = {"sve2": "sve"}
# the extensions a crash after a passing probe most likely comes from
FALLBACK_DROP: dict[str, frozenset[str]] = {"x86": frozenset({"amx"}), "arm": frozenset({"sve", "sve2"})}


@dataclass(frozen=True)
class BuildDecision:
    """What the install builds with, and why (printed at install, kept for `capibara6 doctor`)."""

    arch: str  # "x86" | "arm" | "other"
    cmake_args: str
    native: bool
    source: str  # "user" | "probe" | "fallback" | "default"
    reason: str
    kernel_arch_flags: str  # "" = build_ffi.py's own -march/-mcpu=native
    kernel_reason: str
    fallback_cmake_args: str | None  # what to rebuild with if the smoke generation dies by a signal

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def arch_family(machine: str) -> str:
    m = machine.lower()
    if m in ("x86_64", "amd64"):
        return "x86"
    if m in ("aarch64", "arm64"):
        return "arm"
    return "other"


def failed_reported(probes: Mapping[str, Probe]) -> list[str]:
    """Extensions the CPU reports that did not pass: the ones `-march=native` would wrongly use."""
    return [name for name, p in probes.items() if not p.ok and not p.detail.startswith("not reported")]


def enabled_set(probes: Mapping[str, Probe], needs: Mapping[str, str], drop: frozenset[str] = frozenset()) -> set[str]:
    """Passed extensions whose prerequisites are enabled too (fixed point over `needs`)."""
    on = {name for name, p in probes.items() if p.ok and name not in drop}
    changed = True
    while changed:
        changed = False
        for name in sorted(on):
            base = needs.get(name)
            if base is not None and base not in on:
                on.discard(name)
                changed = True
    return on


def x86_explicit_args(on: set[str]) -> str:
    """`GGML_NATIVE=OFF` and every x86 ISA option spelled out, ON exactly for `on`."""
    parts = ["-DGGML_NATIVE=OFF"]
    for name, options in X86_CMAKE.items():
        parts.extend(f"-D{opt}={'ON' if name in on else 'OFF'}" for opt in options)
    return " ".join(parts)


def arm_march(on: set[str]) -> str:
    """An -march value naming the passed aarch64 extensions (armv8.2-a is the dotprod baseline)."""
    return "armv8.2-a" + "".join(f"+{name}" for name in ARM_ORDER if name in on)


def arm_explicit_args(on: set[str]) -> str:
    return f"-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH={arm_march(on)} -DGGML_CPU_KLEIDIAI=ON"


def _explicit(arch: str, probes: Mapping[str, Probe], drop: frozenset[str] = frozenset()) -> str:
    if arch == "x86":
        return x86_explicit_args(enabled_set(probes, X86_NEEDS, drop))
    return arm_explicit_args(enabled_set(probes, ARM_NEEDS, drop))


def _fallback(arch: str, probes: Mapping[str, Probe], primary: str) -> str | None:
    if arch == "other":
        return None
    candidate = _explicit(arch, probes, FALLBACK_DROP[arch])
    return None if candidate == primary else candidate


def kernel_flags(arch: str, probes: Mapping[str, Probe]) -> tuple[str, str]:
    """(extra compiler flags for our kernels, why); ("", ...) keeps -march/-mcpu=native."""
    failed = failed_reported(probes)
    if not failed or arch == "other":
        return "", "native: every reported extension probed runs"
    if arch == "x86":
        flags = "-march=native " + " ".join(X86_GCC_OFF[f] for f in failed)
        return flags, f"native without what failed its probe: {', '.join(failed)}"
    return f"-march={arm_march(enabled_set(probes, ARM_NEEDS))}", f"only what passed its probe (failed: {', '.join(failed)})"


def decide(machine: str, probes: Mapping[str, Probe], user_cmake_args: str | None = None) -> BuildDecision:
    """The build for this CPU. Pure: the same probe answers always give the same flags."""
    arch = arch_family(machine)
    k_flags, k_reason = kernel_flags(arch, probes)
    failed = failed_reported(probes)
    if user_cmake_args and user_cmake_args.strip():
        args = user_cmake_args.strip()
        return BuildDecision(arch, args, "GGML_NATIVE=OFF" not in args, "user", "CMAKE_ARGS given: used as is, no probe overrides it", k_flags, k_reason, None)
    if arch == "other":
        return BuildDecision(arch, "", True, "default", f"no probes for {machine}: llama.cpp's own defaults", k_flags, k_reason, None)
    if not failed:
        args = "-DGGML_NATIVE=ON" + (" -DGGML_CPU_KLEIDIAI=ON" if arch == "arm" else "")
        ran = sorted(name for name, p in probes.items() if p.ok)
        reason = f"every reported extension probed runs ({', '.join(ran) or 'none reported'}): native build"
        return BuildDecision(arch, args, True, "probe", reason, k_flags, k_reason, _fallback(arch, probes, args))
    args = _explicit(arch, probes)
    details = "; ".join(f"{f}: {probes[f].detail}" for f in failed)
    reason = f"reported but failed its probe: {details}. Native build would use it, so the flags are explicit"
    return BuildDecision(arch, args, False, "probe", reason, k_flags, k_reason, _fallback(arch, probes, args))


__all__ = ["BuildDecision", "arch_family", "arm_explicit_args", "decide", "enabled_set", "failed_reported", "kernel_flags", "x86_explicit_args"]
