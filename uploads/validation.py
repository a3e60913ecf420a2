"""Strict parsing of what clients send: numbers in headers, Content-Range, checksums, file names.

One parser for every front end (RELIABILITY.md §6.8). Python's int() accepts '٣', '５', '1_000',
' 5 ' and '+5' (RELIABILITY.md X7), so numbers are matched against ASCII digits first.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass

from .exceptions import InvalidRequest

# 19 digits still fit a signed 64-bit column; more cannot be a real size.
_DIGITS = re.compile(r"[0-9]{1,19}\Z", re.ASCII)
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19})\Z", re.ASCII)
_CHECKSUM = re.compile(r"sha256:([0-9a-fA-F]{64})\Z", re.ASCII)
BIGINT_MAX = 2**63 - 1
FILENAME_MAX_BYTES = 255

# Characters that change how a name displays without being visible: bidi overrides (the
# "gpj.exe" trick), zero-width characters, and controls (CR/LF would also split headers).
_INVISIBLE_CATEGORIES = {"Cc", "Cf", "Zl", "Zp"}


def parse_non_negative_int(value: str | None, name: str) -> int:
    """A header or JSON number: ASCII digits only, at most 19 of them, fitting in a bigint."""
    if value is None or not _DIGITS.match(value) or int(value) > BIGINT_MAX:
        raise InvalidRequest(f"{name} must be a non-negative integer written in ASCII digits.")
    return int(value)


@dataclass(frozen=True)
class ContentRange:
    start: int
    end: int  # inclusive, as in HTTP
    total: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def parse_content_range(value: str | None) -> ContentRange:
    if not value:
        raise InvalidRequest("Content-Range is required, e.g. 'bytes 0-1048575/4194304'.")
    match = _CONTENT_RANGE.match(value)
    if not match:
        raise InvalidRequest(
            "Content-Range must look like 'bytes START-END/SIZE' with ASCII digits "
            "(END is inclusive)."
        )
    start, end, total = (int(group) for group in match.groups())
    if max(start, end, total) > BIGINT_MAX:
        raise InvalidRequest("Content-Range numbers are too large.")
    if end < start:
        raise InvalidRequest("Content-Range END must not be smaller than START.")
    if end >= total:
        raise InvalidRequest("Content-Range END must be smaller than SIZE (END is inclusive).")
    return ContentRange(start=start, end=end, total=total)


def parse_checksum(value: str | None) -> str:
    """`sha256:<64 hex>` (normalised to lower case), or "" for none."""
    if value is None or value == "":
        return ""
    match = _CHECKSUM.match(value) if isinstance(value, str) else None
    if not match:
        raise InvalidRequest("checksum must be 'sha256:' followed by 64 hexadecimal digits.")
    return f"sha256:{match.group(1).lower()}"


def clean_filename(value: object) -> str:
    """The display name: NFC, no path, no invisible characters, at most 255 UTF-8 bytes.

    The name is only ever shown and offered as the download name; files on disk get generated
    names, so this guards people and headers, not the file system.
    """
    if not isinstance(value, str):
        raise InvalidRequest("filename must be a string.")
    if "\x00" in value:
        raise InvalidRequest("filename must not contain NUL characters.")
    name = unicodedata.normalize("NFC", value)
    if any(unicodedata.category(char) in _INVISIBLE_CATEGORIES for char in name):
        raise InvalidRequest("filename must not contain control or invisible formatting characters.")
    # Browsers send a bare name, but scripts send paths from either OS: keep the last component.
    name = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if name in {"", ".", ".."}:
        raise InvalidRequest("filename must name a file, not be empty or a directory.")
    return _truncate_utf8(name, FILENAME_MAX_BYTES)


def _truncate_utf8(name: str, limit: int) -> str:
    """Cut a name to `limit` UTF-8 bytes, keeping its extension and never splitting a character."""
    if len(name.encode()) <= limit:
        return name
    stem, ext = os.path.splitext(name)
    if len(ext.encode()) > limit // 2:
        stem, ext = name, ""
    budget = limit - len(ext.encode())
    return stem.encode()[:budget].decode(errors="ignore") + ext


# RFC 9530 names -> hashlib names, for REST `Content-Digest`.
_CONTENT_DIGEST_ALGORITHMS = {"sha-256": "sha256", "sha-512": "sha512"}
_CONTENT_DIGEST = re.compile(r"([a-z0-9-]+)=:([A-Za-z0-9+/]*={0,2}):\Z", re.ASCII)


@dataclass(frozen=True)
class ChunkDigest:
    """A digest the client sent for one request's bytes."""

    algorithm: str  # a hashlib name
    expected: bytes


def parse_content_digest(value: str | None) -> ChunkDigest | None:
    """RFC 9530 `Content-Digest: sha-256=:<base64>:` (the first supported entry wins)."""
    if not value:
        return None
    for entry in value.split(","):
        match = _CONTENT_DIGEST.match(entry.strip())
        if not match:
            raise InvalidRequest("Content-Digest must look like 'sha-256=:<base64 digest>:'.")
        algorithm = _CONTENT_DIGEST_ALGORITHMS.get(match.group(1))
        if algorithm:
            return ChunkDigest(algorithm, _decode_digest(match.group(2), algorithm))
    raise InvalidRequest("Content-Digest supports sha-256 and sha-512.")


def _decode_digest(encoded: str, algorithm: str) -> bytes:
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest("The digest is not valid base64.") from exc
    if len(raw) != hashlib.new(algorithm).digest_size:
        raise InvalidRequest(f"A {algorithm} digest is {hashlib.new(algorithm).digest_size} bytes long.")
    return raw


# --- tus headers ---------------------------------------------------------------------------------

# tus checksum extension: the algorithms offered in `Tus-Checksum-Algorithm` (sha1 is required).
TUS_CHECKSUM_ALGORITHMS = ("sha1", "md5", "sha256")
# A metadata key: printable ASCII without space or comma (tus 1.0.0, Upload-Metadata).
_TUS_METADATA_KEY = re.compile(r"[\x21-\x2b\x2d-\x7e]+\Z", re.ASCII)
# RFC 4648 §4 base64 with its padding.
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z", re.ASCII)
TUS_METADATA_MAX_CHARS = 8 * 1024


def parse_tus_metadata(value: str | None) -> dict[str, bytes]:
    """`Upload-Metadata: key base64,key2 base64,flag`: keys are unique, values decoded bytes.

    Strict on purpose: a header that passes contains only printable ASCII, so it is safe to store
    and echo back as it came (TUS.md C4), and a malformed one is a clear 400, not silently dropped.
    """
    if value is None or value.strip(" ") == "":
        return {}
    if len(value) > TUS_METADATA_MAX_CHARS:
        raise InvalidRequest(f"Upload-Metadata is limited to {TUS_METADATA_MAX_CHARS} characters.")
    pairs: dict[str, bytes] = {}
    for item in value.split(","):
        parts = item.strip(" ").split(" ")
        key, encoded = parts[0], parts[1] if len(parts) > 1 else ""
        if len(parts) > 2 or not _TUS_METADATA_KEY.match(key):
            raise InvalidRequest(
                "Upload-Metadata must be comma-separated 'key base64value' pairs; keys are non-empty "
                f"ASCII without spaces or commas (got {item.strip(' ')[:40]!r})."
            )
        if key in pairs:
            raise InvalidRequest(f"Upload-Metadata names the key {key!r} twice.")
        if not _BASE64.match(encoded):
            raise InvalidRequest(f"The Upload-Metadata value of {key!r} is not padded base64 (RFC 4648 §4).")
        pairs[key] = base64.b64decode(encoded)
    return pairs


def tus_metadata_filename(metadata: dict[str, bytes]) -> str | None:
    """The file name a tus client sent as `filename` (tus-js-client, Uppy, tuspy) or `name` (Uppy).

    An empty value counts as absent (a Blob without a name), so the upload is "unnamed", not a 400.
    """
    raw = metadata.get("filename") or metadata.get("name")
    if not raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest("The file name in Upload-Metadata is not UTF-8.") from exc


def parse_upload_checksum(value: str | None) -> ChunkDigest | None:
    """tus `Upload-Checksum: <algorithm> <base64 digest>`, or None when absent."""
    if value is None:
        return None
    parts = value.split(" ")
    if len(parts) != 2:
        raise InvalidRequest("Upload-Checksum must be '<algorithm> <base64 digest>', e.g. 'sha1 Kq5s…='.")
    algorithm, encoded = parts
    if algorithm not in TUS_CHECKSUM_ALGORITHMS:
        raise InvalidRequest(
            f"Checksum algorithm {algorithm[:20]!r} is not supported; use one of "
            f"{', '.join(TUS_CHECKSUM_ALGORITHMS)}."
        )
    return ChunkDigest(algorithm, _decode_digest(encoded, algorithm))


@dataclass(frozen=True)
class UploadConcat:
    final: bool
    urls: tuple[str, ...] = ()


def parse_upload_concat(value: str | None) -> UploadConcat | None:
    """tus `Upload-Concat: partial` or `final;<url> <url>…` (URLs absolute or relative)."""
    if value is None:
        return None
    if value == "partial":
        return UploadConcat(final=False)
    if value.startswith("final;"):
        urls = tuple(value[len("final;"):].split())
        if urls and all(url.isascii() and url.isprintable() for url in urls):
            return UploadConcat(final=True, urls=urls)
    raise InvalidRequest("Upload-Concat must be 'partial' or 'final;<upload URL> <upload URL>…'.")
