"""AWS event-stream framing, as SageMaker's InvokeEndpointWithResponseStream returns it.

Each chunk of the container's reply becomes one `PayloadPart` message: a prelude (total and header lengths and
their CRC32), string headers, the raw payload and a CRC32 of the whole message (botocore checks both).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Iterator

CONTENT_TYPE = "application/vnd.amazon.eventstream"
_STRING_TYPE = 7
_PAYLOAD_PART_HEADERS = (
    (":event-type", "PayloadPart"),
    (":content-type", "application/octet-stream"),
    (":message-type", "event"),
)


def _encode_headers(headers: Iterable[tuple[str, str]]) -> bytes:
    out = bytearray()
    for name, value in headers:
        name_bytes, value_bytes = name.encode(), value.encode()
        out += struct.pack("!B", len(name_bytes)) + name_bytes
        out += struct.pack("!BH", _STRING_TYPE, len(value_bytes)) + value_bytes
    return bytes(out)


def encode_message(headers: Iterable[tuple[str, str]], payload: bytes) -> bytes:
    """One event-stream message: prelude, prelude CRC, headers, payload, message CRC."""
    header_bytes = _encode_headers(headers)
    total_length = 4 + 4 + 4 + len(header_bytes) + len(payload) + 4
    prelude = struct.pack("!II", total_length, len(header_bytes))
    prelude_crc = struct.pack("!I", zlib.crc32(prelude) & 0xFFFFFFFF)
    message = prelude + prelude_crc + header_bytes + payload
    return message + struct.pack("!I", zlib.crc32(message) & 0xFFFFFFFF)


def payload_part(payload: bytes) -> bytes:
    """A `PayloadPart` event carrying these bytes (botocore yields them as `PayloadPart.Bytes`)."""
    return encode_message(_PAYLOAD_PART_HEADERS, payload)


def frame_chunks(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Wrap each non-empty chunk of a reply body as one PayloadPart message."""
    for chunk in chunks:
        if chunk:
            yield payload_part(chunk)
