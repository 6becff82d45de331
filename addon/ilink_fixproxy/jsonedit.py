"""Byte-faithful edits of one member of a JSON request body.

The proxy re-issues a request upstream with one field removed (or replaced), and the new body
must differ from the original *only* by that field. A ``json.loads`` / ``json.dumps`` round trip
cannot promise that: it rewrites separators and whitespace, turns ``\\u4e2d`` escapes into raw
characters (or the reverse), respells numbers (``1e5`` -> ``100000.0``, ``1.0E2`` -> ``100.0``)
and, with ``parse_float``/``parse_int`` defaults, can even lose information. A signature, a
content hash or a picky upstream parser would all notice.

So instead we locate the byte span of the member and cut (or splice) just that span. We do not
hand-roll a JSON lexer: the stdlib decoder already knows where every key and value ends
(``json.decoder.scanstring`` for keys, ``JSONDecoder.raw_decode`` for values), so the only
characters stepped over by hand are the structural ones between members (``{ : , }``) and JSON
whitespace. The whole document is validated with ``json.loads`` first, so malformed input gives
``None`` rather than a half-edit. We work on the decoded ``str`` and re-encode as UTF-8, which is
lossless for valid UTF-8, so untouched bytes come back identical.

Each sibling value is skipped with a single ``raw_decode`` call, so an edit costs
O(len(body) * len(path)) in the worst case, linear for the usual short paths.

Duplicate keys follow ``json.loads`` (last occurrence wins): descending follows the last
occurrence, ``replace_value`` replaces the last one, and ``remove_member`` removes every
occurrence at the leaf level so the parsed result equals the parsed original minus that key.
"""

from __future__ import annotations

import json
from json.decoder import scanstring
from typing import Any, NamedTuple

Path = tuple[str, ...]

_WS = " \t\n\r"
_DECODER = json.JSONDecoder()


class _Member(NamedTuple):
    key: str
    start: int  # index of the key's opening quote
    value_start: int
    value_end: int  # one past the value's last character


class _Malformed(Exception):
    """The text does not have the shape we expect (should not happen after json.loads)."""


def parse_path(dotted: str) -> Path:
    """``"msg.context_token"`` -> ``("msg", "context_token")``."""
    if not isinstance(dotted, str) or dotted == "":
        raise ValueError("JSON path must be a non-empty dotted string like 'msg.context_token'")
    parts = tuple(dotted.split("."))
    if any(part == "" for part in parts):
        raise ValueError(f"invalid JSON path {dotted!r}: empty segment (leading, trailing or double dot)")
    return parts


def get_path(doc: Any, path: Path) -> tuple[bool, Any]:
    """Walk parsed JSON through dicts: ``(True, value)`` if present, else ``(False, None)``."""
    node = doc
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def _skip_ws(text: str, idx: int) -> int:
    n = len(text)
    while idx < n and text[idx] in _WS:
        idx += 1
    return idx


def _expect(text: str, idx: int, char: str) -> int:
    """Skip whitespace, require ``char`` and return the index just after it."""
    idx = _skip_ws(text, idx)
    if idx >= len(text) or text[idx] != char:
        raise _Malformed(f"expected {char!r} at {idx}")
    return idx + 1


def _members(text: str, open_idx: int) -> list[_Member]:
    """The members of the object whose ``{`` is at ``open_idx``, in document order."""
    if text[open_idx] != "{":
        raise _Malformed(f"expected '{{' at {open_idx}")
    members: list[_Member] = []
    idx = _skip_ws(text, open_idx + 1)
    if idx < len(text) and text[idx] == "}":
        return members
    while True:
        if idx >= len(text) or text[idx] != '"':
            raise _Malformed(f"expected a key at {idx}")
        start = idx
        key, idx = scanstring(text, idx + 1)
        idx = _skip_ws(text, _expect(text, idx, ":"))
        try:
            _, end = _DECODER.raw_decode(text, idx)
        except json.JSONDecodeError as exc:
            raise _Malformed(str(exc)) from exc
        members.append(_Member(key, start, idx, end))
        idx = _skip_ws(text, end)
        if idx < len(text) and text[idx] == "}":
            return members
        idx = _skip_ws(text, _expect(text, idx, ","))


def _object_at(text: str, keys: Path) -> int | None:
    """Index of the ``{`` of the object reached through ``keys``; ``None`` if a key is missing,
    does not hold an object, or occurs twice in its object.

    Why refuse duplicates: json.loads (and so every decision here) sees the last one, but a
    server may read the first. Editing only the last ``msg`` of ``{"msg":{..token A..},
    "msg":{..}}`` sent a "tokenless" re-issue that still carried token A; an ambiguous body is
    not edited at all."""
    open_idx = _skip_ws(text, 0)
    for key in keys:
        found = [m for m in _members(text, open_idx) if m.key == key]
        if len(found) != 1 or text[found[0].value_start] != "{":
            return None
        open_idx = found[0].value_start
    return open_idx


def _leaf_members(text: str, path: Path) -> list[_Member] | None:
    """Members of the object holding ``path[-1]``; ``None`` if the path does not reach it."""
    open_idx = _object_at(text, path[:-1])
    return None if open_idx is None else _members(text, open_idx)


def _decoded(body: bytes) -> tuple[str, Any] | None:
    """``body`` as text and as parsed JSON, or None if it is not valid UTF-8 JSON."""
    try:
        text = body.decode("utf-8")
        return text, json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def _compact(value: Any) -> str:
    """``value`` as compact JSON in UTF-8 terms: escaped to ASCII only if it holds lone
    surrogates, which UTF-8 cannot carry."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":"))
    return text


def _prepare(body: bytes, path: Path) -> tuple[str, list[_Member]] | None:
    """Decode and validate ``body``; return its text and the members at the leaf level."""
    if not path or (decoded := _decoded(body)) is None:
        return None
    text, doc = decoded
    if not isinstance(doc, dict) or not get_path(doc, path)[0]:
        return None
    try:
        members = _leaf_members(text, path)
    except (_Malformed, ValueError, RecursionError):
        return None
    return None if members is None else (text, members)


def _removal_spans(members: list[_Member], key: str) -> list[tuple[int, int]]:
    """Half-open spans that delete every ``key`` member plus one adjacent comma each."""
    spans: list[tuple[int, int]] = []
    n = len(members)
    i = 0
    while i < n:
        if members[i].key != key:
            i += 1
            continue
        j = i
        while j + 1 < n and members[j + 1].key == key:
            j += 1
        if i > 0:  # eat the comma before the run (and the whitespace around it)
            spans.append((members[i - 1].value_end, members[j].value_end))
        elif j + 1 < n:  # run is first: eat the comma after it, up to the next key
            spans.append((members[0].start, members[j + 1].start))
        else:  # every member goes
            spans.append((members[0].start, members[j].value_end))
        i = j + 1
    return spans


def remove_member(body: bytes, path: Path) -> bytes | None:
    """``body`` with the object member at ``path`` removed and every other byte unchanged.

    ``None`` if ``body`` is not UTF-8 JSON with an object at the top level, the path is absent,
    or an intermediate value is not an object.
    """
    prepared = _prepare(body, path)
    if prepared is None:
        return None
    text, members = prepared
    spans = _removal_spans(members, path[-1])
    if not spans:
        return None
    pieces: list[str] = []
    pos = 0
    for start, end in spans:
        pieces.append(text[pos:start])
        pos = end
    pieces.append(text[pos:])
    return "".join(pieces).encode("utf-8")


def replace_value(body: bytes, path: Path, new_value: Any) -> bytes | None:
    """``body`` with the value at ``path`` replaced by compact JSON.

    The new value is ``json.dumps(new_value, ensure_ascii=False, separators=(",", ":"))``
    (ASCII-escaped only if it holds lone surrogates, which UTF-8 cannot carry). ``None`` on the
    same conditions as :func:`remove_member`; non-serialisable values raise ``TypeError``.
    """
    prepared = _prepare(body, path)
    if prepared is None:
        return None
    text, members = prepared
    found = [m for m in members if m.key == path[-1]]
    if len(found) != 1:  # a duplicate key: replacing one would leave the other (see _object_at)
        return None
    last = found[0]
    return (text[: last.value_start] + _compact(new_value) + text[last.value_end :]).encode("utf-8")


def set_value(body: bytes, path: Path, new_value: Any) -> bytes | None:
    """``body`` with ``path`` set to compact JSON ``new_value``, every other byte unchanged.

    Replaces the value when the member exists (see :func:`replace_value`); otherwise inserts
    ``"key":value`` as the first member of the parent object, which must exist and be an object.
    ``None`` if ``body`` is not a UTF-8 JSON object or the parent path does not reach an object.
    """
    if not path:
        return None
    replaced = replace_value(body, path, new_value)
    if replaced is not None:
        return replaced
    if (decoded := _decoded(body)) is None:
        return None
    text, doc = decoded
    present, parent = get_path(doc, path[:-1])
    if not isinstance(doc, dict) or not present or not isinstance(parent, dict) or path[-1] in parent:
        return None  # (the key is there but could not be replaced: duplicated, see _object_at)
    try:
        open_idx = _object_at(text, path[:-1])
        if open_idx is None:
            return None
        has_members = bool(_members(text, open_idx))
    except (_Malformed, ValueError, RecursionError):
        return None
    member = (
        json.dumps(path[-1], ensure_ascii=False) + ":" + _compact(new_value) + ("," if has_members else "")
    )
    return (text[: open_idx + 1] + member + text[open_idx + 1 :]).encode("utf-8")


def _array_elements(text: str, open_idx: int) -> list[tuple[int, int]]:
    """(start, end) of each element of the array whose ``[`` is at ``open_idx``."""
    if text[open_idx] != "[":
        raise _Malformed(f"expected '[' at {open_idx}")
    spans: list[tuple[int, int]] = []
    idx = _skip_ws(text, open_idx + 1)
    if idx < len(text) and text[idx] == "]":
        return spans
    while True:
        try:
            _, end = _DECODER.raw_decode(text, idx)
        except json.JSONDecodeError as exc:
            raise _Malformed(str(exc)) from exc
        spans.append((idx, end))
        idx = _skip_ws(text, end)
        if idx < len(text) and text[idx] == "]":
            return spans
        idx = _skip_ws(text, _expect(text, idx, ","))


def _unique_member(text: str, open_idx: int, key: str, opener: str | None) -> _Member | None:
    found = [m for m in _members(text, open_idx) if m.key == key]
    if len(found) != 1 or (opener is not None and text[found[0].value_start] != opener):
        return None
    return found[0]


def append_line(body: bytes, items: Path, line: str) -> bytes | None:
    """``body`` with ``line`` appended, after a newline, to the text of the last text item of the
    array at ``items`` (an element ``{"text_item": {"text": "..."}}``, the shape of
    sendmessage's ``msg.item_list``); every other byte unchanged (big integers included).

    ``None`` if there is no such text item, the body is not a UTF-8 JSON object, or a key on
    the way is duplicated (which one a server reads is unknown: see _object_at)."""
    if not items or (decoded := _decoded(body)) is None:
        return None
    text, doc = decoded
    present, array = get_path(doc, items)
    if not isinstance(doc, dict) or not present or not isinstance(array, list):
        return None
    last = None
    for i, item in enumerate(array):
        ti = item.get("text_item") if isinstance(item, dict) else None
        if isinstance(ti, dict) and isinstance(ti.get("text"), str):
            last = i
    if last is None:
        return None
    try:
        parent = _object_at(text, items[:-1])
        if parent is None or (member := _unique_member(text, parent, items[-1], "[")) is None:
            return None
        start, _ = _array_elements(text, member.value_start)[last]
        if text[start] != "{" or (ti_member := _unique_member(text, start, "text_item", "{")) is None:
            return None
        if (t := _unique_member(text, ti_member.value_start, "text", '"')) is None:
            return None
    except (_Malformed, ValueError, RecursionError, IndexError):
        return None
    old = array[last]["text_item"]["text"]
    new = _compact(f"{old}\n{line}" if old else line)
    return (text[: t.value_start] + new + text[t.value_end :]).encode("utf-8")
