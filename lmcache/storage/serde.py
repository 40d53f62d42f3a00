"""The on-disk and on-the-wire format of one chunk: a checked binary header + raw KV bytes.

No pickle: the header is a fixed struct plus the key, dtype and shape; the payload is the raw
KV. Every read is validated (magic, version, key, dtype, shape, length, checksum) so corrupt or
foreign bytes become a miss, never wrong KV.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import xxhash

from lmcache.spec import KVSpec

MAGIC = b"LMKV"
VERSION = 1
_FIXED = struct.Struct("<4sHHIHHQQ")
"""magic, version, tag length, key length, dtype length, ndim, payload length, xxh3-64
checksum. The tag length was a reserved zero field: files written before tags existed read
as untagged."""
FIXED_SIZE = _FIXED.size
_MAX_KEY = 4096
_MAX_DTYPE = 32
_MAX_NDIM = 8
MAX_TAG = 32768
"""A tag is what a tier's owner needs to describe the chunk after a restart (the vLLM block
hashes and token ids of its KV events, ~2 KiB for 256 tokens)."""
MAX_HEADER = FIXED_SIZE + _MAX_KEY + _MAX_DTYPE + 4 * _MAX_NDIM + MAX_TAG
"""No valid header is longer: ``decode_header`` looks no further."""


class CorruptValue(ValueError):
    """A stored value that must not be loaded (bad header, wrong key or shape, bad checksum)."""


def checksum(payload: memoryview | bytes) -> int:
    return xxhash.xxh3_64_intdigest(payload)


@dataclass(frozen=True)
class Header:
    key: str
    dtype_name: str
    shape: tuple[int, ...]
    payload_len: int
    checksum: int
    tag: bytes = b""

    @property
    def size(self) -> int:
        return (
            FIXED_SIZE
            + len(self.key.encode())
            + len(self.dtype_name.encode())
            + 4 * len(self.shape)
            + len(self.tag)
        )

    def encode(self) -> bytes:
        key = self.key.encode()
        dtype = self.dtype_name.encode()
        return (
            _FIXED.pack(
                MAGIC,
                VERSION,
                len(self.tag),
                len(key),
                len(dtype),
                len(self.shape),
                self.payload_len,
                self.checksum,
            )
            + key
            + dtype
            + struct.pack(f"<{len(self.shape)}I", *self.shape)
            + self.tag
        )

    def check(self, key: str, spec: KVSpec, num_tokens: int) -> None:
        """Refuse a header that does not describe exactly ``num_tokens`` tokens of ``spec``'s
        KV under ``key``."""
        if self.key != key:
            raise CorruptValue(f"stored under another key ({self.key[:80]!r})")
        if self.dtype_name != spec.dtype_name:
            raise CorruptValue(f"dtype {self.dtype_name}, expected {spec.dtype_name}")
        if len(self.shape) != 5:
            raise CorruptValue(f"shape {self.shape} is not 5-D")
        if self.shape != spec.shape(num_tokens):
            raise CorruptValue(
                f"shape {self.shape}, expected {spec.shape(num_tokens)} ({num_tokens} tokens)"
            )
        if self.payload_len != num_tokens * spec.bytes_per_token:
            raise CorruptValue(f"payload length {self.payload_len} does not match shape")


def header_for(
    key: str, spec: KVSpec, num_tokens: int, payload: memoryview, tag: bytes = b""
) -> Header:
    return Header(
        key, spec.dtype_name, spec.shape(num_tokens), payload.nbytes, checksum(payload), tag
    )


def fixed_lengths(prefix: bytes) -> tuple[int, int, int, int, int]:
    """(key length, dtype length, ndim, tag length, payload length) from the fixed part,
    validated."""
    if len(prefix) < FIXED_SIZE:
        raise CorruptValue("truncated header")
    magic, version, tag_len, key_len, dtype_len, ndim, payload_len, _ = _FIXED.unpack_from(prefix)
    if magic != MAGIC:
        raise CorruptValue("bad magic")
    if version != VERSION:
        raise CorruptValue(f"unsupported format version {version}")
    if key_len > _MAX_KEY or dtype_len > _MAX_DTYPE or ndim > _MAX_NDIM or tag_len > MAX_TAG:
        raise CorruptValue("header field out of range")
    return key_len, dtype_len, ndim, tag_len, payload_len


def variable_size(prefix: bytes) -> int:
    """Bytes of the whole header, given at least its fixed part."""
    key_len, dtype_len, ndim, tag_len, _ = fixed_lengths(prefix)
    return FIXED_SIZE + key_len + dtype_len + 4 * ndim + tag_len


def read_header(read: Callable[[int], bytes], limit: int | None = None) -> tuple[Header, int]:
    """A header and its size, read from a stream no further than it says it runs (a value of
    ``limit`` bytes cannot hold a longer one)."""
    fixed = read(FIXED_SIZE)
    size = variable_size(fixed)
    if limit is not None and size > limit:
        raise CorruptValue("truncated header")
    return decode_header(fixed + read(size - FIXED_SIZE)), size


def decode_header(data: bytes | memoryview) -> Header:
    """Parse a header from the start of ``data`` (which may run on into the payload)."""
    data = bytes(data[:MAX_HEADER])
    key_len, dtype_len, ndim, tag_len, payload_len = fixed_lengths(data)
    end_key = FIXED_SIZE + key_len
    end_dtype = end_key + dtype_len
    end_shape = end_dtype + 4 * ndim
    end = end_shape + tag_len
    if len(data) < end:
        raise CorruptValue("truncated header")
    try:
        key = data[FIXED_SIZE:end_key].decode()
        dtype_name = data[end_key:end_dtype].decode()
    except UnicodeDecodeError:
        raise CorruptValue("header is not valid UTF-8") from None
    shape = struct.unpack_from(f"<{ndim}I", data, end_dtype)
    stored_checksum = _FIXED.unpack_from(data)[7]
    tag = data[end_shape:end]
    return Header(key, dtype_name, tuple(shape), payload_len, stored_checksum, tag)


def verify_payload(header: Header, payload: memoryview) -> None:
    if checksum(payload) != header.checksum:
        raise CorruptValue("checksum mismatch")
