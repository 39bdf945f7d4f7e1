"""Health, /info, /v1/models, /metrics, /tokenize, request ids, CORS and the per-request JSON log line."""

from __future__ import annotations

import logging

import gevent

from serve.tokenizer import OFFLOAD_CHARS
from tests.openai_schema import validate


def test_health_routes(scripted, make_client):
    client = make_client(scripted)
    for path in ("/ping", "/health", "/"):
        reply = client.get(path)
        assert reply.status_code == 200 and reply.data == b""
    scripted.ready = False
    reply = client.get("/ping")
    assert reply.status_code == 503 and reply.get_json() == {"error": "unhealthy", "error_type": "healthcheck"}


def test_health_without_an_engine_address_is_503():
    from serve.app import create_app
    from serve.settings import Settings

    client = create_app(Settings()).test_client()
    assert client.get("/ping").status_code == 503


def test_info_and_models(scripted, make_client):
    client = make_client(scripted.with_limits(1024), {"SERVED_MODEL_NAME": "my-llm"})
    info = client.get("/info").get_json()
    assert info["model_id"] == "my-llm" and info["router"] == "text-generation-router"
    assert (info["max_input_tokens"], info["max_total_tokens"]) == (1023, 1024)
    assert (info["max_best_of"], info["max_stop_sequences"], info["max_client_batch_size"]) == (2, 4, 4)
    assert info["max_concurrent_requests"] == 128 and info["model_pipeline_tag"] == "text-generation"
    models = client.get("/v1/models").get_json()
    validate(models, "ListModelsResponse")
    assert models["data"][0]["id"] == "my-llm"


def test_tokenize_gives_byte_offsets(scripted, make_client, tokenizer):
    client = make_client(scripted)
    tokens = client.post("/tokenize", json={"inputs": "é😀"}).get_json()
    assert [t["id"] for t in tokens] == tokenizer.encode("é😀", add_special_tokens=True)
    assert tokens[0]["start"] == 0 and tokens[-1]["stop"] == len("é😀".encode())
    # Every token's offsets, against counting the UTF-8 bytes of the text before it; the multi-byte characters
    # split into several byte-level tokens that share one character's span.
    text = "héllo wörld, 日本語 😀😀 and plain ascii " * 3
    encoding = tokenizer.backend.encode(text, add_special_tokens=True)
    expected = [
        {"id": i, "text": text[a:b], "start": len(text[:a].encode()), "stop": len(text[:b].encode())}
        for i, (a, b) in zip(encoding.ids, encoding.offsets, strict=True)
    ]
    offsets = encoding.offsets
    assert any(after[0] < before[1] for before, after in zip(offsets, offsets[1:]))  # spans that step back
    assert client.post("/tokenize", json={"inputs": text}).get_json() == expected
    chat = client.post("/chat_tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).get_json()
    assert chat["templated_text"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert [t["id"] for t in chat["tokenize_response"]] == tokenizer.encode(chat["templated_text"], False)


def test_tokenize_routes_need_the_api_key_like_the_others(scripted, make_client):
    client = make_client(scripted, {"API_KEY": "k"})
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for path, body in (("/tokenize", {"inputs": "hi"}), ("/chat_tokenize", chat)):
        refused = client.post(path, json=body)
        assert refused.status_code == 401 and refused.get_json()["error_type"] == "unauthorized"
        assert client.post(path, json=body, headers={"Authorization": "Bearer k"}).status_code == 200


def test_tokenize_routes_hold_texts_to_the_prompt_limits(scripted, make_client, tokenizer):
    """The limit a prompt has on /generate (MAX_INPUT_TOKENS, after `truncate`): a text past it is refused before
    any per-token work, so a reply never holds more tokens than a prompt could."""
    client = make_client(scripted.with_limits(200, max_input_tokens=100))
    text = "héllo wörld, 日本語 " * 40  # more than 100 tokens
    ids = tokenizer.encode(text, add_special_tokens=True)
    assert len(ids) > 100
    refused = client.post("/tokenize", json={"inputs": text})
    assert refused.status_code == 422 and refused.get_json() == {
        "error": f"Input validation error: `inputs` must have less than 100 tokens. Given: {len(ids)}",
        "error_type": "validation",
    }
    kept = client.post("/tokenize", json={"inputs": text, "parameters": {"truncate": 60}}).get_json()
    assert [t["id"] for t in kept] == ids[-60:]  # the tokens /generate would keep, with their offsets in the text
    assert all(t["text"] == text.encode()[t["start"] : t["stop"]].decode() for t in kept if t["text"].isascii())
    assert client.post("/tokenize", json={"inputs": "x", "parameters": {"truncate": 101}}).status_code == 422
    chat = {"messages": [{"role": "user", "content": text}]}
    assert client.post("/chat_tokenize", json=chat).status_code == 422


def test_a_long_tokenize_reply_built_in_the_thread_pool_has_every_offset_right(scripted, make_client, tokenizer):
    from serve.routes import OFFLOAD_TOKENS

    client = make_client(scripted.with_limits(8192))
    text = "héllo wörld, tokenizers " * 300
    encoding = tokenizer.backend.encode(text, add_special_tokens=True)
    assert OFFLOAD_TOKENS <= len(encoding.ids) < 8191
    tokens = client.post("/tokenize", json={"inputs": text}).get_json()
    expected = [
        {"id": i, "text": text[a:b], "start": len(text[:a].encode()), "stop": len(text[:b].encode())}
        for i, (a, b) in zip(encoding.ids, encoding.offsets, strict=True)
    ]
    assert tokens == expected


def test_metrics_use_tgi_names_and_count_outcomes(scripted, make_client):
    client = make_client(scripted)
    client.post("/generate", json={"inputs": "hi"}, buffered=True)
    client.post("/generate", json={"inputs": ""}, buffered=True)
    text = client.get("/metrics").get_data(as_text=True)
    assert "tgi_request_count 2.0" in text
    assert "tgi_request_success 1.0" in text
    assert 'tgi_request_failure{err="validation"} 1.0' in text
    assert "tgi_request_generated_tokens_count 1.0" in text
    assert "tgi_queue_size 0.0" in text and "tgi_request_duration_bucket" in text


def test_request_id_header_and_one_log_line_per_request(scripted, make_client, caplog):
    client = make_client(scripted)
    body = {"messages": [{"role": "user", "content": "x"}]}
    with caplog.at_level(logging.INFO, logger="serve.access"):
        reply = client.post("/v1/chat/completions", json=body, buffered=True)
    request_id = reply.headers["X-Request-Id"]
    assert len(request_id) == 32
    records = [r for r in caplog.records if r.name == "serve.access"]
    assert len(records) == 1
    record = records[0]
    assert record.request_id == request_id and record.route == "/v1/chat/completions" and record.status == 200
    assert record.prompt_tokens > 0 and record.completion_tokens == 12 and record.finish_reason == "eos"
    assert record.ttft_ms is not None and record.total_ms >= record.ttft_ms
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="serve.access"):
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True}, buffered=True)
    records = [r for r in caplog.records if r.name == "serve.access"]
    assert len(records) == 1 and records[0].request_id == streamed.headers["X-Request-Id"]
    assert records[0].stream is True and records[0].completion_tokens == 12


def test_cors_when_configured(scripted, make_client):
    client = make_client(scripted, {"CORS_ALLOW_ORIGIN": "https://app.example"})
    reply = client.get("/info", headers={"Origin": "https://app.example"})
    assert reply.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Access-Control-Allow-Origin" not in client.get("/info", headers={"Origin": "https://evil"}).headers
    preflight = client.options("/v1/chat/completions", headers={"Origin": "https://app.example"})
    assert preflight.status_code == 204 and "POST" in preflight.headers["Access-Control-Allow-Methods"]


def test_the_http_side_stays_torch_free_with_the_tokenizer_loaded(tiny_model_dir):
    import subprocess
    import sys

    code = (
        "import sys, serve.app\n"
        "from serve.tokenizer import TextTokenizer\n"
        f"t = TextTokenizer.load({str(tiny_model_dir)!r})\n"
        "t.decode(t.encode(t.apply_chat_template([{'role': 'user', 'content': 'hi'}]), False))\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_long_text_is_tokenized_without_stopping_the_other_greenlets(tokenizer):
    """Megabytes of prompt are tokenized in a native thread with the GIL released: the worker's other streams go
    on meanwhile (`Tokenizer.encode` would hold the hub for the whole encode)."""
    text = "héllo wörld, tokenizers " * 80_000  # ~2M characters
    assert len(text) >= OFFLOAD_CHARS
    ticks = []

    def other_stream() -> None:
        while True:
            ticks.append(1)
            gevent.sleep(0.002)

    ticker = gevent.spawn(other_stream)
    gevent.sleep(0.01)
    before = len(ticks)
    ids = tokenizer.encode(text, add_special_tokens=False)
    during = len(ticks) - before
    ticker.kill()
    assert ids == tokenizer.backend.encode(text, add_special_tokens=False).ids
    assert during >= 5, f"the hub ran other greenlets {during} times while tokenizing"
    offsets = tokenizer.encode_with_offsets(text[: OFFLOAD_CHARS + 10], add_special_tokens=True)
    assert [o[0] for o in offsets] == tokenizer.backend.encode(text[: OFFLOAD_CHARS + 10], add_special_tokens=True).ids
