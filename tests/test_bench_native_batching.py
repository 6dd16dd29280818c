"""scripts/bench_native_batching.py without models: its arguments, the registries it writes (valid
for capibara6's own parser) and the shape of its last-line JSON."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from capibara6.config import parse_registry

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_native_batching.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_native_batching", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_defaults_are_the_issue_benchmark(bench):
    a = bench.parse_args([])
    assert (a.threads, a.parallel, a.concurrency, a.requests, a.max_tokens, a.endpoint) == (1, 8, [1, 4, 8], 16, 64, "chat")
    assert a.contestants == ["native-batched", "native-single", "llamacpp-batched"]
    assert a.n_ctx == 2048


def test_subset_and_bad_arguments(bench, capsys):
    a = bench.parse_args(["--contestants", "llamacpp-batched,native-batched", "--concurrency", "1,8"])
    assert a.contestants == ["native-batched", "llamacpp-batched"] and a.concurrency == [1, 8]
    for bad in (["--contestants", "native,foo"], ["--concurrency", "1,x"], ["--concurrency", "0"],
                ["--n-ctx", "256", "--parallel", "8"], ["--threads", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    capsys.readouterr()


def test_registries_parse_and_differ_only_as_documented(bench, tmp_path):
    a = bench.parse_args(["--threads", "2", "--parallel", "4", "--n-ctx", "1024", "--prefill-chunk", "128"])
    gguf = str(tmp_path / "m.gguf")
    specs = {}
    for label in bench.CONTESTANTS:
        reg = parse_registry(bench.registry(label, a, gguf, "gemma"), tmp_path)
        (spec,) = reg.models.values()
        specs[label] = spec
        assert (spec.n_threads, spec.prefill_chunk, spec.isolation, spec.chat_format) == (2, 128, "worker", "gemma")
        assert reg.pool.warmup == [bench.MODEL_ID]
    nb, ns, lb = specs["native-batched"], specs["native-single"], specs["llamacpp-batched"]
    assert (nb.backend, nb.parallel, nb.kv_cache, nb.n_ctx) == ("native", 4, "fp8", 1024)
    assert (ns.backend, ns.parallel, ns.kv_cache, ns.n_ctx) == ("native", 1, "fp8", 256)
    assert (lb.backend, lb.parallel, lb.kv_cache, lb.n_ctx) == ("llamacpp", 4, None, 1024)


def _level(c, tok_s, p50, p95, errors=0):
    return {"concurrency": c, "aggregate_tok_s": tok_s, "ttft_s": {"p50": p50, "p95": p95}, "completed": 16 - errors,
            "errors": errors}


def test_report_json_shape_ratios_and_goals(bench):
    a = bench.parse_args(["--concurrency", "1,8"])
    runs = {
        "native-batched": {1: _level(1, 30.0, 0.1, 0.1), 8: _level(8, 120.0, 0.2, 0.3)},
        "native-single": {1: _level(1, 30.0, 0.1, 0.1), 8: _level(8, 30.0, 1.0, 2.0)},
        "llamacpp-batched": {1: _level(1, 40.0, 0.05, 0.05), 8: _level(8, 100.0, 0.2, 0.4)},
    }
    kv = {"native_fp32": 36864, "native_fp8": 9360, "fp8_vs_fp32": 0.254}
    machine = bench.machine_state((0.1, 0.1, 0.1), (1.0, 0.5, 0.2))
    doc = json.loads(json.dumps(bench.build_report(a, runs, kv, {"native-batched": 1.0}, machine, model="m.gguf")))
    assert doc["results"]["native-batched"]["c8"] == {"agg_tok_s": 120.0, "ttft_p50_s": 0.2, "ttft_p95_s": 0.3,
                                                      "completed": 16, "errors": 0}
    assert doc["ratios"] == {
        "native_batched_vs_llamacpp_batched_tok_s_c8": 1.2, "native_batched_vs_llamacpp_batched_ttft_p95_c8": 0.75,
        "native_batched_vs_native_single_tok_s_c8": 4.0, "native_batched_vs_native_single_tok_s_c1": 1.0,
        "kv_fp8_vs_fp32_bytes_per_token": 0.254,
    }
    assert all(doc["goals"].values())
    assert doc["machine"]["state"] == "quiet" and doc["machine"]["cpus"] >= 1
    assert doc["model"] == "m.gguf" and doc["concurrency"] == [1, 8]


def test_report_with_a_subset_has_no_ratio_it_cannot_compute(bench):
    a = bench.parse_args(["--contestants", "native-single", "--concurrency", "1"])
    runs = {"native-single": {1: _level(1, 30.0, 0.1, 0.1)}}
    doc = bench.build_report(a, runs, {}, {}, bench.machine_state((9.0,) * 3, (9.0,) * 3))
    assert set(doc["results"]) == {"native-single"}
    assert all(v is None for v in doc["ratios"].values()) and all(v is None for v in doc["goals"].values())
    assert doc["machine"]["state"] == "loaded"
