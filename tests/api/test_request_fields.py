"""The one rule for request fields (capibara6/api/protocol.py), through the real `openai` client
against a real server and the real Gemma 3 270M: every field is honoured, accepted because it
changes nothing, or refused with a 400 whose `param` names it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import gemma_registry
from tests.serverproc import ServerProcess

MODEL = "gemma3-270m"
CHAT = [{"role": "user", "content": "Name a colour."}]
PROMPT = "The three primary colours are"
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def fsrv(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(gemma_registry(gemma_path), tmp_path_factory.mktemp("fields")).wait_healthy()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def vocab(gemma_path: Path) -> Any:
    from llama_cpp import Llama

    return Llama(model_path=str(gemma_path), vocab_only=True, verbose=False)


def client(server: ServerProcess, role: str = "standard") -> OpenAI:
    return OpenAI(base_url=server.url[role] + "/v1", api_key="unused", max_retries=0, timeout=120)


def refused(call: Any, **kwargs: Any) -> dict[str, Any]:
    """The error body of a call that must be a 400."""
    with pytest.raises(openai.BadRequestError) as info:
        call(**kwargs)
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "invalid_request_error" and body["message"], body
    return body


def chat(server: ServerProcess, role: str = "standard", **kwargs: Any) -> Any:
    return client(server, role).chat.completions.create(**{"model": MODEL, "messages": CHAT, "max_tokens": 2, **kwargs})


def completion(server: ServerProcess, role: str = "standard", **kwargs: Any) -> Any:
    return client(server, role).completions.create(**{"model": MODEL, "prompt": PROMPT, "max_tokens": 2, **kwargs})


def single_token(vocab: Any, text: str) -> int:
    ids = vocab.tokenize(text.encode(), add_bos=False, special=False)
    assert len(ids) == 1, (text, ids)
    return int(ids[0])


# -- known, unsupported: 400 naming the field -------------------------------------------------------

CHAT_REFUSED = [
    ("functions", [TOOL["function"]]),
    ("function_call", "auto"),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("web_search_options", {}),
    ("reasoning_effort", "high"),
    ("verbosity", "low"),
    ("moderation", {"model": "omni-moderation-latest"}),
]


@pytest.mark.parametrize(("field", "value"), CHAT_REFUSED, ids=[f"{f}={v!r}"[:40] for f, v in CHAT_REFUSED])
def test_unsupported_chat_field_is_400_naming_it(fsrv: ServerProcess, field: str, value: Any) -> None:
    body = refused(chat, server=fsrv, **{field: value})
    assert body["param"] == field
    assert "not supported" in body["message"]
    if "function" in field:
        assert "deprecated functions API" in body["message"] and "tools" in body["message"]


def test_message_with_function_call_is_400(fsrv: ServerProcess) -> None:
    """The deprecated assistant `function_call` is refused, not dropped from the prompt."""
    messages = [*CHAT, {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}}]
    body = refused(chat, server=fsrv, messages=messages)
    assert body["param"] == "messages" and "function_call" in body["message"]


def test_tool_message_needs_a_call_id(fsrv: ServerProcess) -> None:
    body = refused(chat, server=fsrv, messages=[*CHAT, {"role": "tool", "content": "sunny"}])
    assert body["param"] == "messages" and "tool_call_id" in body["message"]


@pytest.mark.parametrize(("field", "value"), [("best_of", 3), ("suffix", " and so on.")])
def test_unsupported_completion_field_is_400_naming_it(fsrv: ServerProcess, field: str, value: Any) -> None:
    body = refused(completion, server=fsrv, **{field: value})
    assert body["param"] == field and "not supported" in body["message"]


# -- accepted: no-op defaults and fields that change nothing ----------------------------------------

NO_EFFECT: dict[str, Any] = {
    "user": "user-1", "safety_identifier": "hash-1", "metadata": {"k": "v"}, "store": True, "service_tier": "flex",
    "prompt_cache_key": "k1", "prompt_cache_retention": "24h",
}


def test_no_op_values_and_no_effect_fields_are_accepted(fsrv: ServerProcess) -> None:
    out = chat(
        fsrv, temperature=0, tools=[], tool_choice="none", parallel_tool_calls=True, functions=[], function_call="none",
        modalities=["text"], reasoning_effort="none", verbosity="medium", n=1, logprobs=False, audio=None,
        prediction={"type": "content", "content": "Red."}, logit_bias={}, **NO_EFFECT,
        extra_body={"prompt_cache_options": {"mode": "implicit", "ttl": "30m"}},
    )
    assert out.choices[0].finish_reason in ("stop", "length")
    # OpenAI's completions take `user` only; the other no-effect fields are accepted there too
    out = completion(fsrv, temperature=0, best_of=1, suffix="", n=1, echo=False, user="user-1", extra_body=NO_EFFECT)
    assert out.choices[0].text is not None
    # null is absent, as in OpenAI's API (the SDK sends an explicit None as null)
    nulls: dict[str, Any] = dict(temperature=None, top_p=None, n=None, stop=None, seed=None, presence_penalty=None,
                                 frequency_penalty=None, logprobs=None, logit_bias=None, stream=None, stream_options=None)
    out = chat(fsrv, **nulls, top_logprobs=None, max_completion_tokens=None, response_format=None)
    assert out.choices[0].finish_reason in ("stop", "length")
    usage = completion(fsrv, **nulls, echo=None, max_tokens=None).usage
    assert usage is not None and usage.completion_tokens <= 16  # null: the default 16
    streamed = list(chat(fsrv, stream=True, stream_options={"include_usage": True, "include_obfuscation": False}))
    assert streamed[-1].usage is not None


# -- unknown: 400 naming the field --------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_unknown_field_is_400_naming_it(fsrv: ServerProcess, endpoint: str) -> None:
    call = chat if endpoint == "chat" else completion
    body = refused(call, server=fsrv, extra_body={"temprature": 0.5})
    assert body["param"] == "temprature" and "Unrecognized request argument" in body["message"]
    # a field of the other endpoint is unknown here too
    other = {"tools": [TOOL]} if endpoint == "completions" else {"echo": True}
    assert refused(call, server=fsrv, extra_body=other)["param"] == next(iter(other))
    # a nested unknown field names its top-level field
    body = refused(call, server=fsrv, stream=True, stream_options={"include_usage": True, "include_uasge": True})  # type: ignore[typeddict-unknown-key]
    assert body["param"] == "stream_options"


def test_capibara6_extensions_are_known(fsrv: ServerProcess) -> None:
    out = chat(fsrv, temperature=0, extra_body={"top_k": 5, "min_p": 0.05, "repeat_penalty": 1.1})
    assert out.choices[0].message.content is not None


# -- stream_options only with a stream ----------------------------------------------------------------


def test_stream_options_without_stream_is_400(fsrv: ServerProcess) -> None:
    for call in (chat, completion):
        assert refused(call, server=fsrv, stream_options={"include_usage": True})["param"] == "stream_options"
        body = refused(call, server=fsrv, stream=False, stream_options={"include_usage": True})
        assert body["param"] == "stream_options" and "stream" in body["message"]
        assert refused(call, server=fsrv, role="consensus", stream_options={"include_usage": True})["param"] == "stream_options"
    # on the streaming port `stream` defaults to true: stream_options alone is fine there
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "stream_options": {"include_usage": True}}
    r = httpx.post(fsrv.url["streaming"] + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n") and '"usage":{"prompt_tokens"' in r.text.replace(" ", "")
    body = refused(chat, server=fsrv, role="streaming", stream=False, stream_options={"include_usage": True})
    assert body["param"] == "stream_options"


# -- seed --------------------------------------------------------------------------------------------------


def test_seed_outside_int64_is_400(fsrv: ServerProcess) -> None:
    for seed in (2**63, -(2**63) - 1, 10**30):
        assert refused(completion, server=fsrv, seed=seed)["param"] == "seed"
    for seed in (2**63 - 1, -(2**63)):  # the ends of int64 are served
        out = completion(fsrv, seed=seed, n=2, temperature=0.8)  # choice 1 uses seed + 1: past int64 at the top end
        assert [c.finish_reason in ("stop", "length") for c in out.choices] == [True, True]


# -- logit_bias --------------------------------------------------------------------------------------------

BAD_BIAS = [
    {"-1": 5}, {"abc": 5}, {"1.5": 5}, {"01": 5}, {" 1": 5},
    {"1": 101}, {"1": -100.5}, {"1": "x"}, {"1": None}, {"1": True},
    {str(i): 1 for i in range(1025)},
]


@pytest.mark.parametrize("bias", BAD_BIAS, ids=[repr(b)[:24] for b in BAD_BIAS])
def test_logit_bias_bad_values_are_400(fsrv: ServerProcess, bias: dict[str, Any]) -> None:
    assert refused(chat, server=fsrv, logit_bias=bias)["param"] == "logit_bias"
    assert refused(completion, server=fsrv, logit_bias=bias)["param"] == "logit_bias"


def test_logit_bias_plus_100_forces_the_token(fsrv: ServerProcess, vocab: Any) -> None:
    zebra = single_token(vocab, " zebra")
    out = completion(fsrv, temperature=0, max_tokens=1, logit_bias={str(zebra): 100})
    assert out.choices[0].text == " zebra"
    out = chat(fsrv, temperature=0, max_tokens=1, logit_bias={str(zebra): 100})
    assert out.choices[0].message.content == " zebra"


def test_logit_bias_minus_100_bans_the_greedy_token(fsrv: ServerProcess, vocab: Any) -> None:
    first = completion(fsrv, temperature=0, max_tokens=1).choices[0].text
    banned = single_token(vocab, first)
    assert vocab.detokenize([banned]).decode() == first
    out = completion(fsrv, temperature=0, max_tokens=1, logprobs=1, logit_bias={str(banned): -100})
    assert out.choices[0].text != first
    assert out.choices[0].logprobs is not None and first not in (out.choices[0].logprobs.tokens or [])


def test_logit_bias_outside_the_vocabulary_is_400(fsrv: ServerProcess, vocab: Any) -> None:
    body = refused(completion, server=fsrv, logit_bias={str(vocab.n_vocab()): 5})
    assert body["param"] == "logit_bias"


# -- other request checks ------------------------------------------------------------------------------------


def test_top_logprobs_needs_logprobs(fsrv: ServerProcess) -> None:
    assert refused(chat, server=fsrv, top_logprobs=3)["param"] == "top_logprobs"


def test_out_of_vocabulary_prompt_ids_are_400(fsrv: ServerProcess) -> None:
    body = refused(completion, server=fsrv, prompt=[10**7])
    assert body["param"] == "prompt"
    body = refused(completion, server=fsrv, prompt=[[2, 651], [2, 10**7]])
    assert body["param"] == "prompt"
    assert completion(fsrv, prompt=[2, 651]).choices[0].finish_reason in ("stop", "length")  # in the vocabulary: served
