"""Tests of gateway/feedback/impressions.py: the record, user hashing, arms, the credit rule."""

from __future__ import annotations

import collections
import hashlib
import hmac

import pytest

from gateway.feedback.impressions import (
    USER_HASH_LENGTH,
    EncodedImpression,
    FeedbackEvent,
    Impression,
    ShownItem,
    ShownItems,
    assign_arm,
    credit_for,
    hash_user,
    is_event_kind,
)

INTERLEAVED = Impression(
    request_id="req-1",
    at=1_700_000_000.123456,
    arm="treatment",
    items=(
        ShownItem("i1", 1, "als", ("als", "pop")),
        ShownItem("i2", 2, "trd", ("trd",)),
        ShownItem("i3", 3, "als", ("als",)),
    ),
)
FUSED = Impression(
    request_id="req-2",
    at=1_700_000_001.0,
    arm=None,
    items=(ShownItem("i9", 1, None, ("als", "ncf", "pop")), ShownItem("i8", 2, None, ())),
)
# An answer from more recommenders than a bit mask in a double holds.
WIDE = Impression(
    request_id="req-3",
    at=1_700_000_002.0,
    arm=None,
    items=(
        ShownItem("i1", 1, None, tuple(f"r{n:02}" for n in range(60))),
        ShownItem("i2", 2, "r59", ("r58", "r59")),
    ),
)


@pytest.mark.parametrize("impression", [INTERLEAVED, FUSED, WIDE])
def test_the_record_keeps_every_item_its_place_team_and_sources(impression: Impression) -> None:
    shown = ShownItems.from_json(impression.to_json())

    assert shown.items() == impression.items
    assert shown.arm == impression.arm
    assert shown.teams() == impression.teams()
    for item in impression.items:
        assert shown.item(item.item_id) == item
    assert shown.item("never-shown") is None


def test_the_record_names_each_recommender_once_and_keeps_no_request_time_or_user() -> None:
    text = INTERLEAVED.to_json()

    # Sources as bit masks over the names (i1: als and pop, 0b011), teams as their indexes.
    assert text == '[2,"treatment",["als","pop","trd"],[["i1",3,0],["i2",4,2],["i3",1,0]]]'
    assert FUSED.to_json() == '[2,null,["als","ncf","pop"],[["i9",7],["i8",0]]]'
    assert WIDE.to_json().endswith(
        '[["i1",[' + ",".join(map(str, range(60))) + ']],["i2",[58,59],59]]]'
    )


VERSION_1 = (
    '{"r":"req-1","u":"5f2a","t":1700000000.5,"f":"interleave","a":"treatment",'
    '"i":[["i1",1,"als",[["als",1],["pop",3]]],["i2",2,"trd",[["trd",1]]],'
    '["i3",3,null,[["als",2],["als",4]]]]}'
)


def test_a_record_of_the_first_form_is_still_read() -> None:
    shown = ShownItems.from_json(VERSION_1)

    assert shown.arm == "treatment"
    assert shown.teams() == ("als", "trd")
    assert shown.items() == (
        ShownItem("i1", 1, "als", ("als", "pop")),
        ShownItem("i2", 2, "trd", ("trd",)),
        ShownItem("i3", 3, None, ("als",)),
    )


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[]", "impression record is"),
        ("[3,null,[],[]]", "impression record is"),
        ('"text"', "impression record is"),
        ("[2,3,[],[]]", "'arm'"),
        ("[2,null,{},[]]", "names"),
        ('[2,null,["a",1],[]]', "names"),
        ('[2,null,["a"],{}]', "items"),
        ('[2,null,["a"],[["i1"]]]', "items"),
        ('[2,null,["a"],[["i1",2]]]', "sources"),
        ('[2,null,["a"],[["i1",-1]]]', "sources"),
        ('[2,null,["a"],[["i1","a"]]]', "sources"),
        ('[2,null,["a"],[["i1",[1]]]]', "sources"),
        ('[2,null,["a"],[["i1",1,1]]]', "team"),
        ('[2,null,["a"],[["i1",1,true]]]', "team"),
        ('[2,null,["a"],[[7,1]]]', "item ids"),
        ('{"a":null,"i":{}}', "'i'"),
        ('{"a":null,"i":[["i1",1,null]]}', "'i'"),
        ('{"a":3,"i":[]}', "'a'"),
        ('{"a":null,"i":[["i1",true,null,[]]]}', "position"),
        ('{"a":null,"i":[["i1",1,null,[["a"]]]]}', "sources"),
        ('{"a":null,"i":[["i1",1,7,[]]]}', "team"),
    ],
)
def test_a_malformed_record_is_refused_naming_the_field(text: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        shown = ShownItems.from_json(text)
        shown.items()
        shown.teams()


def test_an_impression_knows_its_items_teams_and_recommenders() -> None:
    assert INTERLEAVED.item("i2") == INTERLEAVED.items[1]
    assert INTERLEAVED.item("nope") is None
    assert INTERLEAVED.teams() == ("als", "trd")
    assert INTERLEAVED.recommenders() == ("als", "pop", "trd")
    assert FUSED.teams() == ()
    assert FUSED.recommenders() == ("als", "ncf", "pop")


def test_the_user_hash_is_the_keyed_hmac_truncated() -> None:
    expected = hmac.new(b"pepper", b"alice", hashlib.sha256).hexdigest()[:32]

    assert hash_user("alice", "pepper") == expected
    assert hash_user("alice", b"pepper") == expected
    assert len(expected) == USER_HASH_LENGTH
    assert hash_user("alice", "other salt") != expected
    assert "alice" not in expected


def test_a_user_hash_needs_a_salt() -> None:
    with pytest.raises(ValueError, match="salt"):
        hash_user("alice", "")


def test_arms_are_sticky_and_split_by_share_over_ten_thousand_users() -> None:
    arms = [("control", 0.5), ("rrf-learnt", 0.3), ("interleave", 0.2)]
    users = [hash_user(f"user-{n}", "salt") for n in range(10_000)]

    first = [assign_arm(user, arms) for user in users]
    again = [assign_arm(user, tuple(arms)) for user in reversed(users)][::-1]
    counts = collections.Counter(first)

    assert first == again
    for name, share in arms:
        assert counts[name] / len(users) == pytest.approx(share, abs=0.02)


def test_shares_need_not_sum_to_one_and_a_zero_share_gets_nobody() -> None:
    arms = [("a", 1.0), ("off", 0.0), ("b", 3.0)]
    counts = collections.Counter(assign_arm(f"{n:032x}", arms) for n in range(4000))

    assert counts["off"] == 0
    assert counts["b"] / 4000 == pytest.approx(0.75, abs=0.03)


@pytest.mark.parametrize(
    ("arms", "message"),
    [
        ([], "at least one arm"),
        ([("a", 0.5), ("a", 0.5)], "unique"),
        ([("a", -1.0)], "non-negative"),
        ([("a", 0.0)], "positive share"),
    ],
)
def test_bad_arms_are_refused(arms: list[tuple[str, float]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        assign_arm("abc", arms)


def test_a_team_takes_all_the_credit_for_its_item() -> None:
    assert credit_for(INTERLEAVED.items[0]) == {"als": 1.0}


def test_without_a_team_the_sources_share_the_credit_equally() -> None:
    credit = credit_for(FUSED.items[0])

    assert credit == pytest.approx({"als": 1 / 3, "ncf": 1 / 3, "pop": 1 / 3})
    assert sum(credit.values()) == pytest.approx(1.0)


def test_an_item_with_no_team_and_no_source_credits_nobody() -> None:
    assert credit_for(ShownItem("x", 1, None, ())) == {}


def test_event_kinds_and_events() -> None:
    event = FeedbackEvent("req-1", "i1", "click")

    assert event.event_id is None
    assert [is_event_kind(k) for k in ("click", "purchase", "dismiss", "like", 1)] == [
        True,
        True,
        True,
        False,
        False,
    ]


def test_an_answer_encoded_in_one_pass_is_the_impression_it_showed() -> None:
    items = [
        {"id": "i1", "score": 0.5, "sources": [{"name": "als", "rank": 1, "score": 0.9}]},
        {
            "id": "i2",
            "score": 0.4,
            "sources": [{"name": "trd", "rank": 1}, {"name": "pop", "rank": 3}],
        },
        {"id": "i3", "score": 0.3, "sources": []},
    ]
    encoded = EncodedImpression.of_answer(
        "req-3",
        1_700_000_002.25,
        "arm-a",
        items,
        ("als", "trd", "pop"),
    )

    assert ShownItems.from_json(encoded.to_json()).items() == (
        ShownItem("i1", 1, "als", ("als",)),
        ShownItem("i2", 2, "trd", ("pop", "trd")),
        ShownItem("i3", 3, "pop", ()),
    )
    assert encoded.recommenders() == ("als", "pop", "trd")
    assert (encoded.request_id, encoded.at, encoded.arm) == ("req-3", 1_700_000_002.25, "arm-a")
    assert (
        encoded.to_json()
        == Impression(
            "req-3",
            1_700_000_002.25,
            "arm-a",
            (
                ShownItem("i1", 1, "als", ("als",)),
                ShownItem("i2", 2, "trd", ("pop", "trd")),
                ShownItem("i3", 3, "pop", ()),
            ),
        ).to_json()
    )


def test_an_answer_from_more_recommenders_than_a_mask_holds_lists_their_indexes() -> None:
    names = [f"r{n:02}" for n in range(60)]
    items = [
        {"id": "i1", "sources": [{"name": name, "rank": 1} for name in names]},
        {"id": "i2", "sources": [{"name": "r59", "rank": 2}, {"name": "r58", "rank": 1}]},
    ]

    encoded = EncodedImpression.of_answer("req-3", 1_700_000_002.0, None, items, (None, "r59"))

    assert encoded.to_json() == WIDE.to_json()
    assert encoded.recommenders() == tuple(names)
