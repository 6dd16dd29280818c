"""`model: auto` by prompt length: `prefers.min_prompt_tokens` sends long prompts to SSM experts."""

from __future__ import annotations

from typing import Any

import pytest

from capibara6.config import ConfigError, parse_registry
from capibara6.orchestrator.routing import AUTO_MAX_EXPERTS, ensemble_cards, estimate_tokens, resolve


def registry(**extra: Any) -> Any:
    def m(**f: Any) -> dict[str, Any]:
        return {"source": {"path": "/nonexistent.gguf"}, **f}

    return parse_registry({"models": {
        "llama": m(tags=["general"], priority=2),
        "coder": m(tags=["code"]),
        "mamba": m(tags=["general"], prefers={"min_prompt_tokens": 1000}),
        "hybrid": m(tags=["code"], prefers={"min_prompt_tokens": 4000}, priority=5),
        **extra,
    }})


def test_short_prompts_route_by_tag_and_avoid_long_context_models() -> None:
    plan = resolve(registry(), "auto", None, "Name three rivers.")
    assert plan is not None and plan.experts == ("llama",)
    assert plan.route == {"tag": "general", "reason": "no code or non-English markers", "prompt_tokens": 5,
                          "tokens_estimated": True, "long_context": False}
    plan = resolve(registry(), "auto", None, "fix this python bug")
    assert plan is not None and plan.experts == ("coder",)  # not `hybrid`, though it is tagged code


def test_a_prompt_past_the_threshold_goes_to_the_models_it_meets() -> None:
    text = "word " * 1000  # 5000 bytes: 1250 estimated tokens
    plan = resolve(registry(), "auto", None, text)
    assert plan is not None and plan.experts == ("mamba",)  # 1250 < hybrid's 4000
    assert plan.route is not None and plan.route["long_context"] and plan.route["prompt_tokens"] == 1250
    assert plan.route["min_prompt_tokens"] == 1000 and "1250 prompt tokens >= min_prompt_tokens 1000" in plan.route["reason"]
    # a known count replaces the estimate; both thresholds met: the task tag orders them
    plan = resolve(registry(), "auto", None, "def f(): return 1\n" + text, prompt_tokens=5000)
    assert plan is not None and plan.experts == ("hybrid", "mamba") and plan.route is not None
    assert plan.route["tokens_estimated"] is False and plan.route["tag"] == "code"


def test_at_most_auto_max_experts_and_only_long_models_left() -> None:
    many = {f"ssm{i}": {"source": {"path": "/x.gguf"}, "prefers": {"min_prompt_tokens": 10}} for i in range(5)}
    plan = resolve(registry(**many), "auto", None, "x" * 400)
    assert plan is not None and len(plan.experts) == AUTO_MAX_EXPERTS
    only_long = parse_registry({"models": {"s": {"source": {"path": "/x.gguf"}, "prefers": {"min_prompt_tokens": 100}}}})
    plan = resolve(only_long, "auto", None, "short")
    assert plan is not None and plan.experts == ("s",)  # below its threshold, but nothing else exists


def test_explicit_ensembles_mix_a_transformer_and_an_ssm_and_are_not_rerouted() -> None:
    models = {m: {"source": {"path": "/x.gguf"}} for m in ("llama", "mamba")}
    models["mamba"]["prefers"] = {"min_prompt_tokens": 10}
    reg = parse_registry({"models": models, "ensembles": {"mixed": {"experts": ["llama", "mamba"]}}})
    plan = resolve(reg, "mixed", None, "word " * 2000)
    assert plan is not None and plan.experts == ("llama", "mamba") and plan.route is None


def test_estimate_and_validation() -> None:
    assert estimate_tokens("") == 0 and estimate_tokens("abcd") == 1 and estimate_tokens("abcde") == 2
    assert estimate_tokens("日本") == 2  # 6 UTF-8 bytes
    with pytest.raises(ConfigError, match="prefers"):
        parse_registry({"models": {"m": {"source": {"path": "/x"}, "prefers": {"min_prompt_tokens": 0}}}})
    with pytest.raises(ConfigError, match="prefers"):
        parse_registry({"models": {"m": {"source": {"path": "/x"}, "prefers": {"max_prompt_tokens": 5}}}})
    auto = next(c for c in ensemble_cards(registry()) if c["id"] == "auto")
    assert auto["ensemble"]["min_prompt_tokens"] == {"mamba": 1000, "hybrid": 4000}  # type: ignore[index]


def test_a_long_conversation_with_a_short_last_question_counts_as_long() -> None:
    """The length is everything the experts read (`whole`), the tag still the last question."""
    history = "word " * 1000  # 1250 estimated tokens of earlier turns
    plan = resolve(registry(), "auto", None, "And the second one?", whole=history + "\nAnd the second one?")
    assert plan is not None and plan.experts == ("mamba",)
    assert plan.route is not None and plan.route["long_context"] and plan.route["prompt_tokens"] > 1250
    short = resolve(registry(), "auto", None, "And the second one?")
    assert short is not None and short.experts == ("llama",)
