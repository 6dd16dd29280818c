"""Tokenizer: llama.cpp's own vocabulary code on the same GGUF (vocab_only, no weights loaded),
so the native engine and the llama.cpp backend see exactly the same token ids.
"""

from __future__ import annotations

import codecs
import ctypes
import pathlib

import llama_cpp
from llama_cpp import Llama

from ..llama_load import new_llama  # one construction at a time (llama-cpp-python's quiet load is not thread-safe)


class Tokenizer:
    def __init__(self, path: str | pathlib.Path) -> None:
        self._llm: Llama | None = new_llama(model_path=str(path), vocab_only=True, verbose=False)
        m = self._llm._model
        self._vocab = m.vocab
        self.n_vocab = self._llm.n_vocab()
        self.bos_id = self._llm.token_bos()
        self.eos_id = self._llm.token_eos()
        self.add_bos = bool(m.add_bos_token())
        # End-of-generation ids (eos, eot, <end_of_turn>, ...), as llama.cpp decides them.
        self.eog_ids = frozenset(
            i for i in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, i)
        )
        self._pieces: dict[int, bytes] = {}  # filled once per id; dict reads/writes are atomic under the GIL

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Special tokens in `text` (chat markup) are parsed as such; BOS per the model's flag.

        llama.cpp is asked for the plain tokens and BOS is prepended here, so a GGUF whose
        metadata says add_eos/add_sep does not get EOS appended to every prompt.
        """
        assert self._llm is not None, "tokenizer is closed"
        ids = self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if add_bos and self.add_bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        return ids

    def piece(self, token: int) -> bytes:
        """Bytes a generated token adds (special tokens render as nothing, as in llama.cpp).
        Thread-safe: the batched backend's request threads call it at once, and llama.cpp writes
        the piece with the GIL released, so every miss gets its own buffer (a shared one gave
        ~20k of 262k tokens another token's bytes under 4 threads)."""
        p = self._pieces.get(token)
        if p is None:
            buf = ctypes.create_string_buffer(256)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            p = bytes(buf.raw[: max(0, n)])
            self._pieces[token] = p
        return p

    def special_text(self, token: int) -> str:
        """A token's text with special tokens spelled out (`<|im_end|>`): what templates call bos/eos."""
        assert self._llm is not None
        return bytes(self._llm.detokenize([token], special=True)).decode("utf-8", "replace")

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None


class StreamDecoder:
    """Token-by-token text: bytes of a UTF-8 character split across tokens are held back until
    the character is complete (an incremental decoder keeps the partial sequence)."""

    def __init__(self, tok: Tokenizer) -> None:
        self._tok = tok
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self._dec.decode(self._tok.piece(token))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)
