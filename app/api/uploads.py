"""Checks on what clients send, shared by the routes: form fields and raw JSON bodies.

Every tenant is treated as hostile: a value the database, the file system or the JSON parser would
choke on (a NUL byte, a lone surrogate, a string longer than any field needs, JSON nested deep
enough to exhaust the parser's recursion) is refused here with a 422, before it can become a 500.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

from fastapi import Request

from app.errors import Unprocessable

# Longest string accepted anywhere inside a JSON body; every field with a meaning has its own, smaller cap.
MAX_JSON_STRING = 4096
# A form field not listed with its own cap (names, formats, columns) gets this one.
DEFAULT_FIELD_LENGTH = 200

# A string, or an unterminated one running to the end: every quote starts a match, so the scan stays linear.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*(?:"|\\?\Z)', re.S)
_BRACKETS = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """Deepest bracket nesting outside strings, without recursion: strings are cut out, then the
    brackets left are summed. An unterminated string only makes the count larger, never smaller."""
    brackets = _BRACKETS.sub("", _STRING.sub("", text))
    return max(accumulate(_STEP[c] for c in brackets), default=0)


def _bad(what: str, msg: str, loc: list, code: str = "validation_error") -> Unprocessable:
    return Unprocessable(f"{what}: {msg}", code=code, errors=[{"loc": loc, "msg": msg}])


def check_text(value: str, loc: list, max_length: int) -> None:
    """NUL bytes and lone surrogates can be stored in no database column; over-long values serve no field."""
    where = ".".join(str(p) for p in loc)
    if "\x00" in value:
        raise _bad(where, "NUL bytes are not allowed", loc)
    if len(value) > max_length:
        raise _bad(where, f"longer than {max_length} characters", loc)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _bad(where, "not valid Unicode (a lone surrogate escape)", loc) from exc


def check_strings(value: Any, loc: list) -> None:
    """Every key and string value of a parsed JSON document (its depth was bounded before parsing)."""
    if isinstance(value, str):
        check_text(value, loc, MAX_JSON_STRING)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, [*loc, k[:64]], MAX_JSON_STRING)
            check_strings(v, [*loc, k])
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_strings(v, [*loc, i])


class _BadNumber(ValueError):
    pass


def _int(text: str) -> int:
    # int() of thousands of digits is refused by Python (a ValueError deep in the parser) and is slow
    # before that; no field needs more than 64 bits, and PostgreSQL's bigint holds no more.
    value = int(text) if len(text) <= 20 else None
    if value is None or not -(2**63) <= value < 2**63:
        raise _BadNumber(f"outside the 64-bit integer range ({text[:24]}{'…' if len(text) > 24 else ''})")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: stored JSON (PostgreSQL jsonb) has no infinity
        raise _BadNumber(f"too large to represent ({text[:24]})")
    return value


def _constant(name: str) -> float:
    raise _BadNumber(f"{name}, which JSON does not allow")


def parse_json(raw: bytes | str, max_depth: int, what: str = "the body", loc: list | None = None) -> Any:
    """``json.loads`` that cannot be made to recurse without bound, and whose strings are all storable."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise Unprocessable(f"{what} is not UTF-8: {exc.reason} at byte {exc.start}", code="invalid_json") from exc
    if (depth := json_depth(text)) > max_depth:
        raise Unprocessable(f"{what} nests {depth} levels deep; at most {max_depth} are accepted "
                            f"(DISTILLERY_MAX_JSON_DEPTH)", code="invalid_json")
    try:
        value = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except json.JSONDecodeError as exc:
        raise Unprocessable(f"{what} is not valid JSON: {exc}", code="invalid_json") from exc
    except _BadNumber as exc:
        raise Unprocessable(f"{what} holds a number {exc}", code="invalid_json") from exc
    except ValueError as exc:  # anything else the parser refuses is the client's error too, never a 500
        raise Unprocessable(f"{what} is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:  # the scan above should make this unreachable; never a 500 regardless
        raise Unprocessable(f"{what} nests too deeply", code="invalid_json") from exc
    check_strings(value, loc if loc is not None else ["body"])
    return value


async def check_form(request: Request, allowed: set[str], lengths: dict[str, int] | None = None) -> None:
    """Unknown fields are refused; every text field is checked for NUL bytes and length."""
    form = await request.form()  # already parsed by FastAPI for the declared fields; cached
    unknown = sorted(set(form.keys()) - allowed)
    if unknown:
        raise Unprocessable(f"unknown form field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}",
                            code="validation_error",
                            errors=[{"loc": ["body", k], "msg": "Extra inputs are not permitted"} for k in unknown])
    for key, value in form.multi_items():
        if isinstance(value, str):
            check_text(value, ["body", key], (lengths or {}).get(key, DEFAULT_FIELD_LENGTH))
