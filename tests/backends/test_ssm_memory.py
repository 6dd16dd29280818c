"""The memory estimate of a state-space model against the RSS llama.cpp really adds.

A Mamba-2 file whose recurrent state dominates (4 layers, d_inner 1024, d_state 128: 2.16 MB of
state per sequence against 3.7 MB of weights) is loaded on the batched backend with 2 and with 32
parallel sequences, each in a fresh child process. The RSS growth of the load, minus the same for
2 sequences, cancels what does not scale with sequences (the weights' mapping, the tokenizer,
compute buffers sized by the vocabulary); what is left is 30 more recurrent states, and that is
what the estimate says they cost. Measured on the dev VM: 64.77 MB grown for 64.76 MB estimated
(0.02%), so a 5% tolerance leaves room for allocator rounding and still catches every mistake
that matters: counting F16 instead of F32 (50%), missing the conv state or a layer (>= 25%), or
not scaling with `parallel` at all (100%). The absolute growth must also lie between the sequence
memory and the whole first-instance estimate the pool budgets with.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .ssm_models import write_tiny_mamba2

BIG_STATE = {"d_inner": 1024, "d_state": 128, "n_head": 16, "n_layer": 4}

_CHILD = """
import gc, json, sys
from pathlib import Path
from capibara6.backends.llamacpp.batched import LlamaCppBatchedBackend
from capibara6.config import parse_registry
import llama_cpp  # mapped before the baseline

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

path, parallel = Path(sys.argv[1]), int(sys.argv[2])
entry = {"source": {"path": str(path)}, "chat_format": "chatml", "n_ctx": 4096, "n_threads": 1, "parallel": parallel}
spec = parse_registry({"models": {"m": entry}}).models["m"]
est = LlamaCppBatchedBackend.estimate(spec, path)
gc.collect()
before = rss()
backend = LlamaCppBatchedBackend.load("m", spec, path, 1)
print(json.dumps({"growth": rss() - before, "kv": est.kv, "first": est.first, "metric": backend.kv_cache_bytes()}))
"""


def measure(path: Path, parallel: int) -> dict[str, int]:
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(parallel)], cwd=root, capture_output=True,
                         text=True, timeout=300, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_recurrent_state_estimate_matches_rss_growth(tmp_path: Path) -> None:
    path = write_tiny_mamba2(tmp_path / "big-state-mamba2.gguf", dims=BIG_STATE)
    small, large = measure(path, 2), measure(path, 32)
    assert large["metric"] == large["kv"] and small["metric"] == small["kv"]  # capibara6_kv_cache_bytes
    assert large["kv"] == 16 * small["kv"]  # no KV cells at all: only states, one per sequence
    grown, estimated = large["growth"] - small["growth"], large["kv"] - small["kv"]
    assert abs(grown - estimated) <= 0.05 * estimated, (grown, estimated)
    assert large["kv"] <= large["growth"] <= large["first"], large
