"""`gateway.core.jsonlimits`: JSON from either side, parsed within the gateway's limits."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from gateway.core.jsonlimits import MAX_INT_DIGITS, JsonRefused, loads, offending_field


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "NaN",
        "[Infinity]",
        '{"a": -Infinity}',
        "[1,]",
        '{"a": 1} x',
        "\ufeff{}",
    ],
)
def test_what_is_not_json_is_a_value_error_not_a_refusal(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        loads(text, 64)

    assert not isinstance(caught.value, JsonRefused)


def test_invalid_utf8_is_not_json() -> None:
    with pytest.raises(ValueError) as caught:
        loads(b'{"a": "\xff"}', 64)

    assert not isinstance(caught.value, JsonRefused)


@pytest.mark.parametrize(
    ("levels", "taken"), [(1, True), (64, True), (65, False), (300, False), (100_000, False)]
)
def test_nesting_is_taken_up_to_the_limit(levels: int, taken: bool) -> None:
    if taken:
        assert loads(nested(levels), 64) == json.loads(nested(levels))
    else:
        with pytest.raises(JsonRefused, match="nested deeper than 64 levels"):
            loads(nested(levels), 64)


def test_many_brackets_side_by_side_are_not_depth() -> None:
    wide = {"items": [{"id": f"i{i}", "tags": [i]} for i in range(500)]}

    assert loads(json.dumps(wide), 4) == wide  # the answer, its list, an item, its tags
    with pytest.raises(JsonRefused):
        loads(json.dumps(wide), 3)


def test_brackets_inside_strings_do_not_hide_depth() -> None:
    # Closing brackets in strings would fool a count of the text's brackets; the walk of the
    # parsed value is not fooled.
    text = '["]]]]", ' * 70 + '"x"' + "]" * 70

    with pytest.raises(JsonRefused):
        loads(text, 64)
    assert loads('{"a": "[[[[[[[[[[[[[[[[[[[[[[[["}', 2) == {"a": "[" * 24}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("1e999", "a number too large for a float (1e999)"),
        ("[-1E+400]", "a number too large for a float (-1E+400)"),
        ("9" * 309 + ".5", "a number too large for a float"),
        ("9" * (MAX_INT_DIGITS + 1), f"an integer of {MAX_INT_DIGITS + 1} digits"),
        ("-" + "9" * 4299, "an integer of 4299 digits"),
        ("9" * 5000, "an integer of 5000 digits"),
        ('["\\ud800"]', "unpaired surrogate"),
        ('{"\\udfff": 1}', "unpaired surrogate"),
    ],
)
def test_numbers_and_strings_beyond_the_limits_are_refused(text: str, problem: str) -> None:
    with pytest.raises(JsonRefused, match=re.escape(problem)):
        loads(text, 64)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e308", 1e308),
        ("1e-999", 0.0),
        ("-" + "9" * MAX_INT_DIGITS, -int("9" * MAX_INT_DIGITS)),
        ('"e000 and a run of 0000000000"', "e000 and a run of 0000000000"),
        ('"' + "1" * 500 + '"', "1" * 500),
        ('"\\ud83d\\ude00"', "\U0001f600"),
        ('{"id": "3f2a9c0e5b7d4e1a", "score": 0.25}', {"id": "3f2a9c0e5b7d4e1a", "score": 0.25}),
    ],
)
def test_values_within_the_limits_parse_as_the_standard_library_parses_them(
    text: str, value: Any
) -> None:
    assert loads(text, 64) == value == json.loads(text)
    assert loads(text.encode(), 64) == value


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"user_id": "u", "context": ' + nested(64) + "}", "context"),
        ('{"user_id": "u", "context": ' + nested(5000) + "}", "context"),
        ('{"a": 1, "b": {"c": [1e999]}}', "b"),
        ('{"resultSize": ' + "9" * 200 + "}", "resultSize"),
        ('{"a": "\\udc00"}', "a"),
        (nested(100), None),
        ('{"a": 1}', None),
        ("not json", None),
    ],
)
def test_the_field_to_blame_is_the_top_level_field_holding_the_problem(
    text: str, field: str | None
) -> None:
    assert offending_field(text, 64) == field
