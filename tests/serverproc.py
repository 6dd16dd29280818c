"""Start a real capibara6 server in a subprocess on free loopback ports (test helper)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`capibara6 serve` with a registry written from `registry`; ports per role in `.url[role]`."""

    def __init__(self, registry: dict[str, Any], tmp: Path, args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.config = tmp / "models.yaml"
        self.config.write_text(yaml.safe_dump(registry, sort_keys=False))
        self.ports = {"standard": free_port(), "streaming": free_port(), "consensus": free_port()}
        self.url = {role: f"http://127.0.0.1:{port}" for role, port in self.ports.items()}
        ports = ",".join(str(self.ports[r]) for r in ("standard", "streaming", "consensus"))
        cmd = [sys.executable, "-m", "capibara6", "serve", "--config", str(self.config), "--ports", ports, *(args or [])]
        self.log = tmp / "capibara6.log"
        self._logf = self.log.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._logf, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def wait_healthy(self, timeout: float = 60.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if all(httpx.get(u + "/health", timeout=1).status_code == 200 for u in self.url.values()):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not healthy:\n{self.log.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()
        return self.proc.returncode
