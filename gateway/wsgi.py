"""The app gunicorn serves: ``gunicorn -c gunicorn.conf.py gateway.wsgi:app``."""

from __future__ import annotations

import logging

from gateway import create_app
from gateway.errors import ConfigError

__all__ = ["app"]

# Under gunicorn, the gateway's log lines go where gunicorn's error log goes, at its level.
_gunicorn_log = logging.getLogger("gunicorn.error")
if _gunicorn_log.handlers:
    _gateway_log = logging.getLogger("gateway")
    _gateway_log.handlers = _gunicorn_log.handlers
    _gateway_log.setLevel(_gunicorn_log.level)
    _gateway_log.propagate = False

try:
    app = create_app()
except ConfigError as exc:
    raise SystemExit(f"gateway: {exc}") from None
