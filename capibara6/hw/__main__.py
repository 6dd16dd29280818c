"""`python -m capibara6.hw decide|fallback|record-smoke --state FILE`: the installer's CPU decisions.

Run by scripts/_install.sh from the repository root before the project is installed, so it uses
the standard library only. `decide` probes and prints shell assignments for the installer to
`eval` (the human-readable decision goes to stderr); `fallback` switches the recorded llama.cpp
build to its fallback after a smoke generation died by a signal; `record-smoke` keeps a smoke
result. The state file (JSON) is what `capibara6 doctor` shows as the install decision.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from .decide import decide
from .probes import cpu_model, reported_features, run_probes


def _read(state: Path) -> dict[str, Any]:
    try:
        data = json.loads(state.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(state: Path, data: dict[str, Any]) -> None:
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, state)


def _shell(llama: dict[str, Any], kernels: dict[str, Any]) -> str:
    pairs = {
        "C6_LLAMA_CMAKE_ARGS": llama["cmake_args"],
        "C6_LLAMA_FALLBACK_CMAKE_ARGS": llama.get("fallback_cmake_args") or "",
        "C6_LLAMA_SOURCE": llama["source"],
        "C6_KERNEL_ARCH_FLAGS": kernels["arch_flags"],
    }
    return "".join(f"{key}={shlex.quote(str(value))}\n" for key, value in pairs.items())


def cmd_decide(args: argparse.Namespace) -> int:
    machine = platform.machine()
    reported = reported_features()
    probes = run_probes(machine, reported)
    d = decide(machine, probes, os.environ.get("CMAKE_ARGS"))
    llama = {"version": args.llama_version, "cmake_args": d.cmake_args, "native": d.native, "source": d.source,
             "reason": d.reason, "fallback_cmake_args": d.fallback_cmake_args}
    kernels = {"arch_flags": d.kernel_arch_flags, "reason": d.kernel_reason}
    data = {"decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine, "cpu_model": cpu_model(),
            "probes": {name: {"ok": p.ok, "detail": p.detail} for name, p in probes.items()},
            "llama_cpp": llama, "kernels": kernels, "smoke": {}}
    _write(args.state, data)
    print(f"capibara6 install: CPU {data['cpu_model']} ({machine})", file=sys.stderr)
    for name, p in probes.items():
        print(f"  probe {name:12} {'ok  ' if p.ok else 'NO  '} {p.detail}", file=sys.stderr)
    print(f"  llama.cpp: CMAKE_ARGS=\"{d.cmake_args}\" ({d.source}: {d.reason})", file=sys.stderr)
    print(f"  kernels:   {d.kernel_arch_flags or '-march/-mcpu=native'} ({d.kernel_reason})", file=sys.stderr)
    sys.stdout.write(_shell(llama, kernels))
    return 0


def cmd_fallback(args: argparse.Namespace) -> int:
    data = _read(args.state)
    llama = data.get("llama_cpp") or {}
    fallback = llama.get("fallback_cmake_args")
    if not fallback:
        print("capibara6 install: no fallback build left", file=sys.stderr)
        return 1
    llama.update(cmake_args=fallback, native=False, source="fallback", fallback_cmake_args=None,
                 reason=f"{args.why}; rebuilt with the fallback flags (probed extensions without the usual suspects)")
    data["llama_cpp"] = llama
    _write(args.state, data)
    sys.stdout.write(_shell(llama, data.get("kernels") or {"arch_flags": ""}))
    return 0


def cmd_record_smoke(args: argparse.Namespace) -> int:
    data = _read(args.state)
    try:
        result = json.loads(args.result)
    except ValueError:
        result = {"ok": False, "detail": args.result}
    data.setdefault("smoke", {})[args.target] = result
    if args.kernel_arch_flags is not None:
        data.setdefault("kernels", {}).update(arch_flags=args.kernel_arch_flags, reason=args.why or "")
    _write(args.state, data)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m capibara6.hw", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("decide", help="probe the CPU, record and print the build flags")
    d.add_argument("--state", type=Path, required=True)
    d.add_argument("--llama-version", default="")
    f = sub.add_parser("fallback", help="switch the recorded llama.cpp build to its fallback")
    f.add_argument("--state", type=Path, required=True)
    f.add_argument("--why", required=True)
    r = sub.add_parser("record-smoke", help="keep a smoke result (JSON) under a target name")
    r.add_argument("--state", type=Path, required=True)
    r.add_argument("--target", required=True)
    r.add_argument("--result", required=True)
    r.add_argument("--kernel-arch-flags", default=None, help="the kernels were rebuilt with these flags")
    r.add_argument("--why", default=None)
    args = p.parse_args(argv)
    handlers = {"decide": cmd_decide, "fallback": cmd_fallback, "record-smoke": cmd_record_smoke}
    return handlers[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
