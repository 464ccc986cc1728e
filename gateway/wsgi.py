"""The app gunicorn serves: ``gunicorn -c gunicorn.conf.py gateway.wsgi:app``."""

from __future__ import annotations

from gateway import create_app
from gateway.errors import ConfigError

__all__ = ["app"]

try:
    app = create_app()
except ConfigError as exc:
    raise SystemExit(f"gateway: {exc}") from None
