"""The event-stream encoder, decoded by botocore's own parser, as boto3's invoke_endpoint_with_response_stream does."""

from __future__ import annotations

import botocore.session
from botocore.eventstream import EventStream, EventStreamBuffer
from botocore.parsers import EventStreamJSONParser

from serve.eventstream import frame_chunks, payload_part


def test_payload_parts_decode_with_botocore_buffer():
    chunks = [b'data: {"a":1}\n\n', "data: 日本 😀\n\n".encode(), b"data: [DONE]\n\n"]
    buffer = EventStreamBuffer()
    buffer.add_data(b"".join(frame_chunks(chunks)))
    messages = list(buffer)
    assert [m.payload for m in messages] == chunks
    assert all(m.headers[":event-type"] == "PayloadPart" for m in messages)
    assert all(m.headers[":message-type"] == "event" for m in messages)


def _sagemaker_stream(raw: bytes) -> EventStream:
    """The EventStream botocore builds for InvokeEndpointWithResponseStream's Body."""
    model = botocore.session.get_session().get_service_model("sagemaker-runtime")
    body_shape = model.operation_model("InvokeEndpointWithResponseStream").output_shape.members["Body"]

    class Raw:
        def stream(self):
            # Split at an awkward place: frames must survive arbitrary network chunking.
            yield raw[:7]
            yield raw[7:]

    return EventStream(Raw(), body_shape, EventStreamJSONParser(), "InvokeEndpointWithResponseStream")


def test_botocore_event_stream_yields_payload_parts():
    raw = payload_part(b"data: one\n\n") + payload_part(b"data: two\n\n")
    events = list(_sagemaker_stream(raw))
    assert events == [{"PayloadPart": {"Bytes": b"data: one\n\n"}}, {"PayloadPart": {"Bytes": b"data: two\n\n"}}]


def test_empty_chunks_are_not_framed():
    assert list(frame_chunks([b"", b"x", b""])) == [payload_part(b"x")]
