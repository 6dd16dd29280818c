"""Request checks every local backend makes against its own vocabulary (a 400, never a crash in C)."""

from __future__ import annotations

from collections.abc import Sequence

from ..types import BackendError, InvalidPrompt


def check_token_ids(ids: Sequence[int], n_vocab: int) -> None:
    """A token prompt must be non-empty ids of this vocabulary (else a 400, never a crash in C)."""
    if not ids:
        raise InvalidPrompt("the prompt is empty")
    bad = next((i for i in ids if not 0 <= i < n_vocab), None)
    if bad is not None:
        raise InvalidPrompt(f"token id {bad} is outside this model's vocabulary (0..{n_vocab - 1})")


def check_logit_bias(bias: tuple[tuple[int, float], ...], n_vocab: int) -> None:
    """logit_bias keys must be ids of this vocabulary (the edge checked their form, not their range)."""
    bad = next((t for t, _ in bias if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise BackendError(f"logit_bias names token id {bad}, outside this model's vocabulary (0..{n_vocab - 1})",
                           param="logit_bias")
