"""`python -m gateway check-config [FILE]`: a config checked as the gateway would load it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.__main__ import main
from mock_recommenders import MockFleet
from tests.helpers import ROOT

pytestmark = pytest.mark.usefixtures("clean_environment")

GOOD = """
recommenders:
  - name: a
    url: http://127.0.0.1:6001/test
  - name: b
    url: http://127.0.0.1:6002/test
deadline_ms: 400
fusion: combmnz
"""

BAD = GOOD.replace("deadline_ms: 400", "deadline_ms: -5") + "max_body_bytes: lots\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_a_good_file_passes_with_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, GOOD)

    assert main(["check-config", str(path)]) == 0

    out, err = capsys.readouterr()
    assert out == (
        f"gateway: config ok: {path}: 2 recommenders (a, b), deadline_ms 400, fusion combmnz, "
        "server uvicorn, strategy async, feedback off\n"
    )
    assert err == ""


def test_the_summary_names_the_feedback_store_arms_and_learner_but_no_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, GOOD)
    monkeypatch.setenv("GATEWAY_FEEDBACK__STORE", "redis://:s3cret@cache.internal:6380/2")
    monkeypatch.setenv("GATEWAY_FEEDBACK__SALT", "pepper")
    monkeypatch.setenv("GATEWAY_FEEDBACK__LEARNER__FROZEN", "true")
    monkeypatch.setenv(
        "GATEWAY_FEEDBACK__EXPERIMENTS__ARMS",
        '[{"name": "ab", "fusion": "rrf", "share": 3}, {"name": "il", "fusion": "interleave", '
        '"share": 1}]',
    )

    assert main(["check-config", str(path)]) == 0

    out, _ = capsys.readouterr()
    assert out.endswith(
        "strategy async, feedback redis cache.internal:6380/2 (arms: ab 75% rrf, "
        "il 25% interleave; learner frozen)\n"
    )
    assert "s3cret" not in out and "pepper" not in out


def test_a_bad_file_fails_naming_every_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, BAD)

    assert main(["check-config", str(path)]) == 1

    out, err = capsys.readouterr()
    assert out == ""
    assert f"invalid gateway config ({path})" in err
    # Each field named; what is wrong with it is in pydantic's words, which may vary.
    assert "deadline_ms: " in err
    assert "max_body_bytes: " in err


def test_the_file_defaults_to_gateway_config_and_overrides_apply(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, GOOD)
    clean_environment.setenv("GATEWAY_CONFIG", str(path))
    clean_environment.setenv("GATEWAY_DEADLINE_MS", "0")

    assert main(["check-config"]) == 1

    _, err = capsys.readouterr()
    assert f"({path} with GATEWAY_DEADLINE_MS from the environment)" in err
    assert "deadline_ms: " in err


def test_without_a_file_the_packaged_config_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config"]) == 0

    out, _ = capsys.readouterr()
    assert "gateway/config.yaml: 4 recommenders (sml, asc, trd, psn)" in out


@pytest.mark.slow
def test_the_command_exits_non_zero_on_a_bad_file_without_a_traceback(tmp_path: Path) -> None:
    bad = write(tmp_path, BAD)

    def check(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "check-config", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    refused = check(str(bad))
    assert refused.returncode == 1
    assert "deadline_ms: " in refused.stderr
    assert "Traceback" not in refused.stderr

    missing = check(str(tmp_path / "nowhere.yaml"))
    assert missing.returncode == 1
    assert "cannot read gateway config" in missing.stderr
    assert "Traceback" not in missing.stderr

    bad.write_text(GOOD)
    accepted = check(str(bad))
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.startswith("gateway: config ok:")


def test_probe_asks_each_model_server_and_fails_when_one_is_not_ready(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fleet: MockFleet
) -> None:
    v1 = fleet.url("asc").replace("/test", "/v1/models/asc:predict")
    wrong = fleet.url("trd").replace("/test", "/v2/models/other/infer")
    ready = f"""
recommenders:
  - name: sml
    url: {fleet.url("sml")}
  - name: asc
    url: {v1}
    protocol: kserve-v1
"""
    path = write(tmp_path, ready)

    assert main(["check-config", str(path), "--probe"]) == 0
    out, err = capsys.readouterr()
    assert "  sml (native): not asked (no readiness URL: give ready_url)\n" in out
    assert f"  asc (kserve-v1): ready (GET {v1.removesuffix(':predict')}: HTTP 200)\n" in out
    assert err == ""

    path = write(
        tmp_path, ready + f"  - name: trd\n    url: {wrong}\n    protocol: open-inference\n"
    )
    assert main(["check-config", str(path), "--probe"]) == 1
    out, err = capsys.readouterr()
    trd_ready = wrong.replace("/infer", "/ready")
    assert f"  trd (open-inference): NOT READY (GET {trd_ready}: HTTP 404)\n" in out
    assert err == f"gateway: recommenders not ready: trd (GET {trd_ready}: HTTP 404)\n"
