"""JSON within limits, from either side: a frontend's body and a recommender's answer.

What the standard library's parser lets through and the gateway must not:

- nesting: pydantic's serialiser stops at 255 levels and the parser itself at about 1,000
  (a `RecursionError`); the gateway takes `max_depth` levels (the outer value is level 1);
- integers of thousands of digits, which cost quadratic time to convert (and 4,300 digits
  raise): at most `MAX_INT_DIGITS`;
- numbers that overflow a float (`1e999` parses to infinity, which the gateway's response
  could only write as `null`): refused, as are `NaN` and `Infinity` themselves;
- strings holding an unpaired surrogate escape (`"\\ud800"`), which is no Unicode text and
  cannot be written out as UTF-8.

`loads` raises `ValueError` for text that is not JSON and `JsonRefused` (a `ValueError`)
for JSON beyond a limit. The common answer pays for the checks with a few scans of its bytes
in C, not with Python code per value:

- numbers: only text with a run of more than `MAX_INT_DIGITS` digits or an exponent of three
  digits or more (`e308`; a string can look like one, and pays the same) is parsed by the
  decoder whose hooks check every number; other text cannot hold a number beyond the limits;
- nesting: measured on the parsed value only when the text has more brackets than
  `max_depth` (fewer cannot nest deeper);
- unpaired surrogates: looked for only when the text has a surrogate escape at all.

Both sides go through here: `loads` parses a recommender's answer (`gateway.recommenders.clients`),
and `loads_request` a frontend's body (`gateway.contract.schemas.parse_request`), where a refusal
also names
the top-level field that broke the limit (`offending_field`), for the 422 to say.
"""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

import pydantic_core

__all__ = ["MAX_INT_DIGITS", "JsonRefused", "loads", "loads_request", "offending_field"]

MAX_INT_DIGITS = 100


class JsonRefused(ValueError):
    """JSON text beyond one of the gateway's limits; the message says which.

    `field`: the top-level field to blame, when `loads_request` could name one.
    """

    field: str | None = None


def _refuse_constant(name: str) -> NoReturn:
    # NaN and Infinity are not JSON at all (a syntax error, not a limit).
    raise ValueError(f"{name} is not valid JSON")


def _checked_int(text: str) -> int:
    digits = len(text) - (text[0] == "-")
    if digits > MAX_INT_DIGITS:
        raise JsonRefused(f"an integer of {digits} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _checked_float(text: str) -> float:
    value = float(text)
    if value - value:  # inf - inf is nan, which is true (JSON text never parses to nan)
        shown = text if len(text) <= 24 else text[:20] + "..."
        raise JsonRefused(f"a number too large for a float ({shown})")
    return value


# Decoders made once: `json.loads` with hooks builds a new decoder (and scanner) per call.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_CHECKING_DECODER = json.JSONDecoder(
    parse_constant=_refuse_constant, parse_float=_checked_float, parse_int=_checked_int
)

# The text's shape, in one pass in C: every digit read as 0, E as e, [ as {, D as d, signs
# dropped. A number beyond the limits shows as a run of zeros or as "e000"; the brackets are
# counted as one; a surrogate escape shows as "\\ud".
_SHAPES = bytes.maketrans(b"123456789E[D", b"000000000e{d")
_LONG_RUN = b"0" * (MAX_INT_DIGITS + 1)


def loads(payload: bytes | str, max_depth: int) -> Any:
    """Parse JSON text (UTF-8 if bytes) within the limits; `ValueError` if it is not JSON."""
    data = payload if isinstance(payload, bytes) else payload.encode("utf-8")
    shapes = data.translate(_SHAPES, b"+-")
    if _LONG_RUN in shapes or b"e000" in shapes:
        value = _checking_loads(data, max_depth)
    else:
        try:
            # pydantic's parser (jiter), three times as fast as the standard library's.
            value = pydantic_core.from_json(data, allow_inf_nan=False)
        except ValueError:
            # Not JSON, or deeper than jiter goes (200): the standard library's parser says
            # which, in the words it always has.
            value = _checking_loads(data, max_depth)
    _check(value, shapes, max_depth)
    return value


def loads_request(payload: bytes, max_depth: int) -> Any:
    """A frontend's body, as `loads` parses it; a refusal names the field to blame, if one is."""
    try:
        return loads(payload, max_depth)
    except JsonRefused as exc:
        exc.field = offending_field(payload.decode("utf-8"), max_depth)
        raise


def _checking_loads(data: bytes, max_depth: int) -> Any:
    try:
        return _CHECKING_DECODER.decode(data.decode("utf-8"))
    except RecursionError:
        # The parser's own limit, hundreds of levels above any `max_depth` allowed.
        raise JsonRefused(f"nested deeper than {max_depth} levels") from None


def _check(value: Any, shapes: bytes, max_depth: int) -> None:
    """What the decoder does not see: the nesting, and unpaired surrogates."""
    if shapes.count(b"{") > max_depth and _deeper_than(value, max_depth):
        raise JsonRefused(f"nested deeper than {max_depth} levels")
    if b"\\ud" in shapes and not _encodable(value):
        raise JsonRefused("a string with an unpaired surrogate escape (\\ud800-\\udfff)")


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether `value` nests more than `limit` levels: a walk level by level, no recursion."""
    level = [value] if type(value) is dict or type(value) is list else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below = []
        for node in level:
            for child in node.values() if type(node) is dict else node:
                if type(child) is dict or type(child) is list:
                    below.append(child)
        level = below
    return False


def _encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_SPACE = re.compile(r"[ \t\n\r]*")


def _skip_space(text: str, position: int) -> int:
    match = _SPACE.match(text, position)
    return match.end() if match is not None else position


def offending_field(text: str, max_depth: int) -> str | None:
    """The first top-level field of the object `text` whose value breaks a limit.

    For a message naming the field; None when `text` is not an object or no single field is
    to blame. Each value is parsed on its own, one level down from the top.
    """
    position = _skip_space(text, 0)
    if text[position : position + 1] != "{":
        return None
    position = _skip_space(text, position + 1)
    try:
        while text[position : position + 1] == '"':
            key, position = _CHECKING_DECODER.raw_decode(text, position)
            name = str(key)
            position = _skip_space(text, position)
            if text[position : position + 1] != ":":
                return None
            start = _skip_space(text, position + 1)
            try:
                value, position = _CHECKING_DECODER.raw_decode(text, start)
                shapes = text[start:position].encode("utf-8").translate(_SHAPES, b"+-")
                _check(value, shapes, max_depth - 1)
            except (JsonRefused, RecursionError):
                return name
            position = _skip_space(text, position)
            if text[position : position + 1] != ",":
                return None
            position = _skip_space(text, position + 1)
    except ValueError:
        return None
    return None
