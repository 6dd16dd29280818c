"""POST /v1/embeddings through the real openai client on a real server; /tokenize and /detokenize.

The registry's Gemma 3 270M with `embedding: {pooling: mean}` on llama.cpp and on the native
engine (a base model, not an embedding model: fine for shapes, determinism and agreement between
the two backends, not for retrieval quality), and one entry without `embedding`.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import openai
import pytest

from capibara6.backends import capabilities
from capibara6.config import ConfigError, parse_registry
from tests.conftest import gemma_registry
from tests.serverproc import ServerProcess

LLAMA, NATIVE, PLAIN, BERT, BATCHED = "gemma3-270m", "gemma3-native", "gemma3-plain", "tiny-bert", "gemma3-batched"
RAW = "gemma3-raw"  # embedding: {normalize: false}
TEXTS = ["Hello world", "The capital of France is Paris.", "def f(x): return x + 1", "Rivers flow to the sea."]
AGREEMENT = 0.99  # cosine native vs llama.cpp, mean pooling (measured: >= 0.9984 on these texts)


def write_tiny_bert(path: Path, n_embd: int = 32, n_ff: int = 64, n_layer: int = 2, n_ctx: int = 128) -> Path:
    """A random-weight BERT GGUF (an encoder: no LM head, no chat template) with a letter-by-letter
    WordPiece vocabulary, the shape of what a user registers for retrieval (bge, MiniLM)."""
    import string

    import gguf

    rng = np.random.default_rng(0)
    letters = list(string.ascii_lowercase + string.digits + ".,!?")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + ["\u2581" + c for c in letters] + letters
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_block_count(n_layer)
    w.add_head_count(2)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_token_type_count(2)
    w.add_tokenizer_model("bert")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * 5 + [gguf.TokenType.NORMAL] * (2 * len(letters)))
    for add, tid in ((w.add_bos_token_id, 2), (w.add_sep_token_id, 3), (w.add_eos_token_id, 3), (w.add_unk_token_id, 1), (w.add_pad_token_id, 0)):
        add(tid)
    w.add_add_bos_token(True)
    w.add_add_eos_token(True)

    def rand(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(np.float32))

    def norm(name: str) -> None:
        w.add_tensor(name + ".weight", np.ones(n_embd, np.float32))
        w.add_tensor(name + ".bias", np.zeros(n_embd, np.float32))

    rand("token_embd.weight", len(tokens), n_embd)
    rand("token_types.weight", 2, n_embd)
    rand("position_embd.weight", n_ctx, n_embd)
    norm("token_embd_norm")
    for i in range(n_layer):
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            rand(f"blk.{i}.{n}.weight", n_embd, n_embd)
            rand(f"blk.{i}.{n}.bias", n_embd)
        norm(f"blk.{i}.attn_output_norm")
        norm(f"blk.{i}.layer_output_norm")
        rand(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        rand(f"blk.{i}.ffn_up.bias", n_ff)
        rand(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
        rand(f"blk.{i}.ffn_down.bias", n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert.gguf")


@pytest.fixture(scope="module")
def emb_server(gemma_path: Path, bert_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    reg = gemma_registry(
        gemma_path,
        **{
            BERT: {"backend": "llamacpp", "source": {"path": str(bert_path)}, "n_ctx": 128, "embedding": {"pooling": "mean"}},
            NATIVE: {"backend": "native", "source": {"path": str(gemma_path)}, "chat_format": "gemma", "embedding": {"pooling": "mean"}},
            PLAIN: {"backend": "llamacpp", "source": {"path": str(gemma_path)}, "chat_format": "gemma"},
            RAW: {"backend": "llamacpp", "source": {"path": str(gemma_path)}, "chat_format": "gemma",
                  "embedding": {"pooling": "mean", "normalize": False}},
            BATCHED: {"backend": "llamacpp", "source": {"path": str(gemma_path)}, "chat_format": "gemma", "parallel": 2,
                      "embedding": {"pooling": "mean"}},
        },
    )
    reg["models"][LLAMA]["embedding"] = {"pooling": "mean"}
    proc = ServerProcess(reg, tmp_path_factory.mktemp("emb")).wait_healthy()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(emb_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=emb_server.url["standard"] + "/v1", api_key="unused", max_retries=0, timeout=300)


def vectors(client: openai.OpenAI, model: str, texts: list[str] | str, **kw: object) -> np.ndarray:
    out = client.embeddings.create(model=model, input=texts, encoding_format="float", **kw)  # type: ignore[arg-type]
    return np.array([d.embedding for d in out.data], dtype=np.float64)


def test_string_and_list_shapes_and_determinism(client: openai.OpenAI) -> None:
    one = client.embeddings.create(model=LLAMA, input="Hello world", encoding_format="float")
    assert one.object == "list" and one.model == LLAMA and len(one.data) == 1
    assert one.data[0].index == 0 and len(one.data[0].embedding) == 640  # Gemma 3 270M's n_embd
    assert one.usage.prompt_tokens == one.usage.total_tokens > 0
    many = client.embeddings.create(model=LLAMA, input=TEXTS, encoding_format="float")
    assert [d.index for d in many.data] == [0, 1, 2, 3]
    assert many.usage.prompt_tokens > one.usage.prompt_tokens
    a, b = vectors(client, LLAMA, TEXTS), vectors(client, LLAMA, TEXTS)
    assert a.shape == (4, 640)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)  # normalize: true (the default)
    np.testing.assert_allclose(a, b, atol=1e-6)  # deterministic


def test_identical_texts_cosine_one_different_below(client: openai.OpenAI) -> None:
    v = vectors(client, LLAMA, ["Hello world", "Hello world", "Quantum chromodynamics of gluons."])
    assert abs(v[0] @ v[1] - 1.0) < 1e-6
    assert v[0] @ v[2] < 0.99


def test_base64_round_trip(client: openai.OpenAI) -> None:
    raw = client.embeddings.create(model=LLAMA, input=TEXTS[:2], encoding_format="base64")
    floats = vectors(client, LLAMA, TEXTS[:2])
    for d, f in zip(raw.data, floats):
        assert isinstance(d.embedding, str)  # asked for base64 explicitly: the SDK leaves it encoded
        v = np.frombuffer(base64.b64decode(d.embedding), dtype="<f4")
        np.testing.assert_allclose(v, f, atol=1e-7)
    default = client.embeddings.create(model=LLAMA, input=TEXTS[:2])  # the SDK asks base64 and decodes it
    np.testing.assert_allclose(np.array([d.embedding for d in default.data]), floats, atol=1e-7)


def test_native_agrees_with_llamacpp(client: openai.OpenAI) -> None:
    a, b = vectors(client, LLAMA, TEXTS), vectors(client, NATIVE, TEXTS)
    cos = (a * b).sum(axis=1)
    assert cos.min() >= AGREEMENT, cos


def test_batching_instance_embeds_beside_its_generations(client: openai.OpenAI) -> None:
    """parallel > 1 (one context, continuous batching): embeddings run in their own context, and
    two embedding requests at once share the instance's embedding context one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    ref = vectors(client, LLAMA, TEXTS)
    with ThreadPoolExecutor(3) as ex:
        gen = ex.submit(client.completions.create, model=BATCHED, prompt="Once upon a time", max_tokens=8, temperature=0)
        runs = [ex.submit(vectors, client, BATCHED, TEXTS) for _ in range(2)]
        for r in runs:
            assert (r.result() * ref).sum(axis=1).min() > 0.999
        assert gen.result().choices[0].text


def test_many_inputs_one_request(client: openai.OpenAI) -> None:
    texts = [f"sentence number {i} about item {i * 7}" for i in range(64)]
    v = vectors(client, LLAMA, texts)
    assert v.shape == (64, 640)
    alone = vectors(client, LLAMA, texts[37])
    assert alone[0] @ v[37] > 0.999  # batched with 63 others or alone: the same vector (kernel paths may differ)


def test_input_longer_than_n_batch(client: openai.OpenAI) -> None:
    """n_batch 256 packs short inputs together; a 600-token one (n_ctx 1024) decodes alone, whole."""
    long = "the river runs to the sea and " * 85
    out = client.embeddings.create(model=LLAMA, input=["short", long, "also short"], encoding_format="float")
    assert 256 < out.usage.prompt_tokens < 1024
    v = np.array([d.embedding for d in out.data])
    alone = vectors(client, LLAMA, long)[0]
    assert v[1] @ alone > 0.9999 and v[0] @ vectors(client, LLAMA, "short")[0] > 0.999
    native = vectors(client, NATIVE, long)[0]
    assert native @ alone >= AGREEMENT


def test_encoder_gguf_without_chat_template(client: openai.OpenAI, bert_path: Path) -> None:
    """What a user registers for retrieval: an encoder GGUF (BERT) with no chat template loads,
    embeds as llama-cpp-python's own embedding mode does, and refuses chat with a 400."""
    from llama_cpp import Llama

    texts = ["hello world", "abc def", "hello world", "the quick brown fox"]
    ours = vectors(client, BERT, texts)
    ref = Llama(model_path=str(bert_path), embedding=True, n_ctx=128, n_threads=1, verbose=False)
    theirs = np.array(ref.embed(texts, normalize=True))
    ref.close()
    assert ours.shape == (4, 32)
    np.testing.assert_allclose((ours * theirs).sum(axis=1), 1.0, atol=1e-5)
    assert abs(ours[0] @ ours[2] - 1) < 1e-6 and ours[0] @ ours[1] < 0.99
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BERT, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert "chat template" in e.value.message
    with pytest.raises(openai.BadRequestError) as e3:
        client.completions.create(model=BERT, prompt="hello", max_tokens=2)
    assert "encoder" in e3.value.message and e3.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e2:
        client.embeddings.create(model=BERT, input="word " * 200)  # n_ctx 128
    assert e2.value.body["code"] == "context_length_exceeded"  # type: ignore[index]


def test_token_id_inputs(client: openai.OpenAI, emb_server: ServerProcess) -> None:
    ids = httpx.post(emb_server.url["standard"] + "/tokenize", json={"model": LLAMA, "content": "Hello world", "add_special": True}).json()["tokens"]
    text = vectors(client, LLAMA, "Hello world")
    one = client.embeddings.create(model=LLAMA, input=ids, encoding_format="float")
    both = client.embeddings.create(model=LLAMA, input=[ids, ids], encoding_format="float")
    assert one.usage.prompt_tokens == len(ids)
    assert np.array(one.data[0].embedding) @ text[0] > 0.9999
    assert len(both.data) == 2


def test_dimensions(client: openai.OpenAI) -> None:
    full = vectors(client, LLAMA, TEXTS[0])[0]
    cut = vectors(client, LLAMA, TEXTS[0], dimensions=64)[0]
    assert cut.shape == (64,) and abs(np.linalg.norm(cut) - 1) < 1e-5
    np.testing.assert_allclose(cut, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=LLAMA, input="x", dimensions=10_000)
    assert e.value.body["param"] == "dimensions"  # type: ignore[index]


def test_normalize_false(client: openai.OpenAI) -> None:
    raw, unit = vectors(client, RAW, TEXTS[:2]), vectors(client, LLAMA, TEXTS[:2])
    norms = np.linalg.norm(raw, axis=1)
    assert (abs(norms - 1) > 1e-3).all()
    np.testing.assert_allclose(raw / norms[:, None], unit, atol=1e-5)
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=RAW, input="x", dimensions=64)
    assert e.value.body["param"] == "dimensions" and RAW in e.value.message  # type: ignore[index]


def test_model_that_does_not_embed(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=PLAIN, input="Hello")
    assert PLAIN in e.value.message and e.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="Hello")


def test_input_over_the_context_names_its_index(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=LLAMA, input=["short", "word " * 1500])  # n_ctx 1024
    body = e.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "input"  # type: ignore[index]
    assert re.search(r"\bInput 1\b", e.value.message), e.value.message


@pytest.mark.parametrize("body, param", [
    ({"model": LLAMA, "input": []}, "input"),
    ({"model": LLAMA, "input": ""}, "input"),
    ({"model": LLAMA, "input": ["a", ""]}, "input"),
    ({"model": LLAMA, "input": "a", "encodng_format": "float"}, "encodng_format"),
    ({"model": LLAMA, "input": "a", "encoding_format": "hex"}, "encoding_format"),
    ({"model": LLAMA, "input": [10**9]}, "input"),
    ({"model": LLAMA, "input": ["x"] * 2049}, "input"),
])
def test_bad_requests_in_openai_shape(emb_server: ServerProcess, body: dict[str, object], param: str) -> None:
    r = httpx.post(emb_server.url["standard"] + "/v1/embeddings", json={"user": "u1", **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_client_disconnect_cancels_the_work(emb_server: ServerProcess, client: openai.OpenAI) -> None:
    """A request of 2000 inputs on the native engine (minutes on one thread) whose client goes
    away after 1 s stops between inputs: the next request on that model gets its lease at once."""
    import time

    texts = [f"text number {i} about rivers and the sea, " * 8 for i in range(2000)]  # ~80 tokens each
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(emb_server.url["standard"] + "/v1/embeddings", json={"model": NATIVE, "input": texts}, timeout=1.0)
    t0 = time.monotonic()
    vectors(client, NATIVE, "after the disconnect")
    assert time.monotonic() - t0 < 5  # uncancelled, the 2000 inputs would hold the instance for minutes


def test_metrics_count_requests_and_tokens(client: openai.OpenAI, emb_server: ServerProcess) -> None:
    def scrape() -> tuple[float, float, float, float]:
        text = httpx.get(emb_server.url["standard"] + "/metrics").text

        def value(pattern: str) -> float:
            m = re.search(pattern + r" ([0-9.e+]+)", text)
            return float(m.group(1)) if m else 0.0

        def total(status: int) -> str:
            return re.escape(f'capibara6_requests_total{{endpoint="embeddings",model="{LLAMA}",role="standard",status="{status}"}}')

        return (value(f'capibara6_embedding_requests_total{{model="{LLAMA}"}}'),
                value(f'capibara6_embedding_tokens_total{{model="{LLAMA}"}}'),
                value(total(200)), value(total(400)))

    r0, t0, ok0, bad0 = scrape()
    out = client.embeddings.create(model=LLAMA, input=TEXTS, encoding_format="float")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=LLAMA, input=["fine", "word " * 1500])
    r1, t1, ok1, bad1 = scrape()
    assert r1 == r0 + 1 and t1 == t0 + out.usage.prompt_tokens
    assert ok1 == ok0 + 1 and bad1 == bad0 + 1  # requests_total{endpoint="embeddings"}, once each


def test_tokenize_detokenize_round_trip(emb_server: ServerProcess) -> None:
    url = emb_server.url["standard"]
    plain = httpx.post(url + "/tokenize", json={"content": "Hello world"}).json()["tokens"]  # model absent: the first
    special = httpx.post(url + "/tokenize", json={"model": NATIVE, "content": "Hello world", "add_special": True}).json()["tokens"]
    assert special[1:] == plain and len(special) == len(plain) + 1  # BOS first
    pieces = httpx.post(url + "/tokenize", json={"content": "Hello world", "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == plain and "".join(p["piece"] for p in pieces) == "Hello world"
    assert httpx.post(url + "/detokenize", json={"tokens": plain}).json() == {"content": "Hello world"}
    assert httpx.post(url + "/detokenize", json={"model": NATIVE, "tokens": plain}).json() == {"content": "Hello world"}
    bad = httpx.post(url + "/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(url + "/tokenize", json={"model": "nope", "content": "x"}).status_code == 404
    assert httpx.post(url + "/tokenize", json={"content": "x", "bogus": 1}).status_code == 400


def test_registry_embedding_field() -> None:
    base = {"source": {"path": "/x.gguf"}}
    reg = parse_registry({"models": {"a": {**base, "embedding": {"pooling": "last"}}, "b": base,
                                     "n": {**base, "backend": "native", "embedding": {}}}})
    assert reg.models["a"].embedding is not None and reg.models["a"].embedding.pooling == "last"
    assert reg.models["n"].embedding is not None and reg.models["n"].embedding.normalize is True
    assert capabilities(reg.models["a"]).embeddings and capabilities(reg.models["n"]).embeddings
    assert not capabilities(reg.models["b"]).embeddings
    with pytest.raises(ConfigError, match="pooling"):
        parse_registry({"models": {"a": {**base, "embedding": {"pooling": "max"}}}})
    with pytest.raises(ConfigError, match="remote cannot embed"):
        parse_registry({"models": {"r": {"backend": "remote", "source": {"url": "http://h:1"}, "embedding": {}}}})
