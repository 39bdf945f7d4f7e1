"""The TGI routes end to end on a real engine process with the tiny model: details and finish reasons, stream
events, reported seeds, stop sequences and best_of.

Where an outcome depends on what the random model says, the test learns the greedy output first, or uses a
prompt whose greedy output is known (found by running the model, see EOS_INPUTS).
"""

from __future__ import annotations

import json

from tests.serve.helpers import sse_frames

EOS = 2
EOS_INPUTS, EOS_TEXT, EOS_STOP = "entere is\x12 nowlike", "press|raisesweak ignored grouping", "raises"
"""The embedded tiny model's greedy reply to EOS_INPUTS: six tokens of EOS_TEXT, then EOS (found by running the
model greedily on many short prompts until one ended in EOS, then cutting the prompt to leave six tokens; rebuilding
the model with other weights or another tokenizer means finding another). EOS_STOP is a word inside it."""


def _events(reply) -> list[dict]:
    return [json.loads(frame) for frame in sse_frames(reply)]


def test_tgi_details_on_eos(live_client):
    body = {"inputs": EOS_INPUTS, "parameters": {"details": True, "max_new_tokens": 50}}
    reply = live_client().post("/generate", json=body).get_json()
    details = reply["details"]
    assert reply["generated_text"] == EOS_TEXT
    assert details["finish_reason"] == "eos_token" and details["seed"] is None and details["prefill"] == []
    assert details["generated_tokens"] == len(details["tokens"]) == 7
    last = details["tokens"][-1]
    assert (last["id"], last["text"], last["special"]) == (EOS, "<|im_end|>", True) and last["logprob"] <= 0
    assert "top_tokens" not in details and "best_of_sequences" not in details
    assert "".join(t["text"] for t in details["tokens"][:-1]) == reply["generated_text"]
    assert not any(t["special"] for t in details["tokens"][:-1])


def test_tgi_finish_reasons_length_and_stop_sequence(live_client):
    client = live_client()
    parameters = {"details": True, "max_new_tokens": 3}
    reply = client.post("/generate", json={"inputs": EOS_INPUTS, "parameters": parameters}).get_json()
    assert reply["details"]["finish_reason"] == "length" and reply["details"]["generated_tokens"] == 3
    assert EOS_TEXT.startswith(reply["generated_text"])
    parameters = {"details": True, "max_new_tokens": 50, "stop": [EOS_STOP]}
    reply = client.post("/generate", json={"inputs": EOS_INPUTS, "parameters": parameters}).get_json()
    assert reply["details"]["finish_reason"] == "stop_sequence"
    assert reply["generated_text"] == EOS_TEXT[: EOS_TEXT.index(EOS_STOP) + len(EOS_STOP)]


def test_tgi_generate_and_stream_agree(live_client):
    client = live_client()
    body = {"inputs": "Deep learning is", "parameters": {"max_new_tokens": 5, "details": True}}
    reply = client.post("/generate", json=body).get_json()
    details = reply["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 5 and details["seed"] is None
    events = _events(client.post("/generate_stream", json=body))
    assert [e["token"]["id"] for e in events] == [t["id"] for t in details["tokens"]]
    assert events[-1]["generated_text"] == reply["generated_text"]
    assert events[-1]["details"]["input_length"] > 0
    full = client.post("/invocations", json=body).get_json()
    assert full == [{"generated_text": "Deep learning is" + reply["generated_text"], "details": details}]


def test_tgi_stream_events(live_client, tokenizer):
    body = {"inputs": EOS_INPUTS, "parameters": {"details": True, "top_n_tokens": 2}}
    reply = live_client().post("/generate_stream", json=body)
    assert reply.headers["Content-Type"] == "text/event-stream" and reply.headers["X-Accel-Buffering"] == "no"
    events = _events(reply)
    assert [e["index"] for e in events] == list(range(1, 8))
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert all(len(e["top_tokens"]) == 2 for e in events)
    # greedy: each token is its step's most likely one
    assert all(e["top_tokens"][0]["id"] == e["token"]["id"] for e in events)
    assert "".join(e["token"]["text"] for e in events[:-1]) == EOS_TEXT
    last = events[-1]
    assert (last["token"]["id"], last["token"]["text"], last["token"]["special"]) == (EOS, "<|im_end|>", True)
    assert last["generated_text"] == EOS_TEXT
    assert last["details"] == {
        "finish_reason": "eos_token",
        "generated_tokens": 7,
        "seed": None,
        "input_length": len(tokenizer.encode(EOS_INPUTS, add_special_tokens=True)),
    }
    assert list(events[0]) == ["index", "token", "top_tokens", "generated_text", "details"]


def test_tgi_sampling_reports_the_seed_it_drew(live_client):
    client = live_client()
    sampled = {"inputs": "Deep learning is", "parameters": {"do_sample": True, "details": True, "max_new_tokens": 8}}
    first = client.post("/generate", json=sampled).get_json()
    seed = first["details"]["seed"]
    assert isinstance(seed, int)
    # The reported seed is the one the engine sampled with: asking for it gives the same text back.
    replay = {**sampled, "parameters": {**sampled["parameters"], "seed": seed}}
    again = client.post("/generate", json=replay).get_json()
    assert again["generated_text"] == first["generated_text"] and again["details"]["seed"] == seed
    greedy = {"inputs": "Deep learning is", "parameters": {"details": True, "max_new_tokens": 8}}
    plain = client.post("/generate", json=greedy).get_json()
    assert plain["details"]["seed"] is None and plain["generated_text"] != first["generated_text"]


def test_tgi_stop_sequence_is_kept_and_aborts_the_engine_request(live_client, live_engine_client):
    client = live_client()
    learned = client.post("/generate", json={"inputs": "Deep learning is", "parameters": {"max_new_tokens": 12}})
    text = learned.get_json()["generated_text"]
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    assert len(stop) == 4
    body = {"inputs": "Deep learning is", "parameters": {"stop": [stop], "details": True, "max_new_tokens": 1500}}
    reply = client.post("/generate", json=body).get_json()
    assert reply["generated_text"] == text[: text.index(stop) + len(stop)]
    assert reply["details"]["finish_reason"] == "stop_sequence" and reply["details"]["generated_tokens"] < 12
    assert live_engine_client.num_in_flight == 0  # aborted, not left to generate 1500 tokens


def test_tgi_best_of_returns_the_best_mean_logprob(live_client):
    client = live_client({"MAX_BEST_OF": "4"})
    body = {
        "inputs": "Deep learning is",
        "parameters": {"best_of": 4, "do_sample": True, "details": True, "max_new_tokens": 4},
    }
    for _ in range(3):  # the seeds are drawn at random: a first-come pick would rarely be the best three times
        reply = client.post("/generate", json=body).get_json()
        details = reply["details"]
        others = details["best_of_sequences"]
        assert len(others) == 3 and len({d["seed"] for d in [details, *others]}) == 4

        def mean(sequence: dict) -> float:
            return sum(t["logprob"] for t in sequence["tokens"]) / len(sequence["tokens"])

        assert all(mean(details) >= mean(other) for other in others)
