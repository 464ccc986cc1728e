"""The app gunicorn serves: ``gunicorn -c gunicorn.conf.py gateway.asgi:app``.

One event loop per worker serves HTTP and runs the fan-out (`gateway.serving.asgi_app`). The app is
built from the settings the gunicorn master validated (`gateway.config.pin_settings`), else from the
config file and the environment.
"""

from __future__ import annotations

from gateway.config.settings import pinned_settings
from gateway.core.errors import ConfigError
from gateway.observability.logs import configure_logging
from gateway.serving.asgi_app import GatewayASGI
from gateway.web.app import create_app

__all__ = ["app"]

# The serving process logs JSON lines on stdout; gunicorn's own log stays on stderr.
configure_logging()

try:
    app = GatewayASGI(create_app(pinned_settings()))
except ConfigError as exc:
    raise SystemExit(f"gateway: {exc}") from None
