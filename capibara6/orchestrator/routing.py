"""Which experts answer a request on the consensus port.

Resolution, first match wins:
1. `consensus.experts` in the body: exactly those models (other `consensus` fields override the
   ensemble named by `model`, if any, else the defaults below);
2. `model` names an ensemble from models.yaml (`ensembles:`), optionally overridden by `consensus`;
3. `model: "auto"`: first by prompt length, then by task tag (below). A prompt of at least
   `prefers.min_prompt_tokens` (estimated) tokens goes to the models that set a threshold it
   meets (state-space / hybrid experts: their cost per token does not grow with the context),
   those with the task tag first; a shorter prompt is routed by tag among the models whose
   threshold it does not meet (falling back to all of them when that leaves none): every
   registry model carrying the tag, highest priority first, at most AUTO_MAX_EXPERTS; no model
   with the tag -> the `general` models; none of those -> the highest-priority model;
4. a registry model id with a `consensus` field: that model alone (a one-expert consensus);
5. a registry model id without one: not a consensus request (None) -> answered like port 8082.

The `auto` classifier is deliberately simple and explainable (its reason travels in the response):
- `code` when the text holds a code fence, a line that looks like code (def/class/import/#include/
  function/SELECT ... FROM/braces with semicolons), or programming words (python, javascript,
  function, compile, stack trace, regex, sql, bug, ...);
- `multilingual` when at least 20% of the letters are outside Latin script (CJK, Cyrillic, Arabic,
  Devanagari, ...), or Latin-script text has at least two stop words of another language
  (es/fr/de/pt/it) and more of them than English stop words;
- `general` otherwise.

Prompt length: the caller may pass the prompt's token count; otherwise it is estimated as UTF-8
bytes / 4 (BPE tokenizers average about 4 bytes per token on English prose; code and non-Latin
scripts have more tokens per byte, so the estimate errs towards short). The experts are not loaded
yet when routing runs, so no tokenizer is at hand. The decision (tokens, whether it was estimated,
the threshold that applied) travels in the response's `consensus.route`.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..config import EnsembleSpec, Registry
from ..errors import InvalidRequest, ModelNotFound
from ..types import Strategy


class ConsensusOptions(BaseModel):
    """capibara6 extension for the consensus port."""

    model_config = ConfigDict(extra="forbid")

    experts: list[str] | None = Field(None, min_length=1, max_length=16, description="Registry ids; one may repeat.")
    strategy: Strategy | None = None
    judge: str | None = None
    aggregator: str | None = None
    timeout_s: float | None = Field(None, gt=0)
    min_responses: int | None = Field(None, ge=1)



AUTO = "auto"
AUTO_MAX_EXPERTS = 3
DEFAULT_TIMEOUT_S = 60.0

_FENCE = re.compile(r"```")
_CODE_LINE = re.compile(
    r"^\s*(def |class |import |from \S+ import |#include|function\b|fn |public |private |return\b|"
    r"SELECT\b.+\bFROM\b|const |let |var )|[;{}]\s*$",
    re.MULTILINE | re.IGNORECASE,
)
_CODE_WORDS = {
    "python", "javascript", "typescript", "java", "rust", "golang", "c++", "sql", "regex", "function",
    "compile", "compiler", "bug", "debug", "stacktrace", "traceback", "segfault", "refactor", "api",
    "code", "script", "bash", "html", "css", "json", "yaml", "dockerfile",
}
_EN_STOP = {"the", "and", "is", "are", "of", "to", "in", "what", "how", "why", "a", "it", "this", "that", "with"}
_OTHER_STOP = {
    "el", "los", "las", "una", "que", "por", "para", "como", "está", "qué", "cómo", "es",  # es
    "le", "les", "des", "une", "est", "pour", "avec", "dans", "qui", "quoi", "pourquoi",  # fr
    "der", "die", "das", "und", "ist", "nicht", "mit", "ein", "eine", "wie", "warum",  # de
    "não", "uma", "com", "são", "você", "porque",  # pt
    "il", "della", "sono", "perché", "anche", "questo",  # it
}


@dataclass(frozen=True)
class ConsensusPlan:
    """Resolved experts and merge settings for one request."""

    name: str  # the ensemble, "auto", the model id, or "custom"
    experts: tuple[str, ...]
    strategy: Strategy
    judge: str | None
    aggregator: str | None
    timeout_s: float
    min_responses: int
    temperature: float | None = None
    route: dict[str, Any] | None = None  # auto routing: {"tag", "reason", "prompt_tokens", "long_context", ...}


def classify(text: str) -> tuple[str, str]:
    """(tag, reason) for `auto` routing: code, multilingual or general (see module docstring)."""
    if _FENCE.search(text):
        return "code", "code fence"
    if _CODE_LINE.search(text):
        return "code", "a line that looks like code"
    words = re.findall(r"[\w+#']+", text.lower())
    hits = sorted({w for w in words if w in _CODE_WORDS})
    if hits:
        return "code", f"programming words: {', '.join(hits[:3])}"
    letters = [ch for ch in text if ch.isalpha()]
    if letters:
        foreign = sum(1 for ch in letters if "LATIN" not in unicodedata.name(ch, "LATIN"))
        if foreign / len(letters) >= 0.2:
            return "multilingual", f"{foreign / len(letters):.0%} non-Latin letters"
    other = sum(w in _OTHER_STOP for w in words)
    english = sum(w in _EN_STOP for w in words)
    if other >= 2 and other > english:
        return "multilingual", f"{other} non-English stop words"
    return "general", "no code or non-English markers"


def _by_priority(registry: Registry, ids: list[str]) -> list[str]:
    return sorted(ids, key=lambda m: -registry.models[m].priority)  # stable: registry order on ties


def _auto_experts(registry: Registry, tag: str, among: list[str] | None = None) -> list[str]:
    pool = among if among is not None else list(registry.models)
    for want in (tag, "general"):
        found = [m for m in pool if want in registry.models[m].tags]
        if found:
            return _by_priority(registry, found)[:AUTO_MAX_EXPERTS]
    return _by_priority(registry, pool)[:1]


def estimate_tokens(text: str) -> int:
    """Tokens of `text` without a tokenizer: UTF-8 bytes / 4 (see the module docstring)."""
    return math.ceil(len(text.encode("utf-8")) / 4)


def _threshold(registry: Registry, model: str) -> int | None:
    prefers = registry.models[model].prefers
    return prefers.min_prompt_tokens if prefers is not None else None


def route_auto(registry: Registry, text: str, prompt_tokens: int | None = None,
               whole: str | None = None) -> tuple[list[str], dict[str, Any]]:
    """(experts, route) for `model: auto`: long prompts to the models that prefer them, then tags.
    `text` (the question) picks the tag; the length is `prompt_tokens`, else the estimate of
    `whole` (everything the experts will read: every message of a conversation), else of `text`."""
    tag, reason = classify(text)
    n = prompt_tokens if prompt_tokens is not None else estimate_tokens(whole if whole is not None else text)
    route: dict[str, Any] = {"tag": tag, "reason": reason, "prompt_tokens": n, "tokens_estimated": prompt_tokens is None}
    thresholds = {m: t for m in registry.models if (t := _threshold(registry, m)) is not None}
    met = [m for m, t in thresholds.items() if n >= t]
    if met:
        route["long_context"] = True
        route["min_prompt_tokens"] = min(thresholds[m] for m in met)
        route["reason"] = f"{n} prompt tokens >= min_prompt_tokens {route['min_prompt_tokens']}; {reason}"
        tagged = [m for m in met if tag in registry.models[m].tags]
        rest = [m for m in met if m not in tagged]
        return (_by_priority(registry, tagged) + _by_priority(registry, rest))[:AUTO_MAX_EXPERTS], route
    route["long_context"] = False
    short = [m for m in registry.models if m not in thresholds]
    return _auto_experts(registry, tag, short or None), route


def resolve(registry: Registry, model: str, options: ConsensusOptions | None, text: str,
            prompt_tokens: int | None = None, whole: str | None = None) -> ConsensusPlan | None:
    """The consensus plan for a request, or None for a plain single-model request. `prompt_tokens`
    (when the caller knows it) replaces the length estimate of `auto` routing."""
    ensemble: EnsembleSpec | None = registry.ensembles.get(model)
    route = None
    if ensemble is None and model != AUTO and model not in registry.models:
        raise ModelNotFound(model)  # even with explicit experts: `model` must name something real
    if options is not None and options.experts:
        name, experts = (model if ensemble else "custom"), list(options.experts)
    elif ensemble is not None:
        name, experts = model, list(ensemble.experts)
    elif model == AUTO:
        experts, route = route_auto(registry, text, prompt_tokens, whole)
        name = AUTO
    elif options is None:
        return None
    else:
        name, experts = model, [model]
    for ref in experts:
        if ref not in registry.models:
            raise InvalidRequest(f"Unknown expert model '{ref}'.", param="consensus.experts", code="model_not_found")
    opts = options or ConsensusOptions()
    strategy: Strategy = opts.strategy or (ensemble.strategy if ensemble else "vote")
    top = _by_priority(registry, experts)[0]
    judge = opts.judge or (ensemble.judge if ensemble else None) or top
    aggregator = opts.aggregator or (ensemble.aggregator if ensemble else None) or top
    for param, ref in (("consensus.judge", judge), ("consensus.aggregator", aggregator)):
        if ref not in registry.models:
            raise InvalidRequest(f"Unknown model '{ref}'.", param=param, code="model_not_found")
    min_responses = opts.min_responses or (ensemble.min_responses if ensemble else 1)
    if min_responses > len(experts):
        raise InvalidRequest(
            f"min_responses is {min_responses} but only {len(experts)} experts were named.", param="consensus.min_responses"
        )
    timeout = opts.timeout_s or (ensemble.timeout_s if ensemble else DEFAULT_TIMEOUT_S)
    return ConsensusPlan(
        name=name,
        experts=tuple(experts),
        strategy=strategy,
        judge=judge if strategy == "judge" else None,
        aggregator=aggregator if strategy == "synthesize" else None,
        timeout_s=timeout,
        min_responses=min_responses,
        temperature=ensemble.temperature if ensemble else None,
        route=route,
    )


def ensemble_cards(registry: Registry) -> list[dict[str, object]]:
    """/v1/models entries on the consensus port: each ensemble, and `auto`."""
    cards: list[dict[str, object]] = []
    for name, ens in registry.ensembles.items():
        info = {"experts": ens.experts, "strategy": ens.strategy, "min_responses": ens.min_responses, "timeout_s": ens.timeout_s}
        cards.append({"id": name, "object": "model", "created": 0, "owned_by": "capibara6",
                      "description": ens.description, "ensemble": info})
    tags = sorted({t for spec in registry.models.values() for t in spec.tags})
    cards.append({"id": AUTO, "object": "model", "created": 0, "owned_by": "capibara6",
                  "description": "Routes long prompts to the models that prefer them (prefers.min_prompt_tokens), "
                                 "then by task tag (code, multilingual, general); strategy vote.",
                  "ensemble": {"experts": "by length, then tag", "tags": tags, "strategy": "vote", "max_experts": AUTO_MAX_EXPERTS,
                               "min_prompt_tokens": {m: t for m in registry.models if (t := _threshold(registry, m)) is not None}}})
    return cards
