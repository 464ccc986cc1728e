"""Gateway settings: defaults in `config.yaml`, a replacement file, then environment overrides.

Precedence, lowest first:

1. `gateway/config.yaml` (shipped with the package), or the file named by `GATEWAY_CONFIG`;
2. `GATEWAY_<FIELD>` environment variables for single top-level fields, e.g.
   `GATEWAY_DEADLINE_MS=500` or `GATEWAY_RECOMMENDERS='[{"name": "a", "url": "http://..."}]'`
   (nested fields with `__`: `GATEWAY_POOL__LIMIT_PER_HOST=64`).

Everything is validated once, at start-up, by pydantic; `load_settings` turns a validation
failure into a `ConfigError` whose message names the field and the source.

Under gunicorn the master validates the settings and pins them (`pin_settings`): workers,
forked from it, build their app from the pinned settings and never read the file themselves,
so a file edited but not yet accepted by a reload (SIGHUP) never reaches a worker, not even
one that restarts after a crash (nginx's master and workers work the same way).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from gateway.config.feedback import FeedbackSettings
from gateway.core.errors import ConfigError, validation_problems, validation_summary
from gateway.core.fusion import FusionChoice
from gateway.core.protocols import KSERVE_V1, NATIVE, OpenInference, WireProtocol, url_problem

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "AdmissionSettings",
    "BreakerSettings",
    "HedgingSettings",
    "HttpSettings",
    "OpenInferenceSettings",
    "PoolSettings",
    "ReadinessSettings",
    "RecommenderSettings",
    "RetrySettings",
    "Settings",
    "TracingSettings",
    "config_file",
    "describe_source",
    "load_settings",
    "pin_settings",
    "pinned_settings",
]

log = logging.getLogger("gateway")

ENV_PREFIX = "GATEWAY_"
# The packaged defaults, `gateway/config.yaml`, beside this package.
DEFAULT_CONFIG_PATH = Path(__file__).parent.parent / "config.yaml"
# The variable that names the file is not itself a setting.
_CONFIG_FILE_VARIABLE = f"{ENV_PREFIX}CONFIG"

_Strict = ConfigDict(extra="forbid", frozen=True)


# A name of an Open Inference tensor, as the protocol's JSON carries it.
TensorName = Annotated[str, Field(min_length=1, max_length=128)]


class OpenInferenceSettings(BaseModel):
    """What an `open-inference` recommender's model calls its inputs and outputs.

    The gateway sends the user's id as the BYTES tensor `user_input` and the number of items
    wanted as the INT32 tensor `size_input`, and reads the items from the outputs `ids_output`
    (BYTES or an integer type) and `scores_output` (FP16, FP32 or FP64); `parameters` go in
    every inference request as its `parameters` object.
    """

    model_config = _Strict

    user_input: TensorName = "user_id"
    size_input: TensorName = "result_size"
    ids_output: TensorName = "item_ids"
    scores_output: TensorName = "scores"
    parameters: dict[str, str | int | float | bool] = Field(default_factory=dict)


# RFC 9110 tokens for names; values of visible ASCII, spaces and tabs (no CR or LF).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(r"[\x20-\x7e\t]*")
# What the gateway sets on every call itself, or the HTTP client does.
_GATEWAY_HEADERS = frozenset(
    {
        "accept-encoding",
        "connection",
        "content-length",
        "content-type",
        "host",
        "traceparent",
        "tracestate",
        "transfer-encoding",
        "x-request-id",
    }
)


class RecommenderSettings(BaseModel):
    """One recommender the gateway fans out to."""

    model_config = _Strict

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    url: AnyHttpUrl | None = None
    urls: list[AnyHttpUrl] = Field(
        default_factory=list, description="Replicas, beside or instead of `url`; used in turn."
    )
    hedge_after_ms: float | None = Field(
        default=None,
        gt=0,
        description="Send a hedge to another replica after this long; default: recent p95.",
    )
    timeout_ms: float | None = Field(
        default=None,
        gt=0,
        description="Per-call time budget; defaults to the request deadline.",
    )
    attempts: int = Field(
        default=2, ge=1, le=10, description="Attempts per call, the first included (2: one retry)."
    )
    idempotent: bool = Field(
        default=True,
        description="Whether a call that may have reached the recommender can be repeated.",
    )
    weight: float = Field(
        default=1.0,
        ge=0,
        description="Its weight in fusion and coverage; 0 keeps its answer out of `fused` "
        "(shadow mode: still called and returned in `result`).",
    )
    max_answer_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest answer read, compressed and decompressed alike; above it the call "
        "is an `error` and its connection dropped.",
    )
    max_items: int = Field(
        default=1000, ge=1, description="Most `items` in an answer; more is an `error`."
    )
    protocol: Literal["native", "kserve-v1", "open-inference"] = Field(
        default="native",
        description="What the recommender speaks: the gateway's own JSON, KServe's V1 "
        "(`/v1/models/<m>:predict`) or the Open Inference Protocol (`/v2/models/<m>/infer`).",
    )
    open_inference: OpenInferenceSettings | None = Field(
        default=None,
        description="The tensors' names and the request parameters of an `open-inference` "
        "recommender, when its model names them otherwise than the defaults.",
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Headers sent with every call and readiness check, e.g. the "
        "`Seldon-Model` a Seldon Core 2 mesh routes by; the gateway's own cannot be set here.",
    )
    ready_url: AnyHttpUrl | None = Field(
        default=None,
        description="Where the recommender says whether it is ready (GET, judged by status); "
        "by default its protocol's own: `/v1/models/<m>` or `/v2/models/<m>/ready`.",
    )

    @field_validator("headers")
    @classmethod
    def _headers_are_sendable(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"header name {name!r} is not an HTTP token")
            if name.lower() in _GATEWAY_HEADERS:
                raise ValueError(f"header {name} is the gateway's own and cannot be configured")
            if not _HEADER_VALUE.fullmatch(text):
                raise ValueError(f"header {name}'s value must be visible ASCII, spaces and tabs")
        return value

    @model_validator(mode="after")
    def _has_a_url(self) -> RecommenderSettings:
        if self.url is None and not self.urls:
            raise ValueError("give `url` or `urls`")
        for url in self.replicas:
            problem = url_problem(self.protocol, url)
            if problem is not None:
                raise ValueError(f"{problem}; got {url}")
        if self.open_inference is not None and self.protocol != OpenInference.name:
            raise ValueError(
                f"`open_inference` applies to protocol open-inference, not {self.protocol}"
            )
        return self

    def wire_protocol(self) -> WireProtocol:
        """The protocol the gateway speaks to this recommender, made from its settings."""
        if self.protocol == OpenInference.name:
            names = self.open_inference or OpenInferenceSettings()
            return OpenInference(
                names.user_input,
                names.size_input,
                names.ids_output,
                names.scores_output,
                names.parameters,
            )
        return KSERVE_V1 if self.protocol == KSERVE_V1.name else NATIVE

    def readiness_urls(self) -> list[str]:
        """Where each replica says whether it is ready: `ready_url`, else its protocol's own."""
        if self.ready_url is not None:
            return [str(self.ready_url)]
        protocol = self.wire_protocol()
        return [u for u in map(protocol.readiness_url, self.replicas) if u is not None]

    @property
    def replicas(self) -> list[str]:
        """Every URL of the recommender, `url` first, without repeats."""
        urls = ([str(self.url)] if self.url is not None else []) + [str(u) for u in self.urls]
        return list(dict.fromkeys(urls))


class ReadinessSettings(BaseModel):
    """What `/readyz` asks: by default only this gateway's own state; with
    `probe_recommenders`, also each recommender's model server
    (`gateway.recommenders.readiness`)."""

    model_config = _Strict

    # Off by default: a readiness probe that follows the recommenders takes every gateway out
    # of its load balancer when one model server is down, though the others could be served.
    probe_recommenders: bool = False
    timeout_ms: float = Field(default=1000, gt=0, le=60_000)


class PoolSettings(BaseModel):
    """The worker's connections to the recommenders: its aiohttp session's connector
    (`gateway.recommenders.async_http`); the threads' requests sessions keep `limit_per_host`
    each."""

    model_config = _Strict

    # Sized from the concurrency served: a gthread worker runs up to `threads` requests at once,
    # each holding one connection per recommender; waiting for a pooled connection eats the
    # call's time budget, so the pool must not be the bottleneck.
    limit: int = Field(default=1024, ge=1)
    limit_per_host: int = Field(default=128, ge=0)
    # Below the recommenders' own keep-alive (aiohttp servers: 75 s, gunicorn: 2-5 s is common):
    # then the gateway, not the recommender, closes an idle connection, and a call never meets
    # one the recommender has just closed (a POST that may have arrived is not simply resent).
    keepalive_timeout_s: float = Field(default=4.0, gt=0)
    dns_cache_ttl_s: int = Field(default=300, ge=0)
    # HTTPS to the recommenders is checked against the system's CA certificates, or these.
    ca_file: FilePath | None = Field(
        default=None,
        description="PEM file of the CA certificates the recommenders' HTTPS certificates are "
        "checked against instead of the system's (an internal CA).",
    )


class RetrySettings(BaseModel):
    """Waits between attempts: exponential with jitter, never past the deadline."""

    model_config = _Strict

    initial_wait_ms: float = Field(default=10, ge=0)
    max_wait_ms: float = Field(default=200, ge=0)
    jitter_ms: float = Field(default=10, ge=0)


class HedgingSettings(BaseModel):
    """Hedged calls to recommenders with several replicas."""

    model_config = _Strict

    max_extra_ratio: float = Field(
        default=0.1, ge=0, le=1, description="Hedges at most this share of a recommender's calls."
    )
    min_samples: int = Field(
        default=20, ge=1, description="Answers seen before the recent p95 sets the hedge delay."
    )
    window: int = Field(default=200, ge=10, description="Recent answers the p95 is taken over.")


class BreakerSettings(BaseModel):
    """Per-recommender circuit breakers, one set per worker process."""

    model_config = _Strict

    enabled: bool = Field(default=True, description="Off: every call goes through, always.")
    excuse_stalled_share: float = Field(
        default=0.2,
        gt=0,
        le=1,
        description="A timed-out call is not counted against the recommender when the worker's "
        "loop stalled for this share of the call's budget: the gateway was overloaded.",
    )
    failure_threshold: int = Field(default=5, ge=1)
    cooldown_s: float = Field(default=10.0, gt=0)


class AdmissionSettings(BaseModel):
    """How many requests a worker admits at once (`gateway.resilience.admission`), and how the rest
    wait.

    Above the limit a request waits in the worker's queue while it can still meet its
    deadline; it is shed (503) when the queue is full or its time is up.
    """

    model_config = _Strict

    adaptive: bool = Field(
        default=True,
        description="Follow the worker's event-loop lag; false: admit `max_in_flight` always.",
    )
    initial_limit: int = Field(default=32, ge=1, description="The limit a worker starts with.")
    min_limit: int = Field(
        default=4, ge=1, description="The limit never goes below this (nor above max_in_flight)."
    )
    target_lag_ms: float = Field(
        default=25,
        gt=0,
        description="Loop lag the limit aims for: above it the limit shrinks, below it grows.",
    )
    interval_ms: float = Field(
        default=25, gt=0, le=1000, description="How often the lag is measured and the limit moved."
    )
    smoothing: float = Field(
        default=0.2, gt=0, le=1, description="Share of each step the limit takes at once."
    )
    latency_tolerance: float = Field(
        default=2.0,
        ge=1,
        description="How much slower than their long-term average requests may get before "
        "the limit shrinks.",
    )
    queue_size: int = Field(
        default=1024,
        ge=0,
        le=100_000,
        description="Requests one worker holds waiting for a slot above the limit (each costs "
        "a socket and its body, no thread); one more is shed at once. 0: no queue, every "
        "request above the limit is shed at once.",
    )
    queue_max_body_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=0,
        description="What the bodies of the requests waiting in one worker's queue may hold "
        "together; a request whose body would pass it is shed at once, as for a full queue.",
    )
    queue_wait_share: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="The share of deadline_ms a request may spend waiting for a slot. It "
        "stops waiting sooner when its wait plus what requests take now would pass the "
        "deadline.",
    )
    queue_order: Literal["adaptive", "fifo", "lifo"] = Field(
        default="adaptive",
        description="Which waiting request a free slot goes to: the oldest (fifo), the newest "
        "(lifo), or adaptive: the oldest while the queue drains a burst, the newest once it "
        "has not been empty for a whole deadline (sustained overload).",
    )


class TracingSettings(BaseModel):
    """OpenTelemetry tracing (`gateway.observability.tracing`); the standard `OTEL_*` variables win
    over it."""

    model_config = _Strict

    enabled: bool = Field(
        default=False,
        description="Export spans; also switched on by OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT.",
    )
    endpoint: AnyHttpUrl | None = Field(
        default=None,
        description="The OTLP/HTTP receiver's base URL (`/v1/traces` is added), e.g. "
        "http://otel-collector:4318; default: OTEL_EXPORTER_OTLP_ENDPOINT, else localhost:4318.",
    )
    service_name: str = Field(
        default="fusion-gateway", min_length=1, description="Unless OTEL_SERVICE_NAME is set."
    )
    sample_ratio: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="Share of new traces recorded (a frontend's sampled flag is followed); "
        "unless OTEL_TRACES_SAMPLER is set.",
    )


class HttpSettings(BaseModel):
    """The HTTP edge of each uvicorn worker (`gateway/serving/edge.py`, `gateway/asgi.py`)."""

    model_config = _Strict

    max_connections: int = Field(
        default=4096,
        ge=1,
        description="Open client connections per worker; one more is answered 503 and closed.",
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="From a request's first byte to the end of its headers."
    )
    body_timeout_s: float = Field(
        default=10.0, gt=0, description="From the end of the headers to the end of the body."
    )
    max_request_line_bytes: int = Field(
        default=8192, ge=256, description="Longest request target (method and path); then 414."
    )
    max_header_bytes: int = Field(
        default=32768, ge=1024, description="Largest header block; then 431."
    )
    drain_s: float = Field(
        default=2.0,
        ge=0,
        le=60,
        description="When a worker stops (a reload, SIGTERM), how long an idle keep-alive "
        "connection stays open: a request that comes on it is answered with "
        "`Connection: close`.",
    )


def _not_blank(key: SecretStr) -> SecretStr:
    # An empty key would let in a request whose X-Api-Token header is empty.
    if not key.get_secret_value().strip():
        raise ValueError("an API key must not be empty or blank")
    return key


ApiKey = Annotated[SecretStr, AfterValidator(_not_blank)]


class Settings(BaseSettings):
    """All gateway settings, validated."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    recommenders: list[RecommenderSettings] = Field(min_length=1)
    deadline_ms: float = Field(default=1000, gt=0, le=600_000)
    server: Literal["uvicorn", "gthread"] = Field(
        default="uvicorn",
        description="How gunicorn serves: `uvicorn` (one event loop per worker serves HTTP "
        "and the fan-out) or `gthread` (a thread per request, the fan-out on a loop thread).",
    )
    strategy: Literal["async", "threads", "sequential"] = Field(
        default="async",
        description="How the fan-out runs: `async`, `threads` or `sequential` (`sync`, its old "
        "name, is accepted until the next release, with a warning).",
    )
    fan_out_threads: int = Field(
        default=128, ge=1, le=4096, description="Pool size of the `threads` strategy."
    )
    fusion: FusionChoice = Field(
        default="rrf", description="The default fusion; `none`: no fused ranking, no cost."
    )
    rrf_k: int = Field(default=60, ge=1, description="The k of reciprocal rank fusion.")
    fusion_window: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="Ask each recommender for at least this many items and fuse from them, "
        "still returning `resultSize` fused items (Elasticsearch's rank_window_size); "
        "null: `resultSize`.",
    )
    max_body_bytes: int = Field(default=1024 * 1024, ge=1)
    # At most 200: a response nests an answer 3 levels down, and pydantic's serialiser stops
    # at 255.
    max_json_depth: int = Field(
        default=64,
        ge=3,
        le=200,
        description="Deepest nesting of a request body or an answer (the outer object is 1).",
    )
    # Below gunicorn's 256 threads per worker, so that threads remain to answer the 503s at
    # once rather than leaving requests queued behind busy threads.
    max_in_flight: int = Field(
        default=200,
        ge=1,
        description="The hard ceiling on requests one worker serves at once; more are shed "
        "(503). Below it, `admission` adapts the limit to the worker's capacity.",
    )
    shed_retry_after_s: int = Field(default=1, ge=0, description="Retry-After of a shed request.")
    # GATEWAY_API_KEYS=key1,key2 (comma-separated), or a YAML list in the file.
    api_keys: Annotated[list[ApiKey], NoDecode] = Field(
        default_factory=list, description="When set, /recommendation needs X-Api-Token."
    )
    metrics_require_token: bool = False
    # A JSON line per request costs ~5% of a worker's CPU at high load; errors are logged anyway.
    log_requests: bool = True
    metrics: bool = Field(default=True, description="Record Prometheus metrics and serve /metrics.")
    admission: AdmissionSettings = AdmissionSettings()
    http: HttpSettings = HttpSettings()
    pool: PoolSettings = PoolSettings()
    readiness: ReadinessSettings = ReadinessSettings()
    retry: RetrySettings = RetrySettings()
    breaker: BreakerSettings = BreakerSettings()
    hedging: HedgingSettings = HedgingSettings()
    tracing: TracingSettings = TracingSettings()
    feedback: FeedbackSettings = FeedbackSettings()

    @field_validator("strategy", mode="before")
    @classmethod
    def _sequential_was_sync(cls, value: object) -> object:
        """`sync`, the old name of `sequential`: accepted for one more release, with a warning."""
        if value != "sync":
            return value
        message = "strategy `sync` is deprecated and will be removed; use `sequential`"
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        log.warning(message)
        return "sequential"

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            # An empty variable sets no keys; an empty key among others is refused below.
            return [key.strip() for key in value.split(",")] if value else []
        return value

    @field_validator("recommenders")
    @classmethod
    def _names_are_unique(cls, value: list[RecommenderSettings]) -> list[RecommenderSettings]:
        names = [recommender.name for recommender in value]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"recommender names must be unique; repeated: {duplicates}")
        if value and not any(recommender.weight > 0 for recommender in value):
            raise ValueError("at least one recommender needs a weight above 0")
        return value

    @model_validator(mode="after")
    def _arms_name_recommenders(self) -> Settings:
        known = {recommender.name for recommender in self.recommenders}
        start = self.feedback.learner.start_weights
        if start is not None and not start.keys() <= known:
            raise ValueError(
                f"feedback.learner.start_weights name unknown recommenders "
                f"{sorted(start.keys() - known)}; known: {sorted(known)}"
            )
        for index, arm in enumerate(self.feedback.experiments.arms):
            if isinstance(arm.weights, dict) and not arm.weights.keys() <= known:
                unknown = sorted(arm.weights.keys() - known)
                raise ValueError(
                    f"feedback.experiments.arms.{index} ({arm.name}): weights name unknown "
                    f"recommenders {unknown}; known: {sorted(known)}"
                )
            if isinstance(arm.weights, dict):
                fused = {**self.fusion_weights, **arm.weights}
                if not any(weight > 0 for weight in fused.values()):
                    raise ValueError(
                        f"feedback.experiments.arms.{index} ({arm.name}): weights leave no "
                        "recommender with a weight above 0 to fuse"
                    )
        return self

    @property
    def fusion_weights(self) -> dict[str, float]:
        """Each recommender's configured weight, by name, in config order."""
        return {recommender.name: recommender.weight for recommender in self.recommenders}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's contents arrive as init arguments; the environment overrides them.
        return env_settings, init_settings

    def timeout_s(self, recommender: RecommenderSettings) -> float:
        """The per-call budget of `recommender` in seconds, never beyond the deadline."""
        timeout_ms = recommender.timeout_ms or self.deadline_ms
        return min(timeout_ms, self.deadline_ms) / 1000


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read gateway config {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"gateway config {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"gateway config {path} must be a mapping of settings at the top level")
    return data


def _overrides(environ: Mapping[str, str]) -> list[str]:
    """The environment variables that override settings (all but the one naming the file)."""
    return sorted(
        variable
        for variable in environ
        if variable.upper().startswith(ENV_PREFIX) and variable.upper() != _CONFIG_FILE_VARIABLE
    )


def config_file(path: str | os.PathLike[str] | None = None) -> Path:
    """The file `load_settings(path)` reads: `path`, `$GATEWAY_CONFIG`, or the packaged one."""
    return Path(path or os.environ.get(_CONFIG_FILE_VARIABLE) or DEFAULT_CONFIG_PATH)


def describe_source(path: str | os.PathLike[str] | None = None) -> str:
    """Where `load_settings(path)` takes the settings from: the file, and any overrides."""
    overrides = _overrides(os.environ)
    with_overrides = f" with {', '.join(overrides)} from the environment" if overrides else ""
    return f"{config_file(path)}{with_overrides}"


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Load and validate the settings; raise `ConfigError` naming the field on failure.

    `path` defaults to `$GATEWAY_CONFIG`, then to the packaged `config.yaml`; `GATEWAY_*`
    environment variables override single fields of it.
    """
    file = config_file(path)
    overrides = _overrides(os.environ)
    known = {f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields}
    unknown = [v for v in overrides if v.upper().split("__", 1)[0] not in known]
    if unknown:
        raise ConfigError(
            f"unknown gateway setting {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    data = _read_file(file)
    try:
        return Settings(**data)
    except ValidationError as exc:
        problems = validation_summary(validation_problems(exc, top_level="(top level)"))
        raise ConfigError(f"invalid gateway config ({describe_source(path)}): {problems}") from exc


# What the gunicorn master validated last; a worker it forks inherits it.
_pinned: Settings | None = None


def pin_settings(settings: Settings) -> None:
    """Make `settings` what this process, and every worker it forks from now on, serves with."""
    global _pinned
    _pinned = settings


def pinned_settings() -> Settings | None:
    """The settings pinned in this process (or the master that forked it); None if none were."""
    return _pinned
