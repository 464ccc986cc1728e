"""The app gunicorn serves: ``gunicorn -c gunicorn.conf.py gateway.asgi:app``.

One event loop per worker serves HTTP and runs the fan-out (`gateway.serving`).
"""

from __future__ import annotations

from gateway import create_app
from gateway.errors import ConfigError
from gateway.logs import configure_logging
from gateway.serving import GatewayASGI

__all__ = ["app"]

# The serving process logs JSON lines on stdout; gunicorn's own log stays on stderr.
configure_logging()

try:
    app = GatewayASGI(create_app())
except ConfigError as exc:
    raise SystemExit(f"gateway: {exc}") from None
