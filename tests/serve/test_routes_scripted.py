"""Route behaviour for outcomes chosen token by token: EOS, stop strings, split characters, engine failures,
disconnects, several choices. The engine is scripted (see scripted_engine.py); the rest of the path is real."""
from __future__ import annotations

import json

from model_handler.request import FinishReason
from tests.openai_schema import validate
from tests.serve.scripted_engine import ScriptedEngine, dead_after, outputs_for

MESSAGES = [{"role": "user", "content": "hi"}]
EOS = 2


def _frames(reply) -> list[str]:
    raw = reply.get_data(as_text=True)
    assert raw.endswith("\n\n")
    return [frame.removeprefix("data: ") for frame in raw.split("\n\n") if frame]


def _chunks(reply) -> list[dict]:
    frames = _frames(reply)
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    for chunk in chunks:
        if "error" not in chunk:
            validate(chunk, "CreateChatCompletionStreamResponse")
    return chunks


def _engine_with(scripted: ScriptedEngine, script) -> ScriptedEngine:
    return ScriptedEngine(scripted.info, script)


def test_tgi_details_on_eos(scripted, make_client):
    body = {"inputs": "hi", "parameters": {"details": True, "max_new_tokens": 50}}
    reply = make_client(scripted).post("/generate", json=body).get_json()
    details = reply["details"]
    assert reply["generated_text"] == "Hello world! This is a test."
    assert details["finish_reason"] == "eos_token" and details["seed"] is None and details["prefill"] == []
    assert details["generated_tokens"] == len(details["tokens"])
    assert details["tokens"][-1] == {"id": EOS, "text": "<|im_end|>", "logprob": -0.25, "special": True}
    assert "top_tokens" not in details and "best_of_sequences" not in details
    assert "".join(t["text"] for t in details["tokens"][:-1]) == reply["generated_text"]


def test_tgi_sampling_reports_the_seed_it_drew(scripted, make_client):
    client = make_client(scripted)
    reply = client.post("/generate", json={"inputs": "hi", "parameters": {"do_sample": True, "details": True}})
    seed = reply.get_json()["details"]["seed"]
    assert isinstance(seed, int) and scripted.submitted[0].sampling_params.seed == seed
    assert scripted.submitted[0].sampling_params.temperature == 1.0
    reply = client.post("/generate", json={"inputs": "hi", "parameters": {"details": True}})
    assert reply.get_json()["details"]["seed"] is None and scripted.submitted[1].sampling_params.temperature == 0.0


def test_tgi_stream_events(scripted, make_client):
    body = {"inputs": "hi", "parameters": {"details": True, "top_n_tokens": 2}}
    reply = make_client(scripted).post("/generate_stream", json=body)
    assert reply.headers["Content-Type"] == "text/event-stream" and reply.headers["X-Accel-Buffering"] == "no"
    events = [json.loads(f) for f in _frames(reply)]
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert all(len(e["top_tokens"]) == 2 for e in events)
    last = events[-1]
    assert last["token"]["special"] is True and last["generated_text"] == "Hello world! This is a test."
    assert last["details"] == {
        "finish_reason": "eos_token",
        "generated_tokens": len(events),
        "seed": None,
        "input_length": len(scripted.submitted[0].prompt_token_ids),
    }
    assert list(events[0]) == ["index", "token", "top_tokens", "generated_text", "details"]


def test_tgi_stop_sequence_is_kept_and_aborts_the_engine_request(scripted, make_client):
    body = {"inputs": "hi", "parameters": {"stop": ["rld!"], "details": True}}
    reply = make_client(scripted).post("/generate", json=body).get_json()
    assert reply["generated_text"] == "Hello world!"
    assert reply["details"]["finish_reason"] == "stop_sequence"
    assert scripted.aborted == [scripted.submitted[0].request_id]


def test_openai_stop_spanning_tokens_is_excluded_in_both_modes(scripted, make_client):
    client = make_client(scripted)
    body = {"messages": MESSAGES, "stop": ["world! Th"]}  # spans the tokens " wor", "ld", "!", " This"
    reply = client.post("/v1/chat/completions", json=body).get_json()
    assert reply["choices"][0]["message"]["content"] == "Hello "
    assert reply["choices"][0]["finish_reason"] == "stop"
    chunks = _chunks(client.post("/v1/chat/completions", json={**body, "stream": True}))
    contents = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert "".join(contents) == "Hello " and not any("w" in piece for piece in contents)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert len(scripted.aborted) == 2


def test_split_character_never_streams_a_replacement_char(scripted, make_client, tokenizer):
    ids = tokenizer.encode("a😀b 日本", add_special_tokens=False)
    engine = _engine_with(scripted, lambda req: outputs_for(req, ids + [EOS], FinishReason.EOS))
    client = make_client(engine)
    chunks = _chunks(client.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True}))
    contents = [c["choices"][0]["delta"].get("content") for c in chunks]
    assert "".join(c or "" for c in contents) == "a😀b 日本"
    assert not any("\ufffd" in (c or "") for c in contents)
    events = [json.loads(f) for f in _frames(client.post("/generate_stream", json={"inputs": "x"}))]
    assert [e["token"]["text"] for e in events[:5]] == ["a", "", "", "", "😀"]


def test_engine_error_mid_generation(scripted, make_client):
    engine = _engine_with(scripted, lambda req: outputs_for(req, [43, 72], error="CUDA out of memory"))
    client = make_client(engine)
    reply = client.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert reply.status_code == 500 and "CUDA out of memory" in reply.get_json()["error"]["message"]
    reply = client.post("/generate", json={"inputs": "x"})
    assert reply.status_code == 424 and reply.get_json() == {
        "error": "Request failed during generation: CUDA out of memory",
        "error_type": "generation",
    }
    chunks = _chunks(client.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True}))
    assert "CUDA out of memory" in chunks[-1]["error"]["message"]
    validate(chunks[-1], "ErrorResponse")
    frames = _frames(client.post("/generate_stream", json={"inputs": "x"}))
    assert json.loads(frames[-1]) == {
        "error": "Request failed during generation: CUDA out of memory",
        "error_type": "generation",
    }


def test_engine_death_mid_stream_ends_with_an_error_event(scripted, make_client):
    client = make_client(_engine_with(scripted, dead_after([43, 72, 3970])))
    chunks = _chunks(client.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True}))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "Hello"
    assert "stopped responding" in chunks[-1]["error"]["message"]
    reply = client.post("/generate", json={"inputs": "x"})
    assert reply.status_code == 424 and reply.get_json()["error_type"] == "generation"
    assert client.get("/ping").status_code == 200  # the worker keeps serving; /ping follows the heartbeat


def test_client_disconnect_aborts_the_engine_request(scripted, make_client):
    client = make_client(scripted)
    state = client.application.extensions["serve"]
    reply = client.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True}, buffered=False)
    stream = iter(reply.response)
    assert b'"role":"assistant"' in next(stream)
    assert next(stream).startswith(b"data: ")
    assert state.num_in_flight == 1
    reply.close()
    assert scripted.aborted == [scripted.submitted[0].request_id]
    assert state.num_in_flight == 0


def test_several_choices_with_derived_seeds(scripted, make_client):
    client = make_client(scripted)
    body = {"messages": MESSAGES, "n": 3, "seed": 7, "temperature": 0.8, "max_tokens": 3}
    reply = client.post("/v1/chat/completions", json=body).get_json()
    validate(reply, "CreateChatCompletionResponse")
    assert [s.sampling_params.seed for s in scripted.submitted] == [7, 8, 9]
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    num_prompt = len(scripted.submitted[0].prompt_token_ids)
    assert reply["usage"]["prompt_tokens"] == num_prompt and reply["usage"]["completion_tokens"] == 9
    chunks = _chunks(client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert len({c["id"] for c in chunks}) == 1
    for index in range(3):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(m["delta"].get("content", "") for m in mine) == "Hello"
        assert mine[-1]["finish_reason"] == "length"


def test_logprobs_with_bytes_validate(scripted, make_client):
    client = make_client(scripted)
    body = {"messages": MESSAGES, "logprobs": True, "top_logprobs": 2, "max_tokens": 4}
    reply = client.post("/v1/chat/completions", json=body).get_json()
    validate(reply, "CreateChatCompletionResponse")
    content = reply["choices"][0]["logprobs"]["content"]
    assert [bytes(c["bytes"]).decode() for c in content] == ["H", "e", "llo", " wor"]
    assert all(len(c["top_logprobs"]) == 2 for c in content)
    assert scripted.submitted[0].sampling_params.logprobs == 2
    chunks = _chunks(client.post("/v1/chat/completions", json={**body, "stream": True}))
    streamed = [e for c in chunks for e in (c["choices"][0]["logprobs"] or {}).get("content", [])]
    assert streamed == content


def test_completions_batch_of_prompts(scripted, make_client):
    client = make_client(scripted)
    body = {"prompt": ["one", "two words"], "n": 2, "max_tokens": 2, "echo": True}
    reply = client.post("/v1/completions", json=body).get_json()
    validate(reply, "CreateCompletionResponse")
    assert [c["text"] for c in reply["choices"]] == ["oneHe", "oneHe", "two wordsHe", "two wordsHe"]
    assert reply["usage"]["prompt_tokens"] == sum(len(s.prompt_token_ids) for s in scripted.submitted[::2])
    too_many = client.post("/v1/completions", json={"prompt": ["a"] * 5})
    assert too_many.status_code == 400 and "maximum allowed batch size of 4" in too_many.get_json()["error"]["message"]


def test_tgi_best_of_returns_the_best_mean_logprob(scripted, make_client):
    def script(request):
        outputs = outputs_for(request, [43, 72], FinishReason.LENGTH)
        for output in outputs:
            for lp in output.new_logprobs:
                lp.logprob = -0.1 if request.request_id.split("-")[-2] == "1" else -3.0
        return outputs

    client = make_client(_engine_with(scripted, script))
    body = {"inputs": "x", "parameters": {"best_of": 2, "do_sample": True, "details": True}}
    details = client.post("/generate", json=body).get_json()["details"]
    assert details["tokens"][0]["logprob"] == -0.1
    assert len(details["best_of_sequences"]) == 1 and details["best_of_sequences"][0]["tokens"][0]["logprob"] == -3.0


def test_unexpected_exception_is_a_json_500(scripted, make_client):
    def broken(request):
        raise RuntimeError("boom")

    client = make_client(_engine_with(scripted, broken))
    reply = client.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert reply.status_code == 500 and reply.get_json()["error"]["type"] == "server_error"
    reply = client.post("/generate", json={"inputs": "x"})
    assert reply.status_code == 500 and set(reply.get_json()) == {"error", "error_type"}
    assert client.application.extensions["serve"].num_in_flight == 0
