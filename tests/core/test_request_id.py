"""Tests of `gateway.core.request_id`: which client ids are used as given."""

from __future__ import annotations

from gateway.core.request_id import REQUEST_ID_MAX, new_request_id, valid_request_id


def test_a_character_is_valid_exactly_when_it_is_visible_ascii() -> None:
    for code in range(0x250):
        visible = 0x21 <= code <= 0x7E
        assert valid_request_id(chr(code)) is visible, hex(code)
        assert valid_request_id(f"id-{chr(code)}-1") is visible, hex(code)


def test_an_id_is_1_to_the_maximum_characters_long() -> None:
    assert not valid_request_id("")
    assert valid_request_id("a" * REQUEST_ID_MAX)
    assert not valid_request_id("a" * (REQUEST_ID_MAX + 1))
    assert not valid_request_id("has spaces in it")
    assert valid_request_id(new_request_id())
