"""Strict parsing of client input (RELIABILITY.md X7, F5, I1-I4, §6.8)."""
from __future__ import annotations

import base64
import hashlib
import unicodedata

import pytest

from uploads.exceptions import InvalidRequest
from uploads.validation import (
    BIGINT_MAX,
    TUS_CHECKSUM_ALGORITHMS,
    TUS_METADATA_MAX_CHARS,
    ChunkDigest,
    ContentRange,
    UploadConcat,
    clean_filename,
    parse_checksum,
    parse_content_digest,
    parse_content_range,
    parse_non_negative_int,
    parse_tus_metadata,
    parse_upload_checksum,
    parse_upload_concat,
    tus_metadata_filename,
)

# --- Numbers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [("0", 0), ("5", 5), ("007", 7), ("1048576", 1048576), (str(BIGINT_MAX), BIGINT_MAX)],
)
def test_parse_non_negative_int_accepts_ascii_digits(value, expected):
    assert parse_non_negative_int(value, "Upload-Offset") == expected


@pytest.mark.parametrize(
    "value",
    [
        "-1",
        "-0",
        "+5",
        " 5",
        "5 ",
        "5\n",
        "1_000",
        "٣",  # ARABIC-INDIC DIGIT THREE: int() accepts it (X7)
        "５",  # FULLWIDTH DIGIT FIVE
        "0x10",
        "1e3",
        "5.0",
        "",
        None,
        "1" * 20,  # more digits than a bigint can hold
        str(2**63),  # 19 digits, one past the bigint range: a 400, not a DB error (F9)
        str(10**30),
    ],
)
def test_parse_non_negative_int_rejects_anything_else(value):
    with pytest.raises(InvalidRequest) as excinfo:
        parse_non_negative_int(value, "Upload-Offset")
    assert excinfo.value.status_code == 400
    assert "Upload-Offset" in excinfo.value.detail


# --- Content-Range --------------------------------------------------------------------------------


def test_parse_content_range_good():
    parsed = parse_content_range("bytes 0-1048575/4194304")
    assert parsed == ContentRange(start=0, end=1048575, total=4194304)
    assert parsed.length == 1048576


def test_parse_content_range_single_last_byte():
    parsed = parse_content_range("bytes 9-9/10")
    assert (parsed.start, parsed.end, parsed.total, parsed.length) == (9, 9, 10, 1)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "0-9/10",  # missing 'bytes '
        "bytes=0-9/10",
        "Bytes 0-9/10",
        "bytes 0-9/*",  # unknown total: our API always knows the size
        "bytes */10",
        "bytes 5-4/10",  # END < START
        "bytes 0-10/10",  # END >= SIZE (END is inclusive)
        "bytes 0-0/0",
        "bytes ٠-٩/١٠",  # non-ASCII digits
        "bytes ０-９/１０",
        "bytes -1-9/10",
        "bytes +0-9/10",
        "bytes 0-9/10 ",
        " bytes 0-9/10",
        "bytes 0-9/10\n",
        "bytes 0 - 9/10",
        f"bytes 0-9/{2**63}",  # past the bigint range
        f"bytes 0-9/{'9' * 20}",
    ],
)
def test_parse_content_range_rejects_malformed(value):
    with pytest.raises(InvalidRequest):
        parse_content_range(value)


# --- Whole-file checksum -------------------------------------------------------------------------

HEX = hashlib.sha256(b"hello").hexdigest()


@pytest.mark.parametrize("value", [None, ""])
def test_parse_checksum_none(value):
    assert parse_checksum(value) == ""


def test_parse_checksum_good():
    assert parse_checksum(f"sha256:{HEX}") == f"sha256:{HEX}"


def test_parse_checksum_normalises_case():
    assert parse_checksum(f"sha256:{HEX.upper()}") == f"sha256:{HEX}"


@pytest.mark.parametrize(
    "value",
    [
        HEX,  # no algorithm
        f"SHA256:{HEX}",
        f"sha-256:{HEX}",
        f"md5:{HEX}",
        f"sha256:{HEX[:-1]}",  # 63 digits
        f"sha256:{HEX}0",  # 65 digits
        f"sha256:{HEX[:-1]}g",
        f"sha256: {HEX}",
        f"sha256:{HEX}\n",
        "sha256:" + "٣" * 64,
        "sha256:",
        123,
        ["sha256:" + HEX],
    ],
)
def test_parse_checksum_rejects_bad(value):
    with pytest.raises(InvalidRequest):
        parse_checksum(value)


# --- File names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("report.pdf", "report.pdf"),
        ("../../etc/passwd", "passwd"),
        ("..\\..\\win.ini", "win.ini"),
        ("C:\\x", "x"),
        ("/abs/x", "x"),
        ("....//x.txt", "x.txt"),
        ("%2e%2e%2fx", "%2e%2e%2fx"),  # not decoded: it is a harmless display name, not a path
        ("  spaced.txt  ", "spaced.txt"),
        ("CON", "CON"),  # harmless: names on disk are generated (I5)
        ('"><img src=x onerror=alert(1)>.png', '"><img src=x onerror=alert(1)>.png'),
    ],
)
def test_clean_filename_keeps_a_safe_basename(value, expected):
    assert clean_filename(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        ".",
        "..",
        "   ",
        "dir/",
        "a/..",
        "..\\",
        "a\x00.png",  # NUL (I2): PostgreSQL text cannot hold it, so it must be a 400, not a 500
        "gpj\u202e.exe",  # RTL override (I4)
        "zero\u200bwidth.txt",
        "bad\r\nSet-Cookie: x=1",  # CR/LF would split a Content-Disposition header
        "line\nbreak.txt",
        "bell\x07.txt",
        "c1\x85.txt",
        "sep\u2028.txt",
        None,
        42,
        b"bytes.txt",
    ],
)
def test_clean_filename_rejects(value):
    with pytest.raises(InvalidRequest):
        clean_filename(value)


def test_clean_filename_normalises_to_nfc():
    nfd = unicodedata.normalize("NFD", "café.txt")
    assert nfd != "café.txt"
    cleaned = clean_filename(nfd)
    assert cleaned == "café.txt"
    assert unicodedata.is_normalized("NFC", cleaned)


@pytest.mark.parametrize(
    "value",
    [
        "a" * 296 + ".txt",  # 300 ASCII characters
        "日" * 100 + ".txt",  # 100 characters, 300 bytes of UTF-8
        "é" * 200 + ".jpeg",
        "😀" * 70 + ".png",  # 4-byte characters: a cut must not split one
    ],
)
def test_clean_filename_truncates_to_255_utf8_bytes_keeping_extension(value):
    cleaned = clean_filename(value)
    encoded = cleaned.encode("utf-8")
    assert len(encoded) <= 255
    assert len(encoded) > 240  # cut, not emptied
    assert cleaned.endswith(value.rsplit(".", 1)[-1])
    assert cleaned.rsplit(".", 1)[0] == value.rsplit(".", 1)[0][: len(cleaned.rsplit(".", 1)[0])]
    assert encoded.decode("utf-8") == cleaned  # still valid UTF-8: no character split in half


def test_clean_filename_exactly_255_bytes_is_kept():
    value = "b" * 251 + ".txt"
    assert clean_filename(value) == value


def test_clean_filename_huge_extension_is_cut_with_the_name():
    # An "extension" longer than half the budget is not worth keeping at the stem's expense.
    value = "x." + "e" * 300
    cleaned = clean_filename(value)
    assert len(cleaned.encode()) <= 255
    assert cleaned.startswith("x.eee")


# --- Content-Digest (RFC 9530) -------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize("value", [None, ""])
def test_parse_content_digest_absent(value):
    assert parse_content_digest(value) is None


def test_parse_content_digest_sha256():
    raw = hashlib.sha256(b"chunk").digest()
    assert parse_content_digest(f"sha-256=:{_b64(raw)}:") == ChunkDigest("sha256", raw)


def test_parse_content_digest_sha512():
    raw = hashlib.sha512(b"chunk").digest()
    assert parse_content_digest(f"sha-512=:{_b64(raw)}:") == ChunkDigest("sha512", raw)


def test_parse_content_digest_skips_unsupported_entries():
    raw = hashlib.sha256(b"chunk").digest()
    value = f"md5=:{_b64(hashlib.md5(b'chunk').digest())}:, sha-256=:{_b64(raw)}:"
    assert parse_content_digest(value) == ChunkDigest("sha256", raw)


@pytest.mark.parametrize(
    "value",
    [
        "md5=:" + _b64(hashlib.md5(b"x").digest()) + ":",  # only unsupported algorithms
        "sha-256=" + _b64(hashlib.sha256(b"x").digest()),  # missing the colons
        "sha-256=:" + _b64(hashlib.sha256(b"x").digest()),
        "SHA-256=:" + _b64(hashlib.sha256(b"x").digest()) + ":",
        "sha-256=:not base64!:",
        "sha-256=:" + _b64(hashlib.sha256(b"x").digest())[:-2] + ":",  # bad padding
        "sha-256=:" + _b64(hashlib.sha1(b"x").digest()) + ":",  # wrong length for sha-256
        "sha-512=:" + _b64(hashlib.sha256(b"x").digest()) + ":",
        "sha-256=::",
        "garbage",
        ",",
    ],
)
def test_parse_content_digest_rejects_malformed(value):
    with pytest.raises(InvalidRequest):
        parse_content_digest(value)


# --- tus Upload-Metadata -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", " ", "   "])
def test_parse_tus_metadata_empty_header_is_no_metadata(value):
    assert parse_tus_metadata(value) == {}


def test_parse_tus_metadata_decodes_pairs():
    value = f"filename {_b64(b'world.txt')},filetype {_b64(b'text/plain')}"
    assert parse_tus_metadata(value) == {"filename": b"world.txt", "filetype": b"text/plain"}


def test_parse_tus_metadata_key_without_value_is_empty_bytes():
    # tus 1.0.0: "the key MAY be followed by a space and the value", so a bare key is a flag.
    assert parse_tus_metadata(f"is_confidential,filename {_b64(b'a.txt')}") == {
        "is_confidential": b"",
        "filename": b"a.txt",
    }


def test_parse_tus_metadata_empty_value_is_empty_bytes():
    assert parse_tus_metadata(f"empty ,filename {_b64(b'a.txt')}") == {"empty": b"", "filename": b"a.txt"}


def test_parse_tus_metadata_value_is_raw_bytes_of_any_utf8():
    # Values are bytes: the name a client sends is UTF-8 inside base64, the header itself stays ASCII.
    name = "naïve 日本語 😀.txt"
    assert parse_tus_metadata(f"filename {_b64(name.encode())}") == {"filename": name.encode()}


@pytest.mark.parametrize(
    "value",
    [
        "a YQ==, b Yg==",  # tus-js-client joins with ","; others with ", "
        "  a YQ==  ,  b Yg==  ",
        "a YQ==,b Yg== ",
    ],
)
def test_parse_tus_metadata_allows_spaces_around_items(value):
    assert parse_tus_metadata(value) == {"a": b"a", "b": b"b"}


def test_parse_tus_metadata_keys_may_use_any_printable_ascii_but_space_and_comma():
    key = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != ",")
    assert parse_tus_metadata(f"{key} YQ==") == {key: b"a"}


def test_parse_tus_metadata_accepts_a_header_at_the_length_limit():
    value = "abc " + "A" * (TUS_METADATA_MAX_CHARS - 4)
    assert len(value) == TUS_METADATA_MAX_CHARS
    assert parse_tus_metadata(value) == {"abc": bytes(3 * (TUS_METADATA_MAX_CHARS - 4) // 4)}


@pytest.mark.parametrize(
    "value",
    [
        "a YQ==,a Yg==",  # duplicate key: which one wins would be arbitrary
        "a,a",
        "a YQ==,,b Yg==",  # empty key between commas
        ",a YQ==",
        "名前 YQ==",  # keys are ASCII
        "café YQ==",
        "a\x00 YQ==",  # control characters in a key
        "a\tb YQ==",
        "a !!!!",  # not base64
        "a YQ=",  # wrong padding
        "a YQ===",
        "a Y",
        "a YQ",  # unpadded base64 (RFC 4648 §4 requires padding)
        "a YWI",
        "a YQ==\n",
        "a YW Jj",  # three space-separated parts
        "a YQ== Yg==",
        "a  YQ==",  # two spaces make an empty middle part
        "a YQ==;b Yg==",
        "a b64:YQ==",
        "abc " + "A" * TUS_METADATA_MAX_CHARS,  # over the length limit
    ],
)
def test_parse_tus_metadata_rejects_malformed(value):
    with pytest.raises(InvalidRequest) as excinfo:
        parse_tus_metadata(value)
    assert excinfo.value.status_code == 400


def test_parse_tus_metadata_duplicate_key_error_names_the_key():
    with pytest.raises(InvalidRequest) as excinfo:
        parse_tus_metadata("filename YQ==,filename Yg==")
    assert "filename" in excinfo.value.detail


def test_parse_tus_metadata_over_long_error_states_the_limit():
    with pytest.raises(InvalidRequest) as excinfo:
        parse_tus_metadata("a " + "A" * (TUS_METADATA_MAX_CHARS * 4))
    assert str(TUS_METADATA_MAX_CHARS) in excinfo.value.detail


@pytest.mark.parametrize(
    "metadata, expected",
    [
        ({"filename": b"a.txt", "name": b"b.txt"}, "a.txt"),  # `filename` (tus-js-client) wins
        ({"name": b"b.txt", "filename": b"a.txt"}, "a.txt"),
        ({"name": b"b.txt", "type": b"text/plain"}, "b.txt"),  # Uppy's `name` as a fallback
        ({"filename": "café 日本.txt".encode()}, "café 日本.txt"),
        ({}, None),
        ({"filetype": b"text/plain", "relativePath": b"null"}, None),
    ],
)
def test_tus_metadata_filename(metadata, expected):
    assert tus_metadata_filename(metadata) == expected


@pytest.mark.parametrize(
    "metadata",
    [
        {"filename": b"\xff\xfe.txt"},
        {"name": "café".encode("latin-1")},
        {"filename": "😀".encode()[:3]},  # a UTF-8 sequence cut short
        {"filename": b"\xff", "name": b"ok.txt"},  # a bad `filename` is not hidden by a good `name`
    ],
)
def test_tus_metadata_filename_must_be_utf8(metadata):
    with pytest.raises(InvalidRequest) as excinfo:
        tus_metadata_filename(metadata)
    assert excinfo.value.status_code == 400


# --- tus Upload-Checksum -------------------------------------------------------------------------


def test_parse_upload_checksum_absent():
    assert parse_upload_checksum(None) is None


@pytest.mark.parametrize("algorithm", ["sha1", "md5", "sha256"])
def test_parse_upload_checksum_good(algorithm):
    raw = hashlib.new(algorithm, b"chunk").digest()
    assert parse_upload_checksum(f"{algorithm} {_b64(raw)}") == ChunkDigest(algorithm, raw)


def test_tus_checksum_algorithms_include_the_required_sha1():
    # tus checksum extension: "The Server MUST support at least the SHA1 checksum algorithm".
    assert "sha1" in TUS_CHECKSUM_ALGORITHMS
    for algorithm in TUS_CHECKSUM_ALGORITHMS:
        hashlib.new(algorithm)  # each one is a hashlib name the engine can use


@pytest.mark.parametrize("algorithm", ["crc32", "sha512", "SHA1", "sha-1", "md4"])
def test_parse_upload_checksum_unsupported_algorithm_names_the_supported_ones(algorithm):
    with pytest.raises(InvalidRequest) as excinfo:
        parse_upload_checksum(f"{algorithm} {_b64(b'1234')}")
    assert excinfo.value.status_code == 400
    for supported in TUS_CHECKSUM_ALGORITHMS:
        assert supported in excinfo.value.detail


SHA1 = _b64(hashlib.sha1(b"chunk").digest())


@pytest.mark.parametrize(
    "value",
    [
        f"sha1{SHA1}",  # missing the space
        f"sha1:{SHA1}",
        "sha1",
        "",
        f"sha1  {SHA1}",  # two spaces
        f" sha1 {SHA1}",
        f"sha1 {SHA1} ",
        f"sha1 {SHA1} extra",
        "sha1 not-base64!",  # bad base64
        f"sha1 {SHA1[:-1]}",  # bad padding
        f"sha1 {SHA1.rstrip('=')}",
        "sha1 ",  # no digest at all
        "sha1 " + _b64(hashlib.sha256(b"chunk").digest()),  # wrong digest length for the algorithm
        "md5 " + SHA1,
        "sha256 " + _b64(hashlib.md5(b"chunk").digest()),
        "sha1 " + hashlib.sha1(b"chunk").hexdigest(),  # hex is not what tus sends
    ],
)
def test_parse_upload_checksum_rejects_malformed(value):
    with pytest.raises(InvalidRequest) as excinfo:
        parse_upload_checksum(value)
    assert excinfo.value.status_code == 400


# --- tus Upload-Concat ---------------------------------------------------------------------------


def test_parse_upload_concat_absent():
    assert parse_upload_concat(None) is None


def test_parse_upload_concat_partial():
    assert parse_upload_concat("partial") == UploadConcat(final=False, urls=())


@pytest.mark.parametrize(
    "value, urls",
    [
        ("final;/files/a /files/b", ("/files/a", "/files/b")),
        ("final;/files/a", ("/files/a",)),
        ("final;/files/a  /files/b", ("/files/a", "/files/b")),
        ("final; /files/a /files/b ", ("/files/a", "/files/b")),
        ("final;https://up.example/files/a http://up.example/files/b", ("https://up.example/files/a", "http://up.example/files/b")),
        ("final;/files/a /files/a", ("/files/a", "/files/a")),  # order and repeats are the client's
    ],
)
def test_parse_upload_concat_final(value, urls):
    assert parse_upload_concat(value) == UploadConcat(final=True, urls=urls)


@pytest.mark.parametrize(
    "value",
    [
        "final;",  # a final upload of nothing
        "final; ",
        "final",
        "final:/files/a",
        "Final;/files/a",
        "FINAL;/files/a",
        "Partial",
        "PARTIAL",
        "partial;/files/a",
        "partial,final",
        "garbage",
        "final;/files/ä",  # URLs are ASCII (percent-encoded)
        "final;/files/a /files/日本",
        "final;/files/a\x00",
        "final;/files/a\x7f",
    ],
)
def test_parse_upload_concat_rejects_malformed(value):
    with pytest.raises(InvalidRequest) as excinfo:
        parse_upload_concat(value)
    assert excinfo.value.status_code == 400


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [({"filename": b"", "name": b"n.txt"}, "n.txt"), ({"filename": b""}, None), ({"name": b""}, None)],
)
def test_tus_metadata_filename_treats_an_empty_value_as_absent(metadata, expected):
    assert tus_metadata_filename(metadata) == expected
