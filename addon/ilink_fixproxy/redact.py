"""Keep secrets out of logs, headers and flow comments.

Bot tokens and context tokens are bearer secrets: anyone holding one can send as the bot. We
only ever show a short one-way hash, enough to tell two tokens apart in a log.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_LABEL = b"ilink-fixproxy/v1:"


def token_hash(token: object) -> str:
    """A short, stable, one-way tag for a secret, e.g. ``#3fa2c91b07``; "-" when there is none."""
    if token is None or token == "":
        return "-"
    return "#" + hashlib.sha256(_LABEL + str(token).encode("utf-8", "replace")).hexdigest()[:10]


# --------------------------------------------------------------------------- capture redaction
#
# What may be written to capture files (journal, flow files, HAR) and logs. The rule is simple:
# every value that grants access (bot token, context token, typing ticket, media keys and the
# signed CDN parameters, QR login codes) is replaced by its token_hash, so two captures can still
# be compared ("the same token was sent again") but nothing in them can be replayed.

# Body keys (compared case-insensitively) whose values are secrets (ilink-protocol.md §2).
SECRET_KEYS = frozenset(
    {
        "authorization",
        "context_token",
        "typing_ticket",
        "bot_token",
        "local_token_list",
        "aes_key",
        "aeskey",
        "encrypt_query_param",
        "encrypted_query_param",
        "upload_param",
        "thumb_upload_param",
        "upload_full_url",
        "full_url",
        "qrcode",
        "qrcode_img_content",
    }
)
# Suffixes that catch the variants iLink adds over time (thumb_aes_key, *_full_url, ...).
_SECRET_SUFFIXES = ("_token", "aes_key", "aeskey", "_query_param", "upload_param", "full_url")
# Headers whose values are credentials, or media parameters (the CDN's x-encrypted-param).
SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-encrypted-param"}
)
# Keys naming a WeChat user, bot or group: hashed unless the operator asks for ids in clear.
_ID_SUFFIXES = ("user_id", "bot_id", "group_id")
# Where message content lives: each message's item_list (text, voice transcripts, media refs).
_CONTENT_KEYS = frozenset({"item_list"})
_TEXT_KEYS = frozenset({"text"})
OMITTED = "<omitted>"

_HASH_RE = re.compile(r"^#[0-9a-f]{10}$")


def is_secret_key(name: str) -> bool:
    low = name.lower()
    return low in SECRET_KEYS or low.endswith(_SECRET_SUFFIXES)


def is_id_key(name: str) -> bool:
    return name.lower().endswith(_ID_SUFFIXES)


def redact_value(value: Any) -> Any:
    """A secret's stand-in: its token_hash (lists element-wise); already-redacted values are kept,
    so redacting twice changes nothing."""
    if value is None or value == "":
        return value
    if isinstance(value, list):
        return [redact_value(v) for v in value]
    if isinstance(value, str):
        return value if _HASH_RE.match(value) else token_hash(value)
    return token_hash(json.dumps(value, sort_keys=True))


def id_value(value: Any, ids: bool) -> Any:
    """A user/bot/group id as captured: in clear with ids=True, else hashed like a secret."""
    if ids or not isinstance(value, str):
        return value
    return redact_value(value)


def redact_json(doc: Any, *, bodies: bool = False, ids: bool = False) -> Any:
    """A copy of a parsed JSON body safe to store: secrets hashed, ids hashed unless `ids`, and
    unless `bodies`, message content (each item_list entry's payload, any "text") omitted."""
    if isinstance(doc, list):
        return [redact_json(v, bodies=bodies, ids=ids) for v in doc]
    if not isinstance(doc, dict):
        return doc
    out: dict[str, Any] = {}
    for key, value in doc.items():
        k = str(key)
        if is_secret_key(k):
            out[k] = redact_value(value)
        elif is_id_key(k):
            out[k] = id_value(value, ids)
        elif not bodies and k.lower() in _CONTENT_KEYS and isinstance(value, list):
            out[k] = [_item_outline(item) for item in value]
        elif not bodies and k.lower() in _TEXT_KEYS and isinstance(value, str):
            out[k] = OMITTED
        else:
            out[k] = redact_json(value, bodies=bodies, ids=ids)
    return out


def _item_outline(item: Any) -> Any:
    """An item_list entry without its content: its type and which payload it carried."""
    if not isinstance(item, dict):
        return OMITTED
    return {k: (v if k == "type" and isinstance(v, int) else OMITTED) for k, v in item.items()}


# A header name as RFC 9110 allows it (a "token"). mitmproxy accepts more: "Authorization Bearer:
# x" has the name "Authorization Bearer", and a line without a colon that starts with a space is
# folded into the previous header's value (obs-fold), so "X-A: b\r\n Authorization Bearer <token>"
# puts the token inside X-A's value. Both carried bot tokens in clear into captures.
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Names that suggest a credential, beyond SECRET_HEADERS: their values are hashed whatever their
# shape. AuthorizationType ("ilink_bot_token") names the scheme, not a secret.
_CREDENTIAL_NAME_RE = re.compile(r"(?i)auth|token|secret|passw|cookie|session|credential|signature|api-?key")
_NOT_SECRET_HEADERS = frozenset({"authorizationtype"})


def redact_header(name: str, value: str) -> str:
    return redact_field(name, value)[1]


def redact_field(name: str, value: str) -> tuple[str, str]:
    """A header (name, value) as it may be stored: credentials hashed, and a malformed line (odd
    name, folded value) hashed whole, since what it carries cannot be told."""
    if not _HEADER_NAME_RE.match(name):
        return redact_text(name), str(redact_value(value))
    if "\n" in value or "\r" in value:
        return name, str(redact_value(value))
    low = name.lower()
    if low in SECRET_HEADERS or (_CREDENTIAL_NAME_RE.search(low) and low not in _NOT_SECRET_HEADERS):
        scheme, sep, rest = value.partition(" ")
        if sep and scheme.lower() in _SCHEMES:
            return name, f"{scheme} {redact_value(rest.strip())}"
        return name, str(redact_value(value))
    # any other header: a credential scheme in it is still a credential
    return name, _BEARER_RE.sub(lambda m: f"{m.group(1)} {redact_value(m.group(2))}", value)


def redact_headers(fields: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [redact_field(k, v) for k, v in fields]


def redact_url(url: str) -> str:
    """The URL with secret query parameters hashed (CDN encrypted_query_param, QR codes, ...)."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if not any(is_secret_key(k) for k, _ in pairs):
        return url
    query = urlencode([(k, redact_value(v) if is_secret_key(k) else v) for k, v in pairs])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


# Free text (log lines): bearer credentials, and key/value pairs whatever their quoting (JSON,
# Python repr, key=value query parameters, "key: value"). A value ends at a quote, a delimiter or the
# end of the text, so a body cut short inside a token is still scrubbed.
_BEARER_RE = re.compile(r"(?i)\b(bearer|basic)\s+([^\s\"',;]+)")
_PAIR_RE = re.compile(r"""(?i)(["']?)([a-z_]+)\1(\s*[:=]\s*)(["']?)([^"'\s&,;}\]]*)""")
# Any mention of a secret-bearing key, for text that cannot be redacted structurally.
_SECRET_MENTION_RE = re.compile(r"(?i)token|ticket|aes_?key|query_param|upload_param|full_url|qrcode")


_SCHEMES = frozenset({"bearer", "basic", "token"})  # "Authorization: Bearer …": _BEARER_RE's part


def _pair(m: re.Match[str]) -> str:
    q, key, sep, vq, value = m.groups()
    secret = value and is_secret_key(key) and value.lower() not in _SCHEMES
    return f"{q}{key}{q}{sep}{vq}{redact_value(value) if secret else value}"


def redact_text(text: str) -> str:
    """Scrub secrets from a free-text line (a safety net: our own messages only ever hold hashes)."""
    text = _BEARER_RE.sub(lambda m: f"{m.group(1)} {redact_value(m.group(2))}", text)
    return _PAIR_RE.sub(_pair, text)


def safe_text_body(text: str) -> str | None:
    """A non-JSON body as it may be stored (scrubbed), or None when it mentions a secret-bearing
    key: without JSON structure (e.g. a body cut short) a secret could hide in ways no pattern
    catches (a list of tokens, odd quoting), so such a body is not kept at all."""
    if _SECRET_MENTION_RE.search(text):
        return None
    return redact_text(text)


_KNOWN_MIN_LEN = 4  # shorter values ("1", "ok") are too common to stand for themselves in a text


def known_values(doc: Any, headers: Iterable[tuple[str, str]] = ()) -> set[str]:
    """Every string in a parsed request body (tokens, ids, message text) and every credential in its
    headers: what must not appear in a line about that request (see redact_known)."""
    found: set[str] = set()
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and len(item) >= _KNOWN_MIN_LEN:
            found.add(item)
    for name, value in headers:
        if name.lower() in SECRET_HEADERS:
            found.add(value)
            found.add(value.partition(" ")[2])
    return {v for v in found if len(v) >= _KNOWN_MIN_LEN}


def redact_known(text: str, values: Iterable[str]) -> str:
    """`text` with each of `values` replaced by its token_hash (longest first, so a value that
    contains another is replaced whole): for free text that may quote a request, such as an
    exception's message, where no key tells a secret apart."""
    for value in sorted(values, key=len, reverse=True):
        if value in text:
            text = text.replace(value, token_hash(value))
    return text
