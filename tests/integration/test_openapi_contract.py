"""Every route of the real server against its own `/openapi.json`, with schemathesis: valid and invalid requests
generated from the document get no 5xx, a documented status, media type and body, and every error (a reply's or
one inside a stream) in its route's shape: OpenAI's `{"error": {"message", "type", "param", "code"}}` on /v1 and
on /invocations with an OpenAI body, TGI's `{"error", "error_type"}` on the others, SageMaker's ModelError on
the /endpoints stand-ins.

Bounded for CI: a fixed seed, no example database, a few examples per operation, and generation lengths capped
before sending, so the generation routes answer in a few steps of the tiny model.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import hypothesis
import jsonschema
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.live import LiveServer, start_server

MAX_NEW_TOKENS = 3
"""Longest generation a case may ask for; larger asks are lowered to it before sending."""
MAX_CHOICES = 2
"""Most choices (`n`, `best_of`) and prompts a case may ask for."""
MAX_TOTAL_TOKENS = 48
"""The server's MAX_TOTAL_TOKENS: what a body that leaves its length out may fill."""
MAX_EXAMPLES = 8
"""Requests per operation and generation mode (valid, invalid)."""
SEEN: Counter[str] = Counter()
"""What the checks saw over the run: replies by status class, errors by shape, streams by event model."""
CONFIG = {
    "seed": 19,
    "request-timeout": 60,
    # The document cannot say everything the server checks (a tool message needs content, the context has a
    # length, a model has a name), so a request valid by the document may get a 4xx: its shape is checked below.
    "checks": {"positive_data_acceptance": {"enabled": False}},
    # The SageMaker runtime stand-ins answer a container error as SageMaker does: 424 with ModelError.
    "operations": [
        {"include-path-regex": "^/endpoints/", "checks": {"negative_data_rejection": {"expected-statuses": [424]}}}
    ],
}


@pytest.fixture(scope="module")
def contract_server() -> LiveServer:
    """A server whose context is short, so a body that leaves the length out still generates few tokens."""
    server = start_server({"MAX_TOTAL_TOKENS": str(MAX_TOTAL_TOKENS)})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(contract_server):
    config = SchemathesisConfig.from_dict(CONFIG)
    return schemathesis.openapi.from_url(f"{contract_server.url}/openapi.json", config=config)


def error_dialect(path: str, body: object) -> str:
    """Which error shape a route answers in: `openai`, `tgi` or `sagemaker` (ModelError)."""
    if path.startswith("/v1/"):
        return "openai"
    if path.startswith("/endpoints/"):
        return "sagemaker"
    if path == "/invocations" and isinstance(body, dict) and "inputs" not in body:
        if "messages" in body or "prompt" in body:
            return "openai"
    return "tgi"


def check_error(dialect: str, error: object, body: object = None) -> None:
    """`error` is one error body of `dialect`'s shape, with a message that says something (a ModelError carries
    the container's reply to `body`, in /invocations' shape)."""
    assert isinstance(error, dict), f"error body is not an object: {error!r}"
    if dialect == "openai":
        assert set(error) == {"error"}, f"OpenAI errors hold `error` alone: {error}"
        inner = error["error"]
        assert isinstance(inner, dict) and set(inner) == {"message", "type", "param", "code"}, error
        assert isinstance(inner["message"], str) and inner["message"] and isinstance(inner["type"], str), error
        assert all(inner[key] is None or isinstance(inner[key], str) for key in ("param", "code")), error
    elif dialect == "tgi":
        assert set(error) == {"error", "error_type"}, f"TGI errors are {{error, error_type}}: {error}"
        assert isinstance(error["error"], str) and error["error"] and isinstance(error["error_type"], str), error
    else:
        assert {"ErrorCode", "Message", "OriginalMessage", "OriginalStatusCode"} <= set(error), error
        assert error["OriginalStatusCode"] < 500, f"the container answered a server error: {error}"
        check_error(error_dialect("/invocations", body), json.loads(error["OriginalMessage"]))


def event_schema(path: str, body: object) -> str:
    """The reply model each event of a route's SSE stream is documented as."""
    if path.startswith("/endpoints/"):
        path = "/invocations"  # the SageMaker runtime stand-in streams what the container's route does
    if path in ("/v1/chat/completions", "/invocations") and isinstance(body, dict) and "inputs" not in body:
        if path == "/v1/chat/completions" or "messages" in body:
            return "ChatCompletionChunk"
        return "Completion"
    return "Completion" if path == "/v1/completions" else "StreamResponse"


def stream_events(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, one per event (lines end at CR or LF only: a token's text may hold
    U+2028 and other breaks `str.splitlines` would split at)."""
    return [line[5:].strip() for line in re.split(r"\r\n|\r|\n", text) if line.startswith("data:")]


def is_stream(response) -> bool:
    """A server-sent event stream (schemathesis' response headers have lowercase keys and list values)."""
    return any("text/event-stream" in value for value in response.headers.get("content-type", []))


@schemathesis.check
def errors_in_the_route_shape(ctx, response, case) -> bool | None:
    """A 4xx reply, or an error event inside a 200 stream, is in the route's own error shape."""
    dialect = error_dialect(case.path, case.body)
    SEEN[f"{response.status_code // 100}xx"] += 1
    if response.status_code >= 400:
        check_error(dialect, response.json(), case.body)
        SEEN[f"{dialect} error"] += 1
    elif is_stream(response):
        for data in stream_events(response.text):
            event = None if data == "[DONE]" else json.loads(data)
            if isinstance(event, dict) and "error" in event:
                check_error(dialect, event)
                SEEN[f"{dialect} error event"] += 1
    return True


@schemathesis.check
def stream_events_as_documented(ctx, response, case) -> bool | None:
    """Each event of a 200 SSE stream is the reply model the document names for it (an error event, checked
    above, ends it); OpenAI streams end with `[DONE]`. schemathesis reads a `text/event-stream` schema as one
    event's, while the document (OpenAPI 3.1) describes the body as a whole, so events are checked here."""
    if response.status_code != 200 or not is_stream(response):
        return None
    document = case.operation.schema.raw_schema
    name = event_schema(case.path, case.body)
    validator = jsonschema.Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    )
    events = stream_events(response.text)
    assert events, "an empty stream"
    openai = name != "StreamResponse"
    if openai and not response.stream_cut_short:
        assert events[-1] == "[DONE]", f"the stream does not end with [DONE]: {events[-3:]}"
    events = [data for data in events if data != "[DONE]"]
    for index, data in enumerate(events):
        event = json.loads(data)
        if "error" in event:
            assert index == len(events) - 1, f"events after an error event: {events[index:]}"
            continue
        errors = sorted(validator.iter_errors(event), key=str)
        assert not errors, f"{name} event {event} is not as documented: {errors[0].message}"
    SEEN[f"{name} stream"] += 1
    return True


def _cap(container: dict, key: str, most: int) -> None:
    value = container.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value > most:
        container[key] = most


def keep_generation_short(body: object) -> None:
    """Lower a valid body's generation lengths and counts to the caps. (Invalid bodies are sent as generated:
    they are refused before any generation, and MAX_TOTAL_TOKENS bounds one that is not.)"""
    if not isinstance(body, dict):
        return
    for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
        _cap(body, key, MAX_NEW_TOKENS)
    for key in ("n", "best_of"):
        _cap(body, key, MAX_CHOICES)
    if isinstance(body.get("prompt"), list) and len(body["prompt"]) > MAX_CHOICES:
        body["prompt"] = body["prompt"][:MAX_CHOICES]
    parameters = body.get("parameters")
    if isinstance(parameters, dict):
        _cap(parameters, "max_new_tokens", MAX_NEW_TOKENS)
        _cap(parameters, "best_of", MAX_CHOICES)


CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": MAX_NEW_TOKENS}
COMPLETION = {"prompt": "Hi", "max_tokens": MAX_NEW_TOKENS}
TGI = {"inputs": "Hi", "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "details": True}}
STREAMING = ("/", "/v1/chat/completions", "/v1/completions", "/invocations", "/endpoints/{endpoint_name}/invocations")


def known_good_bodies(path: str) -> list[dict]:
    """Valid bodies of each shape a route takes, streamed too where it can stream: every reply and stream kind
    is checked even when the generated bodies (mostly refused) reach none of them."""
    if path in ("/v1/chat/completions", "/chat_tokenize"):
        bodies = [CHAT]
    elif path == "/v1/completions":
        bodies = [COMPLETION]
    elif path in ("/", "/generate", "/generate_stream", "/tokenize"):
        bodies = [TGI]
    else:  # the SageMaker routes take all three
        bodies = [CHAT, COMPLETION, TGI]
    if path.removesuffix("-response-stream") in STREAMING:
        bodies += [{**body, "stream": True} for body in bodies]
    return bodies


def validate(case, response) -> None:
    """The documented checks plus this module's (schemathesis' per-event reading of an SSE schema left out)."""
    case.validate_response(
        response,
        additional_checks=[errors_in_the_route_shape, stream_events_as_documented],
        excluded_checks=[response_schema_conformance] if is_stream(response) else None,
    )


def check_known_good(operation) -> None:
    """Each known-good body is answered 200, as documented."""
    for body in known_good_bodies(operation.path):
        params = {"endpoint_name": "contract"} if "{endpoint_name}" in operation.path else None
        case = operation.Case(body=body, media_type="application/json", path_parameters=params)
        response = case.call()
        assert response.status_code == 200, (body, response.status_code, response.text[:500])
        validate(case, response)


def check_operation(operation, mode: GenerationMode) -> int:
    """Send `mode`'s generated requests to one operation and check every reply; returns how many were sent."""
    sent = 0

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        report_multiple_bugs=False,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        nonlocal sent
        if mode is GenerationMode.POSITIVE:
            keep_generation_short(case.body)
        sent += 1
        validate(case, case.call())

    run()
    return sent


def test_every_route_keeps_its_documented_contract(api_schema, subtests):
    """Every operation of the document, with valid and with invalid requests (a subtest each)."""
    SEEN.clear()
    operations = [result.ok() for result in api_schema.get_all_operations()]
    documented = {
        f"{method.upper()} {path}" for path, item in api_schema.raw_schema["paths"].items() for method in item
    }
    # schemathesis leaves out the route it read the document from (which has just answered it)
    assert {operation.label for operation in operations} == documented - {"GET /openapi.json"}
    for operation in operations:
        if operation.method.upper() == "POST":
            with subtests.test(msg=f"{operation.label} (known good)"):
                check_known_good(operation)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            with subtests.test(msg=f"{operation.label} ({mode.value})"):
                try:
                    check_operation(operation, mode)
                except hypothesis.errors.Unsatisfiable:
                    if mode is GenerationMode.POSITIVE:
                        raise
                    # nothing to make invalid: no body, and parameters (a path's string) that take anything
    # The run reached what it is for: replies, errors of each shape, streams of each kind.
    wanted = ("2xx", "4xx", "openai error", "tgi error", "sagemaker error", "ChatCompletionChunk stream")
    wanted += ("Completion stream", "StreamResponse stream")
    assert all(SEEN[name] for name in wanted), str(dict(SEEN))
