"""Grammar checks by llama.cpp itself: a grammar compiles when llama.cpp's sampler accepts it, and
a text matches when the grammar sampler lets every one of its tokens through and then allows
end-of-generation (the grammar is complete). Only the vocabulary of the Gemma GGUF is loaded
(`vocab_only`, about half a second), never its weights."""

from __future__ import annotations

import ctypes
import math
from pathlib import Path
from typing import Any

import pytest


class GrammarChecker:
    def __init__(self, model_path: Path) -> None:
        import llama_cpp as lc

        self._lc = lc
        self.model = lc.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
        self._vocab = lc.llama_model_get_vocab(self.model.model)
        self._eos = lc.llama_vocab_eos(self._vocab)

    def _sampler(self, grammar: str) -> Any:
        return self._lc.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")

    def compiles(self, grammar: str) -> bool:
        smpl = self._sampler(grammar)
        if not smpl:
            return False
        self._lc.llama_sampler_free(smpl)
        return True

    def _allowed(self, smpl: Any, token: int) -> bool:
        lc = self._lc
        data = (lc.llama_token_data * 1)(lc.llama_token_data(token, 0.0, 0.0))
        arr = lc.llama_token_data_array(data, 1, -1, False)
        lc.llama_sampler_apply(smpl, ctypes.byref(arr))
        return not math.isinf(data[0].logit)

    def accepts(self, grammar: str, text: str) -> bool:
        """Whether `text` is a complete sentence of `grammar` (token by token, as sampling sees it)."""
        smpl = self._sampler(grammar)
        assert smpl, "the grammar does not compile"
        try:
            for token in self.model.tokenize(text.encode("utf-8"), add_bos=False, special=False):
                if not self._allowed(smpl, token):
                    return False
                self._lc.llama_sampler_accept(smpl, token)
            return self._allowed(smpl, self._eos)
        finally:
            self._lc.llama_sampler_free(smpl)


@pytest.fixture(scope="session")
def grammar_checker(gemma_path: Path) -> GrammarChecker:
    return GrammarChecker(gemma_path)
