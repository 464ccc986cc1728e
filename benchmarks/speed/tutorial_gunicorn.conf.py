"""gunicorn as tutorials configure it, for the per-call-session reference."""

from __future__ import annotations

import multiprocessing

workers = multiprocessing.cpu_count() * 2 + 1
worker_class = "sync"
preload_app = True
timeout = 30
accesslog = "-"
errorlog = "-"
