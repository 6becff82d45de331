"""Tests for ilink_fixproxy.jsonedit: byte-faithful removal/replacement of one JSON member."""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ilink_fixproxy.jsonedit import append_line, get_path, parse_path, remove_member, replace_value

WS = " \t\n\r"


# --------------------------------------------------------------------------- parse_path / get_path


def test_parse_path_simple() -> None:
    assert parse_path("msg.context_token") == ("msg", "context_token")
    assert parse_path("context_token") == ("context_token",)


@pytest.mark.parametrize("bad", ["", ".a", "a.", "a..b", ".", ".."])
def test_parse_path_rejects_empty_segments(bad: str) -> None:
    with pytest.raises(ValueError, match="path"):
        parse_path(bad)


def test_get_path() -> None:
    doc = {"msg": {"context_token": "t", "n": None}, "x": [1, {"y": 2}], "s": "str"}
    assert get_path(doc, ("msg", "context_token")) == (True, "t")
    assert get_path(doc, ("msg", "n")) == (True, None)
    assert get_path(doc, ("msg",)) == (True, {"context_token": "t", "n": None})
    assert get_path(doc, ("msg", "missing")) == (False, None)
    assert get_path(doc, ("x", "y")) == (False, None)  # lists are not walked
    assert get_path(doc, ("s", "y")) == (False, None)
    assert get_path(doc, ("missing", "y")) == (False, None)
    assert get_path([1], ("a",)) == (False, None)
    assert get_path(doc, ()) == (True, doc)


# --------------------------------------------------------------------------- remove_member examples


@pytest.mark.parametrize(
    ("body", "path", "expected"),
    [
        (b'{"a":1,"b":2}', ("b",), b'{"a":1}'),
        (b'{"b":2, "a":1}', ("b",), b'{"a":1}'),
        (b'{"b":2}', ("b",), b"{}"),
        (b'{ "b" : 2 }', ("b",), b"{  }"),
        (b'{"a":1,"b":2,"c":3}', ("b",), b'{"a":1,"c":3}'),
        (b'{"a":1 , "b":2 , "c":3}', ("b",), b'{"a":1 , "c":3}'),
        (b'{"a":1 , "b":2 , "c":3}', ("a",), b'{"b":2 , "c":3}'),
        (b'{"a":1 , "b":2 , "c":3}', ("c",), b'{"a":1 , "b":2}'),
        (b'  {"a":1,"b":2}\n', ("a",), b'  {"b":2}\n'),
    ],
)
def test_remove_member_positions(body: bytes, path: tuple[str, ...], expected: bytes) -> None:
    assert remove_member(body, path) == expected


def test_remove_nested() -> None:
    body = b'{"msg":{"to":"u1","context_token":"abc","items":[1,2]},"base":{"v":"1.0"}}'
    assert remove_member(body, ("msg", "context_token")) == (
        b'{"msg":{"to":"u1","items":[1,2]},"base":{"v":"1.0"}}'
    )
    assert remove_member(body, ("msg",)) == b'{"base":{"v":"1.0"}}'


def test_remove_indent2() -> None:
    doc = {"msg": {"to": "u1", "context_token": "abc", "n": 1}, "base": {"v": 1}}
    body = json.dumps(doc, indent=2).encode()
    want = copy.deepcopy(doc)
    del want["msg"]["context_token"]
    assert remove_member(body, ("msg", "context_token")) == json.dumps(want, indent=2).encode()
    want2 = copy.deepcopy(doc)
    del want2["msg"]
    assert remove_member(body, ("msg",)) == json.dumps(want2, indent=2).encode()
    want3 = copy.deepcopy(doc)
    del want3["base"]
    assert remove_member(body, ("base",)) == json.dumps(want3, indent=2).encode()


def test_remove_tabs_and_crlf() -> None:
    body = b'{\r\n\t"a" :\t1 ,\r\n\t"b" : [ 1 , 2 ] ,\r\n\t"c" : { }\r\n}'
    assert remove_member(body, ("b",)) == b'{\r\n\t"a" :\t1 ,\r\n\t"c" : { }\r\n}'
    assert remove_member(body, ("a",)) == b'{\r\n\t"b" : [ 1 , 2 ] ,\r\n\t"c" : { }\r\n}'
    assert remove_member(body, ("c",)) == b'{\r\n\t"a" :\t1 ,\r\n\t"b" : [ 1 , 2 ]\r\n}'


def test_unicode_escapes_and_raw_utf8_kept() -> None:
    body = '{"text":"\\u4e2d\\u6587 raw 中文 \\ud83d\\ude00 😀","context_token":"x","k\\u00e9":"é"}'
    raw = body.encode("utf-8")
    out = remove_member(raw, ("context_token",))
    assert out == ('{"text":"\\u4e2d\\u6587 raw 中文 \\ud83d\\ude00 😀","k\\u00e9":"é"}'.encode())
    # a key spelled with escapes is matched by its decoded value
    assert remove_member(raw, ("ké",)) == (
        '{"text":"\\u4e2d\\u6587 raw 中文 \\ud83d\\ude00 😀","context_token":"x"}'.encode()
    )


def test_number_spellings_kept() -> None:
    body = b'{"a":1e5,"b":1.0,"id":7489534892789344264,"c":-0,"d":1E+2,"e":0.10,"drop":true}'
    assert remove_member(body, ("drop",)) == (
        b'{"a":1e5,"b":1.0,"id":7489534892789344264,"c":-0,"d":1E+2,"e":0.10}'
    )
    assert remove_member(body, ("b",)) == (
        b'{"a":1e5,"id":7489534892789344264,"c":-0,"d":1E+2,"e":0.10,"drop":true}'
    )


def test_structural_characters_inside_strings() -> None:
    body = b'{"a":"}, \\"b\\": {","b":"x:y,z}","c":"{\\"b\\":1}"}'
    assert remove_member(body, ("b",)) == b'{"a":"}, \\"b\\": {","c":"{\\"b\\":1}"}'


def test_null_value_is_present() -> None:
    assert remove_member(b'{"a":null,"b":0}', ("a",)) == b'{"b":0}'


def test_duplicate_keys_leaf_all_removed() -> None:
    body = b'{"a":1,"b":2,"a":3,"c":4,"a":5}'
    out = remove_member(body, ("a",))
    assert out == b'{"b":2,"c":4}'
    assert remove_member(b'{"a":1,"a":2,"b":3}', ("a",)) == b'{"b":3}'
    assert remove_member(b'{"a":1,"a":2}', ("a",)) == b"{}"
    assert remove_member(b'{"b":0, "a":1, "a":2}', ("a",)) == b'{"b":0}'


def test_a_duplicate_key_on_the_path_is_not_edited() -> None:
    """Issue 13 item 9: json.loads reads the last "msg", a server may read the first; editing
    only the last one sent a "tokenless" re-issue that still carried the first one's token."""
    body = b'{"m":{"t":1,"u":2},"x":0,"m":{"t":3,"u":4}}'
    assert remove_member(body, ("m", "t")) is None
    assert replace_value(body, ("m", "t"), 9) is None
    assert remove_member(b'{"m":{"v":1},"m":{"t":3}}', ("m", "v")) is None
    assert remove_member(b'{"m":{"t":1},"m":5}', ("m", "t")) is None
    # a duplicated leaf: removing takes every copy, replacing one of them is refused
    assert remove_member(b'{"m":{"t":1,"t":2,"u":3}}', ("m", "t")) == b'{"m":{"u":3}}'
    assert replace_value(b'{"m":{"t":1,"t":2}}', ("m", "t"), 9) is None
    from ilink_fixproxy.jsonedit import set_value

    assert set_value(b'{"m":{"t":1,"t":2}}', ("m", "t"), 9) is None


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (b'{"a":1}', ("b",)),
        (b'{"a":{"b":1}}', ("a", "c")),
        (b'{"a":{"b":1}}', ("x", "b")),
        (b'{"a":1}', ()),
        (b"[1,2]", ("a",)),
        (b'"a"', ("a",)),
        (b"1", ("a",)),
        (b"null", ("a",)),
        (b'{"a":[{"b":1}]}', ("a", "b")),  # intermediate is a list
        (b'{"a":"str"}', ("a", "b")),
        (b'{"a":null}', ("a", "b")),
        (b'{"a":1,}', ("a",)),  # invalid JSON
        (b'{"a":1', ("a",)),
        (b'{"a":1} x', ("a",)),
        (b"{'a':1}", ("a",)),
        (b'{"a":1}{"b":2}', ("a",)),
        (b'\xef\xbb\xbf{"a":1}', ("a",)),  # UTF-8 BOM
        (b'{"a":"\xff"}', ("a",)),  # invalid UTF-8
        (b'{"a":"\xed\xa0\x80"}', ("a",)),  # UTF-8-encoded surrogate
        (b"", ("a",)),
        (b"   ", ("a",)),
    ],
)
def test_none_cases(body: bytes, path: tuple[str, ...]) -> None:
    assert remove_member(body, path) is None
    assert replace_value(body, path, "x") is None


def test_deep_nesting() -> None:
    depth = 60
    path = tuple(f"k{i}" for i in range(depth))
    opens = ['{"z":0,' + json.dumps(k) + ":" for k in path]
    body = "".join(opens) + '{"t":1}' + "}" * depth
    out = remove_member(body.encode(), path)
    want = "".join(opens[:-1]) + '{"z":0}' + "}" * (depth - 1)
    assert out == want.encode()


def test_very_deep_body_is_none_not_crash() -> None:
    body = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert remove_member(body, ("a",)) is None


def test_linear_time_on_many_siblings() -> None:
    members = [f'"k{i}":{{"v":[{i},"{"x" * 20}",{i}.5e3]}}' for i in range(20_000)]
    body = ("{" + ",".join(members) + "}").encode()  # ~800 KB
    start = time.perf_counter()
    out = remove_member(body, ("k19999", "v"))
    replaced = replace_value(body, ("k0", "v"), None)
    elapsed = time.perf_counter() - start
    assert out is not None and out.endswith(b'"k19999":{}}')
    assert replaced is not None and replaced.startswith(b'{"k0":{"v":null},"k1":')
    assert elapsed < 2.0


# --------------------------------------------------------------------------- replace_value examples


def test_replace_value_examples() -> None:
    body = b'{ "a" : 1e5 , "msg" : { "context_token" : "old" , "n" : 1.0 } }'
    assert replace_value(body, ("msg", "context_token"), "new") == (
        b'{ "a" : 1e5 , "msg" : { "context_token" : "new" , "n" : 1.0 } }'
    )
    assert replace_value(body, ("msg",), {"x": [1, "中"]}) == (
        '{ "a" : 1e5 , "msg" : {"x":[1,"中"]} }'.encode()
    )
    assert replace_value(body, ("a",), None) == (
        b'{ "a" : null , "msg" : { "context_token" : "old" , "n" : 1.0 } }'
    )
    # duplicates: only the last occurrence (the one json.loads sees) is replaced
    assert replace_value(b'{"a":1,"a":2}', ("a",), 3) is None  # which one would the server read?
    # lone surrogates cannot be carried by UTF-8 and are escaped instead
    out = replace_value(b'{"a":1}', ("a",), "\ud800")
    assert out == b'{"a":"\\ud800"}'
    assert json.loads(out) == {"a": "\ud800"}


def test_replace_value_unserialisable_raises() -> None:
    with pytest.raises(TypeError):
        replace_value(b'{"a":1}', ("a",), object())


# --------------------------------------------------------------------------- property tests

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=16,
)
objects = st.dictionaries(st.text(max_size=5), json_values, min_size=1, max_size=6)
dump_kwargs = st.fixed_dictionaries(
    {
        "separators": st.sampled_from([(",", ":"), (", ", ": "), (",", ": "), (" ,\t", " :\n")]),
        "ensure_ascii": st.booleans(),
        "indent": st.sampled_from([None, 0, 2, "\t", "\r\n "]),
    }
)


def all_paths(doc: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for key, value in doc.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths.extend(all_paths(value, (*prefix, key)))
    return paths


def parent_of(doc: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node = doc
    for key in path[:-1]:
        node = node[key]
    return node


def common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def common_suffix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[-1 - i] == b[-1 - i]:
        i += 1
    return i


def single_span_deletions(body: bytes, result: bytes) -> list[bytes]:
    """Every ``d`` such that ``body == result[:i] + d + result[i:]`` for some ``i``."""
    assert len(result) < len(body)
    p = common_prefix(body, result)
    s = common_suffix(body, result)
    cut = len(body) - len(result)
    return [body[i : i + cut] for i in range(max(0, len(result) - s), p + 1)]


def is_member_with_one_comma(deleted: bytes, key: str, value: Any, only: bool) -> bool:
    try:
        text = deleted.decode("utf-8").strip(WS)
    except UnicodeDecodeError:
        return False
    if only:
        inner = text
    elif text.startswith(","):
        inner = text[1:]
    elif text.endswith(","):
        inner = text[:-1]
    else:
        return False
    try:
        pairs = json.loads("{" + inner + "}", object_pairs_hook=list)
    except ValueError:
        return False
    return pairs == json.loads(json.dumps({key: value}), object_pairs_hook=list)


@settings(max_examples=200, deadline=None)
@given(doc=objects, kwargs=dump_kwargs, data=st.data())
def test_remove_member_property(doc: dict[str, Any], kwargs: dict[str, Any], data: Any) -> None:
    body = json.dumps(doc, **kwargs).encode("utf-8")
    path = data.draw(st.sampled_from(all_paths(doc)), label="path")
    result = remove_member(body, path)
    assert result is not None

    expected = copy.deepcopy(doc)
    parent = parent_of(expected, path)
    value = parent.pop(path[-1])
    assert json.loads(result) == expected
    # key order is kept too
    assert list(json.loads(result, object_pairs_hook=list)) == list(
        json.loads(json.dumps(expected), object_pairs_hook=list)
    )
    # the result is the body with exactly one contiguous span cut out, and that span is the
    # member itself plus one comma (unless it was the only member) and surrounding whitespace
    candidates = single_span_deletions(body, result)
    assert candidates
    only = not parent
    assert any(is_member_with_one_comma(d, path[-1], value, only) for d in candidates)


@settings(max_examples=200, deadline=None)
@given(doc=objects, kwargs=dump_kwargs, new_value=json_values, data=st.data())
def test_replace_value_property(
    doc: dict[str, Any], kwargs: dict[str, Any], new_value: Any, data: Any
) -> None:
    body = json.dumps(doc, **kwargs).encode("utf-8")
    path = data.draw(st.sampled_from(all_paths(doc)), label="path")
    result = replace_value(body, path, new_value)
    assert result is not None

    expected = copy.deepcopy(doc)
    parent = parent_of(expected, path)
    old_value = parent[path[-1]]
    parent[path[-1]] = new_value
    assert json.loads(result) == expected

    new = json.dumps(new_value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    p = common_prefix(body, result)
    s = common_suffix(body, result)
    found = False
    for i in range(p + 1):
        tail = len(result) - i - len(new)
        if tail < 0 or tail > s or result[i : i + len(new)] != new:
            continue
        old = body[i : len(body) - tail]
        try:
            if json.loads(old) == old_value:
                found = True
                break
        except ValueError:
            continue
    assert found


@settings(max_examples=200, deadline=None)
@given(doc=objects, kwargs=dump_kwargs, extra=st.text(max_size=5), data=st.data())
def test_absent_paths_give_none(doc: dict[str, Any], kwargs: dict[str, Any], extra: str, data: Any) -> None:
    body = json.dumps(doc, **kwargs).encode("utf-8")
    prefix = data.draw(st.sampled_from([(), *all_paths(doc)]), label="prefix")
    found, node = get_path(doc, prefix)
    assert found
    if isinstance(node, dict):
        key = extra
        while key in node:
            key += "_"
        path = (*prefix, key)
    else:
        path = (*prefix, extra)  # descending through a non-object
    assert remove_member(body, path) is None
    assert replace_value(body, path, 1) is None


raw_values = json_values.map(json.dumps) | st.sampled_from(
    ["1e5", "1.0", "-0", "7489534892789344264", "1E+2", "0.10", '"\\u4e2d"', '"中"', "[ ]", "{ }"]
)
layouts = st.sampled_from(
    [
        ("{", ",", ":", "}"),
        ("{ ", ", ", ": ", " }"),
        ("{\n  ", ",\n  ", ": ", "\n}"),
        ("{\r\n\t", " ,\r\n\t", " : ", "\r\n}"),
    ]
)


def build(pairs: list[tuple[str, str]], layout: tuple[str, str, str, str]) -> bytes:
    open_, sep, colon, close = layout
    return (open_ + sep.join(json.dumps(k) + colon + v for k, v in pairs) + close).encode()


@settings(max_examples=200, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.sampled_from("abcd"), raw_values), min_size=1, max_size=8),
    layout=layouts,
    new_value=json_values,
    data=st.data(),
)
def test_duplicates_and_raw_spellings_property(
    pairs: list[tuple[str, str]],
    layout: tuple[str, str, str, str],
    new_value: Any,
    data: Any,
) -> None:
    body = build(pairs, layout)
    key = data.draw(st.sampled_from([k for k, _ in pairs]), label="key")

    # removal: exactly as if the document had been written without that key
    removed = remove_member(body, (key,))
    assert removed == build([(k, v) for k, v in pairs if k != key], layout)
    expected = json.loads(body)
    del expected[key]
    assert json.loads(removed) == expected

    # replacement: the one occurrence changes, spelled compactly; with duplicates, nothing does
    found = [i for i, (k, _) in enumerate(pairs) if k == key]
    if len(found) > 1:
        assert replace_value(body, (key,), new_value) is None
        return
    new = json.dumps(new_value, ensure_ascii=False, separators=(",", ":"))
    replaced = [(k, new if i == found[0] else v) for i, (k, v) in enumerate(pairs)]
    assert replace_value(body, (key,), new_value) == build(replaced, layout)


def test_set_value_replaces_or_inserts_keeping_every_other_byte():
    from ilink_fixproxy.jsonedit import set_value

    assert set_value(b'{"msg": {"a": 1}}', ("msg", "t"), "x") == b'{"msg": {"t":"x","a": 1}}'
    assert set_value(b'{"msg": { }}', ("msg", "t"), "x") == b'{"msg": {"t":"x" }}'
    assert (
        set_value(b'{"msg": {"t": "old", "a": 1}}', ("msg", "t"), "new") == b'{"msg": {"t": "new", "a": 1}}'
    )
    assert set_value(b'{"msg": 1}', ("msg", "t"), "x") is None
    assert set_value(b'{"other": {}}', ("msg", "t"), "x") is None
    assert set_value(b"[1]", ("t",), "x") is None
    assert json.loads(set_value(b'{"a":1}', ("t",), "\u4f60")) == {"t": "\u4f60", "a": 1}


def test_append_line_edits_only_the_last_text_item_and_keeps_every_other_byte():
    body = (
        b'{"msg": {"client_id": 7489534892789345001, "item_list": [{"type": 1, "text_item": {"text": '
        b'"first"}}, {"type": 1, "text_item": {"text": "\\u62a5\\u544a"}}, {"type": 2, "image_item": {}}]},'
        b' "n": 1.0E2}'
    )
    out = append_line(body, ("msg", "item_list"), "回复任意内容")
    assert out is not None
    doc = json.loads(out)
    assert doc["msg"]["item_list"][1]["text_item"]["text"] == "报告\n回复任意内容"
    assert doc["msg"]["item_list"][0]["text_item"]["text"] == "first"
    # only the edited string changed: the big integer, 1.0E2 and the first item are as they were
    assert out.startswith(b'{"msg": {"client_id": 7489534892789345001, "item_list": [{"type": 1, "text_item"')
    assert out.endswith(b', {"type": 2, "image_item": {}}]}, "n": 1.0E2}')
    no_text = b'{"msg": {"item_list": [{"type": 2, "image_item": {}}]}}'
    assert append_line(no_text, ("msg", "item_list"), "x") is None
    assert append_line(b'{"msg": {}}', ("msg", "item_list"), "x") is None
    duplicated = b'{"msg": {"item_list": [{"text_item": {"text": "a", "text": "b"}}]}}'
    assert append_line(duplicated, ("msg", "item_list"), "x") is None
    assert append_line(b"\xef\xbb\xbf{}", ("msg", "item_list"), "x") is None
