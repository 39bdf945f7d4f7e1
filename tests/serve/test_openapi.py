"""GET /openapi.json describes every route exactly (bodies from the request models, replies and errors that real
replies validate against), and GET /docs renders it with files served from the package, nothing from outside."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from openapi_spec_validator import validate as validate_spec

from serve.app import create_app
from serve.schemas_openai import ChatCompletionRequest, CompletionRequest
from serve.schemas_tgi import GenerateParameters, GenerateRequest
from serve.settings import Settings

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture()
def client(scripted, make_client):
    return make_client(scripted)


@pytest.fixture()
def document(client) -> dict:
    reply = client.get("/openapi.json")
    assert reply.status_code == 200 and reply.mimetype == "application/json"
    return reply.get_json()


def test_the_document_is_valid_openapi_3_1(document):
    assert document["openapi"].startswith("3.1")
    validate_spec(document)


def test_every_route_is_documented_and_nothing_else(document, scripted):
    app = create_app(Settings(), scripted)
    routes = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        routes |= {(path, method.lower()) for method in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {(path, method) for path, operations in document["paths"].items() for method in operations}
    assert documented == routes


def test_request_schemas_are_the_models_that_validate(document):
    schemas = document["components"]["schemas"]
    for model in (ChatCompletionRequest, CompletionRequest, GenerateRequest, GenerateParameters):
        assert set(schemas[model.__name__]["properties"]) == set(model.model_fields)
    assert schemas["ChatCompletionRequest"]["properties"]["top_logprobs"]["maximum"] == 20
    assert schemas["GenerateParameters"]["properties"]["top_n_tokens"]["maximum"] == 5  # MAX_TOP_N_TOKENS
    assert schemas["ChatCompletionRequest"]["required"] == ["messages"]


def _check(document: dict, method: str, path: str, reply, event_schema: str | None = None) -> None:
    """The reply's status and media type are documented for the operation, and its body matches the schema."""
    responses = document["paths"][path][method]["responses"]
    assert str(reply.status_code) in responses, (path, reply.status_code, reply.data[:300])
    content = responses[str(reply.status_code)].get("content", {})
    if not content:  # documented without a body
        assert reply.data == b""
        return
    media_type = reply.mimetype
    assert media_type in content, (path, media_type, list(content))
    components = {"components": document["components"]}
    text = reply.get_data(as_text=True)
    if media_type == "application/json":
        jsonschema.Draft202012Validator({**content[media_type]["schema"], **components}).validate(json.loads(text))
    elif media_type == "text/event-stream":
        events = [f.removeprefix("data: ") for f in text.split("\n\n") if f and f != "data: [DONE]"]
        validator = jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{event_schema}", **components})
        error_validator = jsonschema.Draft202012Validator(
            {
                "oneOf": [{"$ref": "#/components/schemas/OpenAIError"}, {"$ref": "#/components/schemas/TgiError"}],
                **components,
            }
        )
        assert events
        for event in events:
            body = json.loads(event)
            (error_validator if "error" in body else validator).validate(body)


CASES = [
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 5, "logprobs": True, "top_logprobs": 2}, None),
    (
        "/v1/chat/completions",
        {
            "messages": MESSAGES,
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
        "ChatCompletionChunk",
    ),
    ("/v1/completions", {"prompt": "hi there", "max_tokens": 4, "echo": True, "logprobs": 2}, None),
    ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 0, "echo": True, "logprobs": 1}, None),
    ("/v1/completions", {"prompt": "hi", "stream": True, "echo": True, "logprobs": 1}, "Completion"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": 9}, None),
    ("/v1/chat/completions", {"messages": MESSAGES, "model": "lora"}, None),
    ("/v1/completions", {"prompt": ""}, None),
    (
        "/generate",
        {
            "inputs": "hi there",
            "parameters": {
                "details": True,
                "decoder_input_details": True,
                "top_n_tokens": 2,
                "best_of": 2,
                "do_sample": True,
            },
        },
        None,
    ),
    ("/generate_stream", {"inputs": "hi", "parameters": {"details": True, "top_n_tokens": 1}}, "StreamResponse"),
    ("/", {"inputs": "hi"}, None),
    ("/", {"inputs": "hi", "stream": True}, "StreamResponse"),
    ("/generate", {"inputs": "hi", "parameters": {"watermark": True}}, None),
    ("/generate", {"inputs": ""}, None),
    ("/tokenize", {"inputs": "hi there"}, None),
    ("/chat_tokenize", {"messages": MESSAGES}, None),
    ("/invocations", {"messages": MESSAGES, "max_tokens": 3}, None),
    ("/invocations", {"prompt": "hi", "max_tokens": 3}, None),
    ("/invocations", {"inputs": "hi", "parameters": {"max_new_tokens": 3}}, None),
    ("/invocations", {"messages": MESSAGES, "max_tokens": 3, "stream": True}, "ChatCompletionChunk"),
    ("/invocations", {"messages": MESSAGES, "max_tokens": -3}, None),
    ("/invocations", {"inputs": "hi", "parameters": {"top_k": -3}}, None),
    ("/endpoints/{endpoint_name}/invocations", {"inputs": "hi", "parameters": {"max_new_tokens": 3}}, None),
    ("/endpoints/{endpoint_name}/invocations", {"inputs": "hi", "parameters": {"top_k": -3}}, None),
]


@pytest.mark.parametrize("path, body, event_schema", CASES)
def test_replies_and_errors_match_the_document(client, document, path, body, event_schema):
    reply = client.post(path.replace("{endpoint_name}", "local"), json=body)
    _check(document, "post", path, reply, event_schema)


def test_other_replies_match_the_document(client, document):
    for path in ("/info", "/v1/models", "/ping", "/health", "/", "/metrics"):
        _check(document, "get", path, client.get(path))
    _check(
        document,
        "post",
        "/v1/chat/completions",
        client.post("/v1/chat/completions", data="{}", content_type="text/plain"),
    )
    _check(document, "post", "/generate", client.post("/generate", data="{", content_type="application/json"))


def test_a_not_ready_engine_is_documented(scripted, make_client, document):
    scripted.ready = False
    client = make_client(scripted)
    _check(document, "post", "/v1/chat/completions", client.post("/v1/chat/completions", json={"messages": MESSAGES}))
    _check(document, "get", "/ping", client.get("/ping"))


def test_docs_render_the_document_from_packaged_files(client):
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "/openapi.json" in html and "http" not in html  # nothing from a CDN
    for asset in re.findall(r'(?:src|href)="(/docs/[^"]+)"', html):
        reply = client.get(asset)
        assert reply.status_code == 200 and len(reply.data) > 1000, asset
    assert "SwaggerUIBundle" in client.get("/docs/swagger-ui-bundle.js").get_data(as_text=True)
    assert client.get("/docs/../setup.cfg").status_code == 404


def test_docs_need_no_api_key(scripted, make_client):
    client = make_client(scripted, {"API_KEY": "secret"})
    assert client.get("/openapi.json").status_code == 200 and client.get("/docs").status_code == 200
    assert client.post("/generate", json={"inputs": "hi"}).status_code == 401
