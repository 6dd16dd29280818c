"""`capibara6 doctor [--json] [--config models.yaml] [--no-smoke]`: can this machine serve?

It reports, in order: the CPU (model, the ISA extensions it reports, and whether each really
runs: capibara6.hw's probes, a tiny program per extension in a child), the install decision
scripts/_install.sh recorded in `<venv>/capibara6-build.json`, what llama.cpp was built with
(`llama_print_system_info`, the ggml registry's extra buffer types, and the buffer types each
model's weights really went to at load: CPU_REPACK / AMX / CPU_KLEIDIAI), our kernels' build,
the thread count `n_threads: auto` picks and why, the memory budget, and one greedy generation
per registry model with its decode speed.

Everything that runs llama.cpp or our kernels runs in a child process (capibara6.smoke): a build
this CPU cannot run (AMX in some VMs) dies by SIGSEGV/SIGILL there and is reported, instead of
taking the doctor down. Exit status: 0 when every model generates, 1 when something cannot
(a model, the kernels, llama.cpp itself, a model larger than the memory budget), 2 for a bad
registry. A remote model is asked for GET /v1/models (short timeout) instead of a generation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import smoke
from .backends import backend_class, estimate, model_path
from .config import ConfigError, ModelSpec, Registry, load_registry
from .gguf_header import read_header
from .hw.probes import cpu_model, reported_features, run_probes
from .pool.budget import GIB, budget_bytes, physical_memory
from .threads import _cgroup_cpu_limit, inference_cpus, usable_cpus
from .workers.placement import Placement

STATE_FILE = "capibara6-build.json"
REMOTE_TIMEOUT_S = 5.0

# ISA extensions worth showing (the full list from /proc/cpuinfo is in the JSON)
_X86_SHOWN = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
              "avx512_vnni", "avx512_bf16", "avx512vbmi", "amx_tile", "amx_int8", "amx_bf16")
_ARM_SHOWN = ("asimd", "asimddp", "asimdhp", "i8mm", "bf16", "sve", "sve2", "svei8mm", "svebf16", "sme", "sme2")

# what the compiler enables for the kernels' flags; our C uses NEON, dotprod (qblocks.h), AVX2,
# FMA, AVX-512F and AVX-512 VNNI+VL (qmatmul.c); the rest is shown for context
_X86_MACROS = {"avx2": "__AVX2__", "fma": "__FMA__", "f16c": "__F16C__", "avx512f": "__AVX512F__",
               "avx512vl": "__AVX512VL__", "avx512vnni": "__AVX512VNNI__", "avx512bf16": "__AVX512BF16__",
               "avxvnni": "__AVXVNNI__", "amx": "__AMX_TILE__"}
_ARM_MACROS = {"neon": "__ARM_NEON", "dotprod": "__ARM_FEATURE_DOTPROD", "i8mm": "__ARM_FEATURE_MATMUL_INT8",
               "bf16": "__ARM_FEATURE_BF16", "fp16": "__ARM_FEATURE_FP16_VECTOR_ARITHMETIC",
               "sve": "__ARM_FEATURE_SVE", "sve2": "__ARM_FEATURE_SVE2"}
_REPACK_TYPES = ("CPU_REPACK", "AMX", "CPU_KLEIDIAI")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object instead of the text report")
    p.add_argument("--config", default=None, help="model registry (default: models.yaml)")
    p.add_argument("--no-smoke", action="store_true", help="skip the per-model generations (kernels, llama.cpp's build and each GGUF header are still checked)")
    p.add_argument("--tokens", type=int, default=8, help="tokens per smoke generation")
    p.add_argument("--timeout", type=float, default=300, help="seconds per smoke generation before its child is killed")


def run(args: argparse.Namespace) -> int:
    try:
        registry = load_registry(Path(args.config or "models.yaml"))
    except ConfigError as err:
        print(f"capibara6 doctor: {err}", file=sys.stderr)
        return 2
    report = collect(registry, smoke_models=not args.no_smoke, n_tokens=args.tokens, timeout_s=args.timeout)
    if args.json:
        print(json.dumps(report))
    else:
        print(render(report))
    return 0 if report["ok"] else 1


def collect(registry: Registry, *, smoke_models: bool = True, n_tokens: int = 8, timeout_s: float = 300,
            runner: smoke.Runner = smoke.run_child) -> dict[str, Any]:
    """The whole report as one JSON-able dict; `problems` lists what cannot generate, `ok` is
    true when it is empty."""
    problems: list[str] = []
    record = install_record()
    kernels_result = smoke.smoke_kernels(runner=runner)
    build = smoke.llama_info(runner=runner)
    models = {mid: model_report(mid, spec, registry.base_dir, smoke_models, n_tokens, timeout_s, runner)
              for mid, spec in registry.models.items()}
    report: dict[str, Any] = {
        "cpu": cpu_report(),
        "install": record,
        "llama_cpp": llama_report(build, models),
        "kernels": kernels_report(kernels_result, record),
        "threads": threads_report(registry),
        "memory": memory_report(registry),
        "models": models,
    }
    if not kernels_result.ok:
        problems.append(f"kernels: {kernels_result.detail}")
    if not build.ok:
        problems.append(f"llama.cpp: {build.detail}")
    for mid, entry in models.items():
        if entry["smoke"] is not None and not entry["smoke"]["ok"]:
            problems.append(f"model {mid}: {entry['smoke']['detail']}")
    problems.extend(report["memory"]["problems"])
    for mid, mem in report["memory"]["models"].items():
        if models[mid]["smoke"] is None and mem.get("error"):  # without a smoke, the header is the only check
            problems.append(f"model {mid}: {mem['error']}")
    report["problems"] = problems
    report["ok"] = not problems
    return report


# ------------------------------------------------------------------------------------ sections
def cpu_report() -> dict[str, Any]:
    """CPU model, reported ISA extensions, and the probes' answers (capibara6.hw, as the installer ran them)."""
    machine = platform.machine()
    reported, model = reported_features(), cpu_model()
    probes = {name: {"ok": p.ok, "detail": p.detail} for name, p in run_probes(machine, reported).items()}
    shown = _ARM_SHOWN if machine in ("aarch64", "arm64") else _X86_SHOWN
    return {"model": model, "machine": machine, "cpus_online": os.cpu_count(),
            "isa": [f for f in shown if f in reported], "reported": sorted(reported), "probes": probes}


def install_record(prefix: str | None = None) -> dict[str, Any]:
    """The installer's decision file (`<sys.prefix>/capibara6-build.json`); recorded=False if absent."""
    path = Path(prefix or sys.prefix) / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except OSError:
        return {"recorded": False, "path": str(path)}
    except ValueError as err:
        return {"recorded": False, "path": str(path), "error": f"unreadable: {err}"}
    return {"recorded": True, "path": str(path), **(data if isinstance(data, dict) else {})}


def llama_report(build: smoke.SmokeResult, models: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's build (from a child) and the buffer types each llamacpp model loaded into."""
    info = build.info
    devices = (info.get("ggml") or {}).get("devices") or []
    extra = sorted({b for d in devices for b in d.get("extra_buffer_types", [])})
    loaded = {mid: m["smoke"]["info"]["buffers_mib"] for mid, m in models.items()
              if m["smoke"] and (m["smoke"].get("info") or {}).get("buffers_mib")}
    active = sorted({b for bufs in loaded.values() for b in bufs if b in _REPACK_TYPES})
    return {"ok": build.ok, "detail": None if build.ok else build.detail, "signal": build.signal,
            "version": info.get("version"), "system_info": info.get("system_info"),
            "ggml": info.get("ggml"), "extra_buffer_types": extra,
            "model_buffers_mib": loaded, "active_repack_buffer_types": active}


def kernels_report(result: smoke.SmokeResult, record: dict[str, Any]) -> dict[str, Any]:
    """Which code paths our kernels compiled, with what flags, what those flags enable, the smoke."""
    recorded = (record.get("kernels") or {}) if record.get("recorded") else {}
    if "arch_flags" in recorded:
        flags_text, source = str(recorded["arch_flags"]), "recorded by the installer"
    elif os.environ.get("CAPIBARA6_PORTABLE") == "1":
        flags_text, source = "portable", "CAPIBARA6_PORTABLE=1 (not recorded)"
    else:
        flags_text, source = os.environ.get("CAPIBARA6_KERNEL_ARCH_FLAGS", ""), "capibara6/kernels/build_ffi.py default (not recorded)"
    flags = compile_flags(flags_text)
    return {"ok": result.ok, "detail": result.detail, "signal": result.signal, "seconds": result.seconds,
            "paths": result.info.get("build"), "max_rel_errors": result.info.get("errors"),
            "arch_flags": " ".join(flags) or "(none: portable C)", "arch_flags_source": source,
            "reason": recorded.get("reason"), "compiler_enables": compiler_isa(flags)}


def compile_flags(arch_flags: str, machine: str | None = None) -> list[str]:
    """The -m flags capibara6/kernels/build_ffi.py compiles with for a recorded `arch_flags` value:
    "" = its own -march/-mcpu=native, "portable" = none, anything else = those flags."""
    if arch_flags == "portable":
        return []
    if arch_flags.strip():
        return arch_flags.split()
    m = machine or platform.machine()
    if m in ("aarch64", "arm64"):
        return ["-mcpu=native"]
    return ["-march=native"] if m in ("x86_64", "AMD64", "i686") else []


def compiler_isa(flags: list[str]) -> dict[str, bool] | None:
    """ISA extensions the C compiler turns on for `flags` (its predefined macros); None without a compiler."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    try:
        out = subprocess.run([cc, *flags, "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    defined = {ln.split()[1] for ln in out.stdout.splitlines() if ln.startswith("#define ")}
    table = _ARM_MACROS if platform.machine() in ("aarch64", "arm64") else _X86_MACROS
    return {name: macro in defined for name, macro in table.items()}


def slot_threads(spec: ModelSpec) -> tuple[int, int]:
    """(threads per generation, generations sharing the CPUs), as the pool gets them from the
    backend class: a batching instance runs one decode for all its sequences, so it is not split;
    one-sequence instances split the CPUs between `parallel` of them."""
    cls = backend_class(spec)
    return cls.threads(spec), (1 if cls.max_concurrency(spec) > 1 else spec.parallel)


def threads_report(registry: Registry) -> dict[str, Any]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 1
    quota = _cgroup_cpu_limit()
    usable, inference = usable_cpus(), inference_cpus()
    why = (f"{usable} usable CPU(s) (affinity mask {affinity}"
           + (f", cgroup quota {quota}" if quota else ", no cgroup CPU quota")
           + f"); one kept for the server and its neighbours -> {inference} for inference "
           "(llama.cpp's threads spin while waiting: more threads than free CPUs collapse decode speed)")
    models = {}
    placement = Placement()  # what each worker would be pinned to with every model loaded at once
    for mid, spec in registry.models.items():
        if spec.backend == "remote":
            continue
        n, concurrent = slot_threads(spec)
        isolation = spec.isolation
        cpus = list(placement.assign(mid, n)) if isolation == "worker" else None
        if spec.n_threads != "auto":
            how = f"pinned to {spec.n_threads}"
        elif concurrent == 1 and spec.parallel > 1:
            how = f"auto: all {inference} inference CPU(s); one batched decode serves its {spec.parallel} sequences"
        else:
            how = f"auto: {inference} inference CPU(s) / {concurrent} concurrent generation(s)"
        models[mid] = {"setting": spec.n_threads, "threads": n, "concurrent": concurrent, "why": how,
                       "isolation": isolation, "cpus": cpus}
    return {"affinity": affinity, "cgroup_quota": quota, "usable": usable, "inference": inference, "why": why,
            "models": models, "placement": {"worker_cpus": placement.cpus, "http_cpu": placement.http_cpu,
                                            "numa_nodes": placement.nodes}}


def memory_report(registry: Registry) -> dict[str, Any]:
    """RAM, the pool's budget and each local model's estimate (from its GGUF header)."""
    total = physical_memory()
    budget = budget_bytes(registry.pool.memory_budget_gb)
    models: dict[str, Any] = {}
    problems = []
    for mid, spec in registry.models.items():
        if spec.backend == "remote":
            continue
        try:
            path = model_path(spec, registry.base_dir)
            assert path is not None
        except (OSError, ImportError, ValueError) as err:
            models[mid] = {"error": f"{type(err).__name__}: {err}"}
            continue
        try:
            read_header(path)
        except (ValueError, OSError) as err:
            models[mid] = {"path": str(path), "error": f"not a readable GGUF file: {err}"}
            continue
        est = estimate(spec, registry.base_dir)
        per_instance = backend_class(spec).max_concurrency(spec)
        instances = -(-spec.parallel // per_instance)
        need = est.first + est.extra * (instances - 1)
        models[mid] = {"path": str(path), "weights": est.weights, "kv": est.kv, "estimate": need}
        if need > budget:
            problems.append(f"model {mid}: needs ~{need / GIB:.2f} GiB, more than the memory budget of "
                            f"{budget / GIB:.2f} GiB: it can never load (raise pool.memory_budget_gb or lower n_ctx)")
    return {"physical": total, "budget": budget, "budget_setting": registry.pool.memory_budget_gb,
            "max_loaded": registry.pool.max_loaded, "models": models, "problems": problems}


def model_report(mid: str, spec: ModelSpec, base_dir: Path, do_smoke: bool, n_tokens: int, timeout_s: float,
                 runner: smoke.Runner) -> dict[str, Any]:
    """One registry entry: its smoke generation (a child), or for a remote its /v1/models."""
    entry: dict[str, Any] = {"backend": spec.backend, "source": spec.source.label,
                             "parallel": spec.parallel, "n_ctx": spec.n_ctx, "smoke": None}
    if not do_smoke:
        return entry
    if spec.backend == "remote":
        entry["smoke"] = remote_check(mid, spec).to_dict()
    else:
        entry["smoke"] = smoke.smoke_model(mid, spec, base_dir, n_tokens, timeout_s, runner=runner).to_dict()
    return entry


def remote_check(mid: str, spec: ModelSpec, timeout_s: float = REMOTE_TIMEOUT_S) -> smoke.SmokeResult:
    """GET <url>/v1/models: reachable, and lists the model we would ask for."""
    import httpx

    from .backends.remote import base_url

    assert spec.source.url is not None
    url = base_url(spec.source.url) + "/v1/models"
    key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
    t0 = time.monotonic()
    try:
        r = httpx.get(url, timeout=timeout_s, headers={"Authorization": f"Bearer {key}"} if key else None)
        r.raise_for_status()
        ids = [str(m.get("id")) for m in r.json().get("data", [])]
    except (httpx.HTTPError, ValueError, AttributeError, TypeError) as err:
        return smoke.SmokeResult(mid, False, f"remote {url} does not answer: {type(err).__name__}: {err}",
                                 seconds=time.monotonic() - t0)
    want = spec.remote_model or mid
    dt = time.monotonic() - t0
    if want not in ids:
        return smoke.SmokeResult(mid, False, f"remote {url} answers but does not list {want!r} (it lists {ids[:8]})", seconds=dt)
    return smoke.SmokeResult(mid, True, f"remote {url} lists {want!r}", seconds=dt)


# ------------------------------------------------------------------------------------ text
def render(report: dict[str, Any]) -> str:
    """The report for a person: one section per concern, problems last."""
    lines: list[str] = []
    add = lines.append
    cpu = report["cpu"]
    add(f"CPU        {cpu['model']} ({cpu['machine']}, {cpu['cpus_online']} CPUs online)")
    add(f"  reports  {' '.join(cpu['isa']) or '(none of the extensions we use)'}")
    if cpu["probes"] is None:
        add("  probes   capibara6.hw is not installed: not probed")
    else:
        for name, p in cpu["probes"].items():
            add(f"  probe    {name:12} {'ok' if p['ok'] else 'NO':3} {p['detail']}")
    _render_install(add, report["install"])
    _render_llama(add, report["llama_cpp"])
    k = report["kernels"]
    paths = [n for n in ("neon", "avx2", "avx512", "fma") if (k["paths"] or {}).get(n)]
    add(f"kernels    {'ok' if k['ok'] else 'FAILED'}: {k['detail']}")
    add(f"  paths    {' '.join(paths) or 'portable C'}; flags {k['arch_flags']} ({k['arch_flags_source']})")
    if k["compiler_enables"] is not None:
        add("  enables  " + " ".join(f"{n}{'' if v else '(no)'}" for n, v in k["compiler_enables"].items()))
    t = report["threads"]
    add(f"threads    {t['why']}")
    for mid, m in t["models"].items():
        add(f"  {mid:28} {m['threads']} thread(s) per generation ({m['why']})")
        if m.get("cpus") is not None:
            add(f"  {'':28} worker pinned to CPU(s) {','.join(map(str, m['cpus']))} (with every model loaded)")
    pl = t.get("placement")
    if pl:
        add(f"placement  workers on CPU(s) {','.join(map(str, pl['worker_cpus']))}; HTTP keeps "
            + (f"CPU {pl['http_cpu']}" if pl["http_cpu"] is not None else "no CPU of its own (2 or fewer)")
            + f"; {len(pl['numa_nodes'])} NUMA node(s), each worker inside one where it fits")
    mem = report["memory"]
    add(f"memory     budget {mem['budget'] / GIB:.2f} GiB (memory_budget_gb: {mem['budget_setting']}; "
        f"RAM or cgroup limit {mem['physical'] / GIB:.2f} GiB), at most {mem['max_loaded']} models loaded")
    for mid, m in mem["models"].items():
        add(f"  {mid:28} " + (m["error"] if "error" in m else
                               f"~{m['estimate'] / GIB:.2f} GiB (weights {m['weights'] / GIB:.2f}, KV {m['kv'] / GIB:.2f})"))
    add("models")
    for mid, m in report["models"].items():
        s = m["smoke"]
        if s is None:
            add(f"  {mid:28} {m['backend']:9} smoke skipped")
        elif s["ok"]:
            speed = f", {s['tok_s']:.1f} tok/s decode" if s["tok_s"] else ""
            add(f"  {mid:28} {m['backend']:9} ok: {s['tokens']} tokens in {s['seconds']:.1f} s{speed}"
                if s["tokens"] else f"  {mid:28} {m['backend']:9} ok: {s['detail']}")
        else:
            add(f"  {mid:28} {m['backend']:9} FAILED: {s['detail']}")
    if report["problems"]:
        add(f"{len(report['problems'])} problem(s): something cannot generate")
        lines.extend(f"  - {p}" for p in report["problems"])
    else:
        add("ok: every model generates")
    return "\n".join(lines)


def _render_install(add: Any, rec: dict[str, Any]) -> None:
    if not rec.get("recorded"):
        add(f"install    not recorded ({rec['path']}{': ' + rec['error'] if rec.get('error') else ''})")
        return
    llama, kern = rec.get("llama_cpp") or {}, rec.get("kernels") or {}
    add(f"install    recorded {rec.get('decided_at', '?')} in {rec['path']}")
    add(f"  llama.cpp {llama.get('version', '?')}: CMAKE_ARGS=\"{llama.get('cmake_args', '')}\" ({llama.get('reason', '')})")
    add(f"  kernels  {kern.get('arch_flags') or '-march/-mcpu=native'} ({kern.get('reason', '')})")


def _render_llama(add: Any, ll: dict[str, Any]) -> None:
    if not ll["ok"]:
        add(f"llama.cpp  FAILED: {ll['detail']}")
        return
    add(f"llama.cpp  llama-cpp-python {ll['version']}: {ll['system_info']}")
    add(f"  extra buffer types offered: {', '.join(ll['extra_buffer_types']) or 'none'}")
    for mid, bufs in ll["model_buffers_mib"].items():
        add(f"  {mid} weights in: " + ", ".join(f"{name} {mib:.1f} MiB" for name, mib in bufs.items()))
    if ll["model_buffers_mib"]:
        add(f"  repacked weights (active): {', '.join(ll['active_repack_buffer_types']) or 'none'}")
