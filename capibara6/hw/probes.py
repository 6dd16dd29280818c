"""Does this CPU really run the instruction set extensions it reports? Ask it, in a child process.

A CPU (or the hypervisor in front of it) can report an extension it cannot run. Measured on an
AMX-reporting Xeon VM: llama.cpp built with `GGML_NATIVE=ON` compiles ggml's AMX path and faults at
its first decode (`ldtilecfg` in `ggml_backend_amx_mul_mat`), although the kernel grants the tile
permission; the same checkout built with the AVX-512 flags spelled out passes every test. So before
building anything with `-march=native` we compile a tiny program per extension, run it as a child
process and check its answer: a fault (SIGILL, SIGSEGV) or a wrong result is a "no", never a crash.

Only extensions the CPU reports are probed (what it does not report, `-march=native` never turns
on). A probe the compiler cannot build is a "no" too: that compiler could not build ggml's code
for it either. Standard library only: `scripts/_install.sh` runs this before anything is installed.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class Probe:
    """One extension's answer. `ok` only when it was reported, compiled, ran and computed right."""

    feature: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class ProbeSource:
    """A program that prints `ok` when the extension works; `flags` are what it is compiled with."""

    feature: str
    flags: tuple[str, ...]
    body: str
    reported_as: tuple[str, ...]  # /proc/cpuinfo names that must all be present to try it


_X86_HEAD = "#include <immintrin.h>\n#include <stdio.h>\n#include <string.h>\n#include <stdint.h>\n"
_ARM_HEAD = "#include <arm_neon.h>\n#include <stdio.h>\n#include <stdint.h>\n"


def _x86(feature: str, flags: str, reported: str, main: str) -> ProbeSource:
    return ProbeSource(feature, tuple(flags.split()), _X86_HEAD + main, tuple(reported.split()))


def _arm(feature: str, flags: str, reported: str, main: str, head: str = "") -> ProbeSource:
    return ProbeSource(feature, tuple(flags.split()), _ARM_HEAD + head + main, tuple(reported.split()))


# Each program computes something from volatile inputs (so nothing folds at compile time) and
# prints "ok" only when the answer is right. Features are named as ggml's CMake options are.
X86_PROBES: tuple[ProbeSource, ...] = (
    _x86("sse42", "-msse4.2", "sse4_2", """
int main(void) { volatile unsigned a = 1; unsigned c = _mm_crc32_u32(0, a);
  puts(c == 0xdd45aab8u ? "ok" : "wrong"); return 0; }"""),
    _x86("avx", "-mavx", "avx", """
int main(void) { volatile float a = 1.5f; float o[8]; __m256 v = _mm256_set1_ps(a);
  _mm256_storeu_ps(o, _mm256_add_ps(v, v)); puts(o[7] == 3.0f ? "ok" : "wrong"); return 0; }"""),
    _x86("avx2", "-mavx2", "avx2", """
int main(void) { volatile int a = 20; int o[8]; __m256i v = _mm256_set1_epi32(a);
  _mm256_storeu_si256((__m256i *)o, _mm256_add_epi32(v, v)); puts(o[5] == 40 ? "ok" : "wrong"); return 0; }"""),
    _x86("fma", "-mfma", "fma", """
int main(void) { volatile float a = 2.0f; float o[8]; __m256 v = _mm256_set1_ps(a);
  _mm256_storeu_ps(o, _mm256_fmadd_ps(v, v, v)); puts(o[0] == 6.0f ? "ok" : "wrong"); return 0; }"""),
    _x86("f16c", "-mf16c -mavx", "f16c", """
int main(void) { volatile float a = 0.5f; float o[8]; __m128i h = _mm256_cvtps_ph(_mm256_set1_ps(a), 0);
  _mm256_storeu_ps(o, _mm256_cvtph_ps(h)); puts(o[3] == 0.5f ? "ok" : "wrong"); return 0; }"""),
    _x86("bmi2", "-mbmi2", "bmi2", """
int main(void) { volatile unsigned a = 0xffu; puts(_pdep_u32(a, 0xf0f0u) == 0xf0f0u ? "ok" : "wrong"); return 0; }"""),
    _x86("avx_vnni", "-mavxvnni", "avx_vnni", """
int main(void) { volatile int a = 0x01010101; int o[8]; __m256i v = _mm256_set1_epi32(a);
  _mm256_storeu_si256((__m256i *)o, _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), v, v));
  puts(o[2] == 4 ? "ok" : "wrong"); return 0; }"""),
    _x86("avx512", "-mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw", "avx512f avx512cd avx512vl avx512dq avx512bw", """
int main(void) { volatile float a = 1.0f; volatile char b = 3;
  float s = _mm512_reduce_add_ps(_mm512_set1_ps(a));                        /* F: 16 */
  char o[64]; __m512i v = _mm512_set1_epi8(b); _mm512_storeu_si512(o, _mm512_add_epi8(v, v));  /* BW */
  int c[16]; _mm512_storeu_si512(c, _mm512_conflict_epi32(_mm512_set1_epi32(b)));             /* CD */
  int m[8]; _mm256_storeu_si256((__m256i *)m, _mm256_maskz_add_epi32(0x0f, _mm256_set1_epi32(b), _mm256_set1_epi32(b)));  /* VL */
  double d[8]; _mm512_storeu_pd(d, _mm512_xor_pd(_mm512_set1_pd(a), _mm512_set1_pd(0.0)));     /* DQ */
  puts(s == 16.0f && o[63] == 6 && c[15] == 0x7fff && m[0] == 6 && m[4] == 0 && d[7] == 1.0 ? "ok" : "wrong"); return 0; }"""),
    _x86("avx512_vbmi", "-mavx512f -mavx512vbmi", "avx512vbmi", """
int main(void) { volatile char a = 7; char o[64]; __m512i idx = _mm512_setzero_si512();
  __m512i t = _mm512_set1_epi8(a); _mm512_storeu_si512(o, _mm512_permutexvar_epi8(idx, t));
  puts(o[9] == 7 ? "ok" : "wrong"); return 0; }"""),
    _x86("avx512_vnni", "-mavx512f -mavx512vnni", "avx512_vnni", """
int main(void) { volatile int a = 0x01010101; int o[16]; __m512i v = _mm512_set1_epi32(a);
  _mm512_storeu_si512(o, _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, v)); puts(o[15] == 4 ? "ok" : "wrong"); return 0; }"""),
    _x86("avx512_bf16", "-mavx512f -mavx512bf16", "avx512_bf16", """
int main(void) { volatile float a = 2.0f; float o[16]; __m512 v = _mm512_set1_ps(a);
  __m512bh h = _mm512_cvtne2ps_pbh(v, v); _mm512_storeu_ps(o, _mm512_dpbf16_ps(_mm512_setzero_ps(), h, h));
  puts(o[0] == 8.0f ? "ok" : "wrong"); return 0; }"""),
    # AMX: ask the kernel for tile state (Linux >= 5.16 gates it behind arch_prctl), then run the
    # instructions ggml runs: configure tiles, load, multiply, store, and check every element.
    _x86("amx", "-mamx-tile -mamx-int8 -mamx-bf16", "amx_tile amx_int8 amx_bf16", """
#include <unistd.h>
#include <sys/syscall.h>
struct cfg { uint8_t palette, start; uint8_t pad[14]; uint16_t colsb[16]; uint8_t rows[16]; };
int main(void) {
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) { puts("kernel refuses tile permission (arch_prctl ARCH_REQ_XCOMP_PERM)"); return 0; }
  struct cfg c; memset(&c, 0, sizeof c); c.palette = 1;
  for (int t = 0; t < 3; t++) { c.colsb[t] = 64; c.rows[t] = 16; }
  static int8_t a[16][64], b[16][64]; static int32_t out[16][16];
  volatile int8_t one = 1; for (int i = 0; i < 16; i++) for (int j = 0; j < 64; j++) { a[i][j] = one; b[i][j] = one; }
  _tile_loadconfig(&c); _tile_zero(0); _tile_loadd(1, a, 64); _tile_loadd(2, b, 64);
  _tile_dpbssd(0, 1, 2); _tile_stored(0, out, 64); _tile_release();
  int good = 1; for (int i = 0; i < 16; i++) for (int j = 0; j < 16; j++) good &= out[i][j] == 64;
  puts(good ? "ok" : "wrong"); return 0; }"""),
)

ARM_PROBES: tuple[ProbeSource, ...] = (
    _arm("dotprod", "-march=armv8.2-a+dotprod", "asimddp", """
int main(void) { volatile int8_t a = 2; int32x4_t s = vdotq_s32(vdupq_n_s32(0), vdupq_n_s8(a), vdupq_n_s8(a));
  puts(vgetq_lane_s32(s, 3) == 16 ? "ok" : "wrong"); return 0; }"""),
    _arm("fp16", "-march=armv8.2-a+fp16", "asimdhp", """
int main(void) { volatile float a = 1.5f; float16x8_t v = vdupq_n_f16((float16_t)a);
  puts((float)vgetq_lane_f16(vaddq_f16(v, v), 0) == 3.0f ? "ok" : "wrong"); return 0; }"""),
    _arm("i8mm", "-march=armv8.2-a+i8mm", "i8mm", """
int main(void) { volatile int8_t a = 1; int32x4_t s = vmmlaq_s32(vdupq_n_s32(0), vdupq_n_s8(a), vdupq_n_s8(a));
  puts(vgetq_lane_s32(s, 0) == 8 ? "ok" : "wrong"); return 0; }"""),
    _arm("sve", "-march=armv8.2-a+sve", "sve", """
int main(void) { volatile int8_t a = 1; svint32_t s = svdot_s32(svdup_n_s32(0), svdup_n_s8(a), svdup_n_s8(a));
  puts(svaddv_s32(svptrue_b32(), s) == (int64_t)svcntb() ? "ok" : "wrong"); return 0; }""", "#include <arm_sve.h>\n"),
    _arm("sve2", "-march=armv8.2-a+sve2", "sve2", """
int main(void) { volatile int16_t a = 3; svint32_t s = svmlalb_s32(svdup_n_s32(0), svdup_n_s16(a), svdup_n_s16(a));
  puts(svaddv_s32(svptrue_b32(), s) == 9 * (int64_t)svcntw() ? "ok" : "wrong"); return 0; }""", "#include <arm_sve.h>\n"),
)


def probe_sources(machine: str | None = None) -> tuple[ProbeSource, ...]:
    """The probes for this machine's architecture (none for an architecture we do not build for)."""
    m = (machine or platform.machine()).lower()
    if m in ("x86_64", "amd64"):
        return X86_PROBES
    if m in ("aarch64", "arm64"):
        return ARM_PROBES
    return ()


def reported_features(cpuinfo: str | None = None) -> set[str]:
    """Extension names the CPU reports: x86 `flags`, aarch64 `Features` in /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return set()
    out: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            out.update(value.split())
    return out


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name (x86 `model name`; aarch64 implementer/part, e.g. 0x41/0xd4f = Neoverse-V2)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return platform.processor() or "unknown"
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    if fields.get("model name"):
        return fields["model name"]
    if fields.get("cpu part"):
        return f"implementer {fields.get('cpu implementer', '?')} part {fields['cpu part']}"
    return platform.processor() or "unknown"


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def run_probe(src: ProbeSource, workdir: Path, cc: str = "cc", runner: Sequence[str] = (), timeout_s: float = 20.0) -> Probe:
    """Compile `src` and run it in a child process; every failure becomes a `Probe(ok=False)`."""
    c_file, exe = workdir / f"{src.feature}.c", workdir / src.feature
    c_file.write_text(src.body)
    try:
        built = subprocess.run([cc, "-O1", *src.flags, str(c_file), "-o", str(exe)], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        return Probe(src.feature, False, f"compiler {cc} failed to run: {err}")
    if built.returncode != 0:
        first = (built.stderr.strip().splitlines() or ["?"])[0]
        return Probe(src.feature, False, f"{cc} cannot build it ({' '.join(src.flags)}): {first}")
    try:
        ran = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Probe(src.feature, False, f"hung for {timeout_s:.0f} s")
    if ran.returncode < 0:
        return Probe(src.feature, False, f"faults: {_signal_name(ran.returncode)}")
    answer = ran.stdout.strip()
    if ran.returncode != 0 or answer != "ok":
        return Probe(src.feature, False, f"answered {answer or '(nothing)'!r}, exit {ran.returncode}")
    return Probe(src.feature, True, "runs and computes right")


def run_probes(
    machine: str | None = None,
    reported: set[str] | None = None,
    cc: str | None = None,
    runner: Sequence[str] = (),
) -> dict[str, Probe]:
    """Probe every extension of this architecture that the CPU reports; the rest are `ok=False`.

    `reported`, `cc` and `runner` are for tests and cross checks (e.g. an aarch64 compiler run
    under `qemu-aarch64 -cpu cortex-a53`, where the SVE probe really faults).
    """
    reported = reported_features() if reported is None else reported
    compiler = cc or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc"
    out: dict[str, Probe] = {}
    with tempfile.TemporaryDirectory(prefix="capibara6-probe-") as tmp:
        for src in probe_sources(machine):
            missing = [name for name in src.reported_as if name not in reported]
            if missing:
                out[src.feature] = Probe(src.feature, False, f"not reported ({', '.join(missing)})")
            else:
                out[src.feature] = run_probe(src, Path(tmp), compiler, runner)
    return out


__all__ = ["ARM_PROBES", "X86_PROBES", "Probe", "ProbeSource", "cpu_model", "probe_sources", "reported_features", "run_probe", "run_probes"]
