"""Settings: one pydantic tree, from `gateway/config.yaml` (or `GATEWAY_CONFIG`) and `GATEWAY_*`.

The rank just above the core values (docs/architecture.md): it loads no store, no tracer and no
web framework, so the gunicorn master validates a config with nothing else imported.
`gateway.config.settings` holds the tree and its loading, `gateway.config.feedback` the
`feedback:` block, `gateway.config.store_urls` the feedback stores' URLs, checked without I/O.
"""

from __future__ import annotations

from gateway.config.settings import (
    DEFAULT_CONFIG_PATH,
    ENV_PREFIX,
    AdmissionSettings,
    BreakerSettings,
    HedgingSettings,
    HttpSettings,
    OpenInferenceSettings,
    PoolSettings,
    ReadinessSettings,
    RecommenderSettings,
    RetrySettings,
    Settings,
    TracingSettings,
    config_file,
    describe_source,
    load_settings,
    pin_settings,
    pinned_settings,
)

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
