"""200 load/unload cycles through workers: the server process itself grows less than 5 MB, since
every unload is a worker's exit (issue 15; in process the same soak grew 37 MB in steps)."""

from __future__ import annotations

from pathlib import Path

import httpx

from capibara6.workers.proxy import _rss_bytes
from tests.conftest import gemma_registry
from tests.serverproc import ServerProcess

CYCLES = 200
WARM = 5


def test_200_load_unload_cycles_keep_the_server_flat(gemma_path: Path, tmp_path: Path) -> None:
    reg = gemma_registry(gemma_path)
    reg["defaults"]["isolation"] = "worker"
    proc = ServerProcess(reg, tmp_path).wait_healthy()
    url = proc.url["standard"]
    try:
        def cycle() -> None:
            assert httpx.post(url + "/admin/models/gemma3-270m/load", timeout=60).json()["status"] == "ready"
            assert httpx.post(url + "/admin/models/gemma3-270m/unload", timeout=60).json()["unloaded"] is True

        for _ in range(WARM):
            cycle()
        before = _rss_bytes(proc.proc.pid)
        for _ in range(CYCLES):
            cycle()
        grown = _rss_bytes(proc.proc.pid) - before
        assert before > 0 and grown < 5 * 1024 * 1024, f"server grew {grown / 1e6:.1f} MB over {CYCLES} cycles"
    finally:
        proc.stop()
