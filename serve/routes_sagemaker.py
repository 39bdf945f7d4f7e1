"""SageMaker routes: the container's `/invocations`, and a local stand-in for the SageMaker runtime API.

`/endpoints/<name>/invocations` and `/endpoints/<name>/invocations-response-stream` are the paths boto3's
`invoke_endpoint` and `invoke_endpoint_with_response_stream` call (point `AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME`
here): the same dispatch, container errors as SageMaker's `ModelError` (424), and the streaming reply framed
as event-stream `PayloadPart`s.
"""

from __future__ import annotations

import logging

from flask import Blueprint, Response

from serve.context import error_response, json_response, read_json
from serve.errors import ApiError, ErrorKind
from serve.eventstream import CONTENT_TYPE as EVENTSTREAM_CONTENT_TYPE
from serve.eventstream import frame_chunks
from serve.invocations import dispatch

logger = logging.getLogger("serve.routes_sagemaker")
blueprint = Blueprint("sagemaker", __name__)

PRODUCTION_VARIANT = "AllTraffic"


@blueprint.post("/invocations")
def invocations() -> Response:
    return dispatch(read_json(any_media_type=True))


@blueprint.post("/endpoints/<endpoint_name>/invocations")
def invoke_endpoint(endpoint_name: str) -> Response:
    reply = _run_container()
    if reply.status_code >= 400:
        return _model_error(reply)
    reply.headers["x-Amzn-Invoked-Production-Variant"] = PRODUCTION_VARIANT
    return reply


@blueprint.post("/endpoints/<endpoint_name>/invocations-response-stream")
def invoke_endpoint_with_response_stream(endpoint_name: str) -> Response:
    reply = _run_container()
    if reply.status_code >= 400:
        return _model_error(reply)
    framed = Response(
        frame_chunks(reply.response),
        status=200,
        content_type=EVENTSTREAM_CONTENT_TYPE,
        headers={
            "X-Amzn-SageMaker-Content-Type": reply.content_type or "application/json",
            "x-Amzn-Invoked-Production-Variant": PRODUCTION_VARIANT,
            "X-Accel-Buffering": "no",
        },
    )
    framed.call_on_close(reply.close)  # closing the frames closes the stream inside (aborts a gone client's work)
    return framed


def _run_container() -> Response:
    """What the container's /invocations would answer, errors included, as a response object."""
    try:
        return dispatch(read_json(any_media_type=True))
    except ApiError as exc:
        return error_response(exc)
    except Exception as exc:
        logger.exception("invocation failed")
        return error_response(ApiError(ErrorKind.INTERNAL, f"{type(exc).__name__}: {exc}"))


def _model_error(reply: Response) -> Response:
    """SageMaker's answer when the container answers 4xx/5xx: 424 ModelError carrying the original reply."""
    original = reply.get_data(as_text=True)
    kind = "client" if reply.status_code < 500 else "server"
    body = {
        "ErrorCode": f"{kind.upper()}_ERROR_FROM_MODEL",
        "LogStreamArn": "",
        "Message": f'Received {kind} error ({reply.status_code}) from primary with message "{original}". ',
        "OriginalMessage": original,
        "OriginalStatusCode": reply.status_code,
    }
    reply.close()
    return json_response(body, status=424, headers={"x-amzn-ErrorType": "ModelError"})
