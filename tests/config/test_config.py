"""Tests of `gateway.config`: the packaged defaults, a replacement file, environment overrides."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from gateway.config.settings import load_settings
from gateway.core.errors import ConfigError

pytestmark = pytest.mark.usefixtures("clean_environment")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


MINIMAL = """
recommenders:
  - name: a
    url: http://127.0.0.1:6001/test
    timeout_ms: 250
  - name: b
    url: http://127.0.0.1:6002/test
deadline_ms: 400
"""


def test_the_packaged_defaults_name_the_four_mocks_in_order() -> None:
    settings = load_settings()

    assert [r.name for r in settings.recommenders] == ["sml", "asc", "trd", "psn"]
    assert [str(r.url) for r in settings.recommenders] == [
        f"http://127.0.0.1:{port}/test" for port in (5001, 5002, 5003, 5004)
    ]
    assert settings.deadline_ms == 1000
    assert settings.strategy == "async"
    assert settings.max_body_bytes == 1024 * 1024


def test_gateway_config_replaces_the_file(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    clean_environment.setenv("GATEWAY_CONFIG", str(write(tmp_path, MINIMAL)))

    settings = load_settings()

    assert [r.name for r in settings.recommenders] == ["a", "b"]
    assert settings.deadline_ms == 400
    assert settings.timeout_s(settings.recommenders[0]) == 0.25
    # No timeout of its own: the deadline bounds the call.
    assert settings.timeout_s(settings.recommenders[1]) == 0.4


def test_environment_overrides_single_fields(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    clean_environment.setenv("GATEWAY_DEADLINE_MS", "500")
    clean_environment.setenv("GATEWAY_MAX_BODY_BYTES", "2048")
    clean_environment.setenv("GATEWAY_POOL__LIMIT_PER_HOST", "16")
    clean_environment.setenv("GATEWAY_SERVER", "gthread")
    clean_environment.setenv("GATEWAY_HTTP__HEADER_TIMEOUT_S", "2.5")
    recommenders = [{"name": "only", "url": "http://127.0.0.1:7000/x"}]
    clean_environment.setenv("GATEWAY_RECOMMENDERS", json.dumps(recommenders))

    settings = load_settings(write(tmp_path, MINIMAL))

    assert settings.deadline_ms == 500
    assert settings.max_body_bytes == 2048
    assert settings.pool.limit_per_host == 16
    assert settings.pool.limit == 1024
    assert settings.server == "gthread"
    assert settings.http.header_timeout_s == 2.5
    assert settings.http.max_connections == 4096
    assert [r.name for r in settings.recommenders] == ["only"]


# What pydantic finds wrong with a field is in its words, which another version may word
# otherwise: the gateway promises the field, named as it is in the file (`field: ...`).
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL.replace("deadline_ms: 400", "deadline_ms: -1"), "deadline_ms: "),
        (MINIMAL.replace("timeout_ms: 250", "timeout_ms: soon"), "recommenders.0.timeout_ms"),
        (MINIMAL.replace("http://127.0.0.1:6002/test", "not a url"), "recommenders.1.url"),
        (MINIMAL.replace("name: b", "name: a"), "recommender names must be unique"),
        (
            MINIMAL.replace("timeout_ms: 250", "weight: 0").replace(
                "url: http://127.0.0.1:6002/test", "url: http://127.0.0.1:6002/test\n    weight: 0"
            ),
            "at least one recommender needs a weight above 0",
        ),
        (MINIMAL.replace("timeout_ms: 250", "weight: -1"), "recommenders.0.weight"),
        (MINIMAL + "fusion_window: 0\n", "fusion_window: "),
        (MINIMAL + "strategy: magic\n", "strategy: "),
        (MINIMAL + "server: twisted\n", "server: "),
        (MINIMAL + "http:\n  header_timeout_s: 0\n", "http.header_timeout_s: "),
        (MINIMAL + "http:\n  drain_s: -1\n", "http.drain_s: "),
        (MINIMAL + "pool:\n  ca_file: /nowhere/ca.pem\n", "pool.ca_file: "),
        (MINIMAL + "fusion: none\nbreaker:\n  enabled: maybe\n", "breaker.enabled"),
        (MINIMAL + "deadline: 3\n", "deadline: "),
        ("recommenders: []\n", "recommenders: "),
        ("deadline_ms: 10\n", "recommenders: "),
        ("- just\n- a list\n", "must be a mapping"),
        ("recommenders: [unclosed\n", "is not valid YAML"),
    ],
)
def test_an_invalid_file_is_refused_naming_the_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert expected in str(caught.value)
    assert str(path) in str(caught.value)


def test_an_invalid_override_names_the_variable(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    clean_environment.setenv("GATEWAY_DEADLINE_MS", "soon")

    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, MINIMAL))

    assert "deadline_ms: " in str(caught.value)
    assert "GATEWAY_DEADLINE_MS" in str(caught.value)


def test_a_misspelt_override_is_refused_not_ignored(clean_environment: pytest.MonkeyPatch) -> None:
    clean_environment.setenv("GATEWAY_DEADLNE_MS", "500")

    with pytest.raises(ConfigError, match="unknown gateway setting GATEWAY_DEADLNE_MS"):
        load_settings()


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read gateway config .*nowhere\.yaml"):
        load_settings(tmp_path / "nowhere.yaml")


def assert_names_blank_key(message: str, field: str) -> None:
    """`message` blames `field` in the gateway's words; pydantic's around them may vary."""
    blamed = rf"{re.escape(field)}: [^;]*an API key must not be empty or blank"
    assert re.search(blamed, message), message


@pytest.mark.parametrize(
    ("keys", "field"),
    [('["", "k"]', "api_keys.0"), ('["k", "  "]', "api_keys.1"), ('[""]', "api_keys.0")],
)
def test_an_empty_or_blank_api_key_in_the_file_is_refused(
    tmp_path: Path, keys: str, field: str
) -> None:
    # It would let in a request whose X-Api-Token header is empty.
    path = write(tmp_path, MINIMAL + f"api_keys: {keys}\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert_names_blank_key(str(caught.value), field)


@pytest.mark.parametrize(
    ("value", "field"), [("k1,,k2", "api_keys.1"), ("k1,", "api_keys.1"), (" ", "api_keys.0")]
)
def test_an_empty_or_blank_api_key_in_the_environment_is_refused(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch, value: str, field: str
) -> None:
    clean_environment.setenv("GATEWAY_API_KEYS", value)

    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, MINIMAL))

    assert_names_blank_key(str(caught.value), field)
    assert "GATEWAY_API_KEYS" in str(caught.value)


def test_an_empty_api_keys_variable_sets_no_keys(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    clean_environment.setenv("GATEWAY_API_KEYS", "")

    assert load_settings(write(tmp_path, MINIMAL + 'api_keys: ["k"]\n')).api_keys == []


@pytest.mark.parametrize("source", ["file", "environment"])
def test_the_old_strategy_name_sync_is_accepted_as_sequential_with_a_warning(
    tmp_path: Path,
    clean_environment: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    source: str,
) -> None:
    if source == "file":
        path = write(tmp_path, MINIMAL + "strategy: sync\n")
    else:
        path = write(tmp_path, MINIMAL)
        clean_environment.setenv("GATEWAY_STRATEGY", "sync")

    # The gateway's logger stops propagating once its JSON log is set up
    # (`gateway.observability.logs`).
    clean_environment.setattr(logging.getLogger("gateway"), "propagate", True)
    with pytest.warns(DeprecationWarning, match="strategy `sync` is deprecated.*`sequential`"):
        settings = load_settings(path)

    assert settings.strategy == "sequential"
    assert "strategy `sync` is deprecated" in caplog.text


def test_sequential_needs_no_warning(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, MINIMAL + "strategy: sequential\n")).strategy == (
        "sequential"
    )


def test_feedback_is_off_by_default_and_a_store_variable_switches_it_on(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    assert load_settings().feedback.store is None
    clean_environment.setenv("GATEWAY_FEEDBACK__STORE", "redis://cache:6379/2")
    clean_environment.setenv("GATEWAY_FEEDBACK__SALT", "secret")

    feedback = load_settings(write(tmp_path, MINIMAL)).feedback

    assert feedback.enabled and feedback.store == "redis://cache:6379/2"
    assert feedback.retention_s == 7 * 86400 and feedback.max_events == 1000
    assert "secret" not in repr(feedback)
    clean_environment.setenv("GATEWAY_FEEDBACK__STORE", "")
    assert not load_settings(write(tmp_path, MINIMAL)).feedback.enabled


def test_the_learners_beta_and_prior_default_to_4_and_50_and_variables_set_them(
    tmp_path: Path, clean_environment: pytest.MonkeyPatch
) -> None:
    learner = load_settings().feedback.learner
    assert (learner.beta, learner.prior) == (4.0, 50.0)
    clean_environment.setenv("GATEWAY_FEEDBACK__LEARNER__BETA", "2.5")
    clean_environment.setenv("GATEWAY_FEEDBACK__LEARNER__PRIOR", "200")

    learner = load_settings(write(tmp_path, MINIMAL)).feedback.learner

    assert (learner.beta, learner.prior) == (2.5, 200.0)


def test_a_store_without_a_salt_stops_start_up_naming_the_variable(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    clean_environment.setenv("GATEWAY_FEEDBACK__STORE", "sqlite:///feedback.db")

    with pytest.raises(ConfigError, match="GATEWAY_FEEDBACK__SALT"):
        load_settings()


ARMS = MINIMAL + "feedback:\n  store: sqlite:///f.db\n  salt: s\n  experiments:\n    arms:\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "feedback:\n  store: mysql://x/y\n  salt: s\n", "scheme 'mysql'"),
        (MINIMAL + "feedback:\n  store: sqlite://host/f.db\n  salt: s\n", "has no host"),
        (MINIMAL + "feedback:\n  store: redis://cache/db\n  salt: s\n", "must be a number"),
        (MINIMAL + "feedback:\n  queue_limit: 0\n", "feedback.queue_limit"),
        (MINIMAL + "feedback:\n  learner:\n    floor: 3\n    max_weight: 2\n", "floor (3.0)"),
        (MINIMAL + "feedback:\n  learner:\n    prior: 0\n", "feedback.learner.prior"),
        (MINIMAL + "feedback:\n  learner:\n    beta: -1\n", "feedback.learner.beta"),
        # Hedge's setting, before the margin rule: refused, not silently ignored.
        (MINIMAL + "feedback:\n  learner:\n    rate: 0.02\n", "feedback.learner.rate"),
        (
            ARMS + "      - {name: x, fusion: rrf, share: 1}\n" * 2,
            "arm names must be unique; repeated: ['x']",
        ),
        (ARMS + "      - {name: x, fusion: rrf, share: 0}\n", "arms.0.share"),
        (ARMS + "      - {name: x, fusion: none, share: 1}\n", "arms.0.fusion"),
        (ARMS + "      - {name: x, fusion: magic, share: 1}\n", "arms.0.fusion"),
        (
            ARMS + "      - {name: x, fusion: rrf, share: 1, weights: {a: 2, zz: 1}}\n",
            "weights name unknown recommenders ['zz']",
        ),
        (ARMS + "      - {name: x, fusion: rrf, share: 1, weights: {a: -1}}\n", "weights"),
        (
            ARMS + "      - {name: x, fusion: interleave, share: 1, weights: {a: 0, b: 0}}\n",
            "(x): weights leave no recommender with a weight above 0 to fuse",
        ),
        (ARMS + "      - {name: x, fusion: rrf, share: 1, weights: best}\n", "weights"),
        (
            ARMS + "      - {name: x, fusion: interleave, share: 0.2, explore: true, "
            "min_share: 0.5}\n",
            "arm x: min_share (0.5) must not exceed share (0.2)",
        ),
        (
            MINIMAL + "feedback:\n  learner:\n    start_weights: {a: 1, zz: 2}\n",
            "feedback.learner.start_weights name unknown recommenders ['zz']",
        ),
        (
            MINIMAL + "feedback:\n  learner:\n    start_weights: {a: 0}\n",
            "feedback.learner.start_weights.a",
        ),
    ],
)
def test_a_bad_feedback_block_is_refused_naming_the_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))

    assert expected in str(caught.value)


def test_arms_are_read_with_their_weights(tmp_path: Path) -> None:
    text = ARMS + (
        "      - {name: learn, fusion: rrf, share: 0.8, weights: learned}\n"
        "      - {name: explore, fusion: interleave, share: 0.2, weights: {a: 2}}\n"
        "      - {name: only-a, fusion: interleave, share: 0.1, weights: {b: 0}}\n"
    )

    arms = load_settings(write(tmp_path, text)).feedback.experiments.arms

    assert [(a.name, a.fusion, a.share, a.weights) for a in arms] == [
        ("learn", "rrf", 0.8, "learned"),
        ("explore", "interleave", 0.2, {"a": 2.0}),
        ("only-a", "interleave", 0.1, {"b": 0.0}),
    ]
