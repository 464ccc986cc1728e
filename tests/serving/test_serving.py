"""Tests of `gateway.serving.asgi_app` on its own; requests served through it are tested end to
end."""

from __future__ import annotations

import json
import subprocess
import sys

from gateway.serving.asgi_app import YOUNG_GENERATION_THRESHOLD
from tests.helpers import ROOT


def test_a_settled_heap_is_frozen_and_its_young_generation_collected_less_often() -> None:
    # In a process of its own: the collector's settings are the whole process's.
    script = (
        "import gc, json\n"
        "from gateway.serving.asgi_app import settle_heap\n"
        "before = gc.get_threshold()\n"
        "settle_heap()\n"
        "print(json.dumps([before, gc.get_threshold(), gc.get_freeze_count()]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    before, after, frozen = json.loads(done.stdout)
    assert after == [YOUNG_GENERATION_THRESHOLD, before[1], before[2]]
    assert before[0] < YOUNG_GENERATION_THRESHOLD
    assert frozen > 1000  # the app's modules and what they made at import
