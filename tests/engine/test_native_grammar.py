"""Grammar-constrained sampling on the native engine (capibara6/engine/grammar.py, sampler.py,
backends/native.py) with Gemma 3 270M: llama.cpp's grammar engine on our logits."""

from __future__ import annotations

import gc
import json
import pathlib
import threading
from typing import Any, Iterator

import jsonschema
import numpy as np
import openai
import pytest
from llama_cpp import llama_grammar
from openai import OpenAI

from capibara6.backends.native import NativeBackend
from capibara6.engine.gguf_loader import GGUFModel
from capibara6.engine.grammar import Grammar, GrammarError, live_grammars
from capibara6.engine.runner import Runner
from capibara6.engine.sampler import Sampler
from capibara6.types import GenerationOutcome, SamplingParams
from tests.conftest import gemma_registry
from tests.fakes import prepared
from tests.serverproc import ServerProcess

JSON = llama_grammar.JSON_GBNF
PROMPT = "A JSON object describing a cat:"
FEW_SHOT = 'Example: {"name": "Tom", "color": "black"}\nAnother cat as JSON:'
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "color": {"enum": ["black", "white", "ginger"]},
                   "age": {"type": "integer"}},  # llama-cpp-python's converter ignores minimum/maximum
    "required": ["name", "color", "age"], "additionalProperties": False,
}
YES_NO = 'root ::= " yes" | " no"'


@pytest.fixture(scope="module")
def backend(gemma_model: GGUFModel, gemma_tokenizer) -> NativeBackend:  # type: ignore[no-untyped-def]
    runner = Runner(gemma_model, n_ctx=256, kv_cache="fp8", ops="kernels")
    return NativeBackend("gemma3-270m-native", runner, gemma_tokenizer, "gemma")


def run(b: NativeBackend, prompt: str, **kw: Any) -> tuple[str, GenerationOutcome]:
    out = GenerationOutcome()
    events = list(b.generate(prepared(b, prompt), SamplingParams(**kw), out, threading.Event()))
    return "".join(e.text for e in events), out


def schema_gbnf(schema: dict[str, Any]) -> str:
    return llama_grammar.json_schema_to_gbnf(json.dumps(schema))


# -- the sampler's cheap path is the full mask's answer -------------------------------------------


def test_best_and_top_k_equal_the_full_mask(backend: NativeBackend) -> None:
    """Asking few candidates gives what masking all 262,144 tokens would give, token by token."""
    tok, runner = backend.tokenizer, backend.runner
    g = Grammar.for_tokenizer(tok, JSON)
    try:
        runner.reset()
        logits = runner.prefill(tok.tokenize(PROMPT))
        for _ in range(10):
            masked = g.mask(logits)
            assert g.best(logits) == int(np.argmax(masked))
            allowed = np.flatnonzero(np.isfinite(masked))
            top = g.top_allowed(logits, 40)
            expect = allowed[np.argsort(-masked[allowed], kind="stable")][:40]
            assert set(top.tolist()) == set(expect.tolist())
            t = g.best(logits)
            g.accept(t)
            logits = runner.forward([t])
    finally:
        g.close()


def full_mask_draw(s: Sampler, masked: np.ndarray) -> int:
    """The reference: `_draw`'s pool on the fully masked logits (top-k, then top-p inside it),
    best first, drawn with one random number from s.rng (min-p and temperature in `_pick`)."""
    allowed = np.flatnonzero(np.isfinite(masked))
    pool = allowed[np.lexsort((allowed, -masked[allowed]))]
    if s.top_k > 0:
        pool = pool[: s.top_k]
    if s.top_p < 1.0:
        c = np.cumsum(np.exp(masked[pool].astype(np.float64) - masked[pool[0]]))
        pool = pool[: int(np.searchsorted(c, s.top_p * c[-1], side="left")) + 1]
    return s._pick(masked, pool)


@pytest.mark.parametrize(("top_k", "top_p", "min_p"),
                         [(0, 0.9, 0.0), (0, 0.5, 0.0), (0, 1.0, 0.05), (0, 0.95, 0.1), (40, 1.0, 0.0), (40, 0.9, 0.0),
                          (5, 1.0, 0.05)])
def test_cut_samplers_draw_what_the_full_mask_draws(backend: NativeBackend, top_k: int, top_p: float, min_p: float) -> None:
    """Same seed, token for token: the chunked draw (Sampler._constrained_draw) against drawing
    from the logits with all 262,144 tokens masked."""
    tok, runner = backend.tokenizer, backend.runner
    g, g_ref = Grammar.for_tokenizer(tok, JSON), Grammar.for_tokenizer(tok, JSON)
    kw = {"temperature": 0.9, "top_k": top_k, "top_p": top_p, "min_p": min_p, "seed": 11}
    s, ref = Sampler(grammar=g, **kw), Sampler(**kw)  # type: ignore[arg-type]
    try:
        runner.reset()
        logits = runner.prefill(tok.tokenize(PROMPT))
        for _ in range(12):
            t = s.sample(logits, []).token
            assert t == full_mask_draw(ref, g_ref.mask(logits))
            g_ref.accept(t)
            logits = runner.forward([t])
    finally:
        g.close()
        g_ref.close()


def test_a_complete_grammar_allows_only_end_of_generation(backend: NativeBackend) -> None:
    tok = backend.tokenizer
    g = Grammar.for_tokenizer(tok, YES_NO)
    try:
        flat = np.zeros(tok.n_vocab, dtype=np.float32)
        first = set(g.top_allowed(flat, 1000).tolist())
        pieces = {tok.piece(t) for t in first}
        assert {b" yes", b" no"} <= pieces and all(b" yes".startswith(p) or b" no".startswith(p) for p in pieces)
        g.accept(tok.tokenize(" yes", add_bos=False)[0])
        assert set(g.top_allowed(flat, 1000).tolist()) == set(tok.eog_ids)
        with pytest.raises(GrammarError):
            g.accept(tok.tokenize(" no", add_bos=False)[0])  # checked here: llama.cpp would abort
    finally:
        g.close()


def test_completed_grammar_ends_the_generation_with_stop(backend: NativeBackend) -> None:
    text, out = run(backend, "Is water wet? Answer:", max_tokens=8, temperature=0.0, grammar=YES_NO)
    assert text in (" yes", " no") and out.finish_reason == "stop" and out.completion_tokens < 8


@pytest.mark.parametrize("kw", [
    {"temperature": 0.0},
    {"temperature": 1.0, "seed": 1},  # rejection draws
    {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 2},  # the k best allowed tokens
    {"temperature": 0.9, "top_p": 0.9, "min_p": 0.05, "seed": 3},  # chunks until certain
    {"temperature": 0.7, "repeat_penalty": 1.3, "frequency_penalty": 0.5, "seed": 4},
])
def test_every_sampler_keeps_the_output_in_the_schema(backend: NativeBackend, kw: dict[str, Any]) -> None:
    text, out = run(backend, PROMPT, max_tokens=80, grammar=schema_gbnf(SCHEMA), **kw)
    assert out.finish_reason == "stop", text
    jsonschema.validate(json.loads(text), SCHEMA)


def test_sampled_grammar_is_reproducible_with_a_seed(backend: NativeBackend) -> None:
    a = run(backend, PROMPT, max_tokens=24, temperature=1.0, seed=7, grammar=JSON)[0]
    b = run(backend, PROMPT, max_tokens=24, temperature=1.0, seed=7, grammar=JSON)[0]
    assert a == b and a.startswith("{")


def test_logprobs_under_a_grammar_are_the_models(backend: NativeBackend) -> None:
    """Logprobs are of the unmasked logits (as the llama.cpp backends report them)."""
    out = GenerationOutcome()
    ev = next(iter(backend.generate(prepared(backend, PROMPT), SamplingParams(max_tokens=1, temperature=0.0, logprobs=3,
                                                                              grammar=JSON), out, threading.Event())))
    free = next(iter(backend.generate(prepared(backend, PROMPT), SamplingParams(max_tokens=1, temperature=0.0, logprobs=3),
                                      GenerationOutcome(), threading.Event())))
    assert ev.text.startswith("{") and not free.text.startswith("{")  # the grammar changed the pick
    assert ev.top_logprobs == free.top_logprobs
    assert ev.logprob is not None and ev.logprob < 0


# -- errors and lifetime -------------------------------------------------------------------------


def test_invalid_grammar_is_a_backend_error_before_anything_runs(backend: NativeBackend) -> None:
    before = live_grammars()
    with pytest.raises(GrammarError) as info:
        backend.generate(prepared(backend, PROMPT), SamplingParams(grammar="root ::= ("), GenerationOutcome(), threading.Event())
    assert info.value.param == "response_format" and live_grammars() == before


def test_no_allowed_token_left_is_an_error_not_a_crash(backend: NativeBackend) -> None:
    """With Gemma's byte fallback a grammar always has some token; when every allowed one is at
    -inf, the pick is a GrammarError (accepting any token there would abort inside llama.cpp)."""
    tok = backend.tokenizer
    g = Grammar.for_tokenizer(tok, YES_NO)
    try:
        x = np.zeros(tok.n_vocab, dtype=np.float32)
        x[np.isfinite(g.mask(x))] = -np.inf
        with pytest.raises(GrammarError, match="no token"):
            g.best(x)
    finally:
        g.close()


def test_grammar_is_freed_on_end_cancel_close_and_drop(backend: NativeBackend) -> None:
    base = live_grammars()

    def start(cancel: threading.Event | None = None) -> Iterator[Any]:
        return backend.generate(prepared(backend, PROMPT), SamplingParams(max_tokens=40, temperature=0.0, grammar=JSON),
                                GenerationOutcome(), cancel or threading.Event())

    run(backend, PROMPT, max_tokens=4, temperature=0.0, grammar=JSON)
    assert live_grammars() == base  # a generation that ends frees it
    cancel = threading.Event()
    out: list[Any] = []
    for ev in start(cancel):
        out.append(ev)
        if len(out) == 2:
            assert live_grammars() == base + 1  # held while it generates
            cancel.set()
    assert len(out) == 2 and live_grammars() == base  # cancelled mid-grammar
    it = start()
    next(it)
    it.close()  # the client went away: the consumer closes the iterator
    assert live_grammars() == base
    it = start()
    assert live_grammars() == base + 1  # built eagerly (a bad grammar is a 400 before streaming)
    del it
    gc.collect()
    assert live_grammars() == base  # never started: the finalizer frees it


# -- llama.cpp under the same grammar ------------------------------------------------------------

GREEDY_PROMPTS = [PROMPT, "The user's profile as JSON:", '{"city": "Paris", "country":', "Facts about water, as JSON:",
                  "Return a JSON list of three colors:"]


def test_greedy_under_a_grammar_matches_llama_cpp(gemma_f32_gguf: pathlib.Path, gemma_model: GGUFModel, gemma_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The bound of test_gemma3.py's greedy test (llama.cpp on the F32 copy of the weights, 4 of
    5 prompts identical for 16 tokens), with both sides under llama.cpp's JSON grammar."""
    import llama_cpp
    from llama_cpp import Llama, LlamaGrammar

    llm = Llama(model_path=str(gemma_f32_gguf), n_ctx=64, n_threads=1, verbose=False,
                type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False)
    r = Runner(gemma_model, n_ctx=64, ops="kernels")
    eog = gemma_tokenizer.eog_ids
    same = 0
    try:
        for text in GREEDY_PROMPTS:
            ids = gemma_tokenizer.tokenize(text)
            ref: list[int] = []
            for t in llm.generate(ids, temp=0.0, repeat_penalty=1.0, grammar=LlamaGrammar.from_string(JSON, verbose=False)):
                ref.append(int(t))
                if t in eog or len(ref) == 16:
                    break
            g = Grammar.for_tokenizer(gemma_tokenizer, JSON)
            try:
                r.reset()
                nat = [s.sample.token for s in r.generate(ids, Sampler(temperature=0.0, grammar=g), 16, stop_ids=eog)]
            finally:
                g.close()
            same += nat == ref
            print(f"\n{text!r}: native {gemma_tokenizer.detokenize(nat)!r} | llama.cpp {gemma_tokenizer.detokenize(ref)!r}")
    finally:
        llm.close()
    print(f"greedy under the JSON grammar: {same}/5 identical for 16 tokens")
    assert same >= 4


# -- through the real server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(gemma_path: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    native = {"backend": "native", "source": {"path": str(gemma_path)}, "chat_format": "gemma", "kv_cache": "fp8", "n_ctx": 256}
    proc = ServerProcess(gemma_registry(gemma_path, native=native), tmp_path_factory.mktemp("grammar")).wait_healthy()
    yield proc
    proc.stop()


def client(srv: ServerProcess) -> OpenAI:
    return OpenAI(base_url=srv.url["standard"] + "/v1", api_key="x", max_retries=0, timeout=300)


def test_json_object_over_http_parses(srv: ServerProcess) -> None:
    # a base model: greedy JSON on a bare request ("A JSON object describing a cat:") invents keys
    # until the limit; after one example object it writes a short one and closes it
    out = client(srv).completions.create(model="native", prompt=FEW_SHOT, max_tokens=120, temperature=0,
                                         extra_body={"response_format": {"type": "json_object"}})
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(out.choices[0].text), dict)
    chat = client(srv).chat.completions.create(
        model="native", messages=[{"role": "user", "content": "Describe a cat as a JSON object."}], max_tokens=24,
        temperature=0, response_format={"type": "json_object"})
    assert (chat.choices[0].message.content or "").startswith("{")


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_over_http_validates(srv: ServerProcess, stream: bool) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "cat", "schema": SCHEMA}}
    kw: dict[str, Any] = {"model": "native", "messages": [{"role": "user", "content": "Describe a cat."}],
                          "max_tokens": 80, "temperature": 0.8, "seed": 5, "response_format": fmt}
    if stream:
        chunks = list(client(srv).chat.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        out = client(srv).chat.completions.create(**kw)
        text, finish = out.choices[0].message.content or "", [out.choices[0].finish_reason]
    assert finish == ["stop"]
    jsonschema.validate(json.loads(text), SCHEMA)


def test_unparsable_grammar_over_http_is_a_400(srv: ServerProcess) -> None:
    """llama-cpp-python's converter turns the pattern `a**` into GBNF llama.cpp cannot parse."""
    fmt = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "string", "pattern": "^a**$"}}}
    with pytest.raises(openai.BadRequestError) as info:
        client(srv).chat.completions.create(model="native", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=8, response_format=fmt)  # type: ignore[arg-type]
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == "response_format"
    ok = client(srv).chat.completions.create(model="native", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert ok.choices[0].message.content is not None  # the model still serves
