"""Issue 17's fields on a real engine process with the tiny model: prompt logprobs (echo, lm-evaluation-harness's
loglikelihood request, TGI's decoder_input_details) against transformers, logit bias, stop token ids, min-p and
continuous usage stats."""

from __future__ import annotations

import json

import pytest
import torch

from tests.serve.helpers import openai_chunks, sse_frames

MESSAGES = [{"role": "user", "content": "What is deep learning?"}]
CHAT = "/v1/chat/completions"
TEXT = "The quick brown fox jumps over the lazy dog and keeps running"


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    """Asked for before live_client: loading blocks the gevent loop that reads the engine's heartbeats."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def hf_prompt_logprobs(hf_model, ids: list[int]) -> list[float]:
    """transformers' logprob of each prompt token after the first."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def _greedy_chat_ids(client, tokenizer, **extra) -> list[int]:
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "logprobs": True, "ignore_eos": True, **extra}
    reply = client.post(CHAT, json=body).get_json()
    return [
        tokenizer.encode(e["token"], add_special_tokens=False)[0] for e in reply["choices"][0]["logprobs"]["content"]
    ]


def test_echo_with_logprobs_scores_the_prompt_like_transformers(hf_model, live_client, tokenizer):
    client = live_client()
    ids = tokenizer.encode(TEXT, add_special_tokens=True)
    reply = client.post(
        "/v1/completions", json={"prompt": TEXT, "max_tokens": 3, "echo": True, "logprobs": 2}
    ).get_json()
    choice = reply["choices"][0]  # (OpenAI's schema says numbers, but its API and vLLM send the first one null)
    logprobs = choice["logprobs"]
    assert choice["text"].startswith(TEXT) and len(logprobs["tokens"]) == len(ids) + 3
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    expected = hf_prompt_logprobs(hf_model, ids)
    assert logprobs["token_logprobs"][1 : len(ids)] == pytest.approx(expected, abs=1e-3)
    assert all(len(top) == 2 for top in logprobs["top_logprobs"][1:])
    assert logprobs["text_offset"][: len(ids)] == sorted(logprobs["text_offset"][: len(ids)])
    assert reply["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("max_tokens", [1, 0])
def test_lm_evaluation_harness_loglikelihood_request(hf_model, live_client, tokenizer, max_tokens):
    """The body lm-eval's local-completions sends for loglikelihood, read the way its parse_logprobs reads it."""
    client = live_client()
    context = tokenizer.encode("Question: what do dogs chase? Answer:", add_special_tokens=True)
    continuation = tokenizer.encode(" cats", add_special_tokens=False)
    ids = context + continuation
    body = {"model": "tiny-llama", "prompt": [ids], "temperature": 0, "max_tokens": max_tokens, "logprobs": 1}
    body.update(seed=1234, echo=True)
    reply = client.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.data
    choice = reply.get_json()["choices"][0]
    token_logprobs, top_logprobs = choice["logprobs"]["token_logprobs"], choice["logprobs"]["top_logprobs"]
    assert len(token_logprobs) == len(ids) + max_tokens
    end = len(ids)  # lm-eval slices [ctxlen:-1]: the generated token (max_tokens 1) is last
    scored = token_logprobs[len(context) : end]
    expected = hf_prompt_logprobs(hf_model, ids)[len(context) - 1 :]
    assert sum(scored) == pytest.approx(sum(expected), abs=1e-3)
    is_greedy = all(lp == max(top.values()) for lp, top in zip(scored, top_logprobs[len(context) : end]))
    with torch.no_grad():
        argmax = hf_model(torch.tensor([ids])).logits[0, len(context) - 1 : -1].argmax(-1).tolist()
    assert is_greedy == (argmax == continuation)
    if max_tokens == 0:
        assert choice["finish_reason"] == "length" and choice["text"] == tokenizer.decode(ids, False)
        assert reply.get_json()["usage"]["completion_tokens"] == 0


def test_prompt_logprobs_ignore_a_cached_prefix_and_stream_with_the_echo(live_client, tokenizer):
    client = live_client()
    prompt = TEXT * 3  # several KV blocks
    client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})  # caches the prefix
    body = {"prompt": prompt, "max_tokens": 2, "echo": True, "logprobs": 0, "temperature": 0}
    first = client.post("/v1/completions", json=body).get_json()["choices"][0]
    again = client.post("/v1/completions", json=body).get_json()["choices"][0]
    assert first["logprobs"]["token_logprobs"] == pytest.approx(again["logprobs"]["token_logprobs"], abs=1e-5)
    frames = sse_frames(client.post("/v1/completions", json={**body, "stream": True}))
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(frame) for frame in frames[:-1]]
    streamed = [lp for c in chunks for lp in c["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed == pytest.approx(first["logprobs"]["token_logprobs"], abs=1e-5)
    assert "".join(c["choices"][0]["text"] for c in chunks) == first["text"]


def test_decoder_input_details_is_tgis_prefill(hf_model, live_client, tokenizer):
    client = live_client()
    body = {"inputs": TEXT, "parameters": {"max_new_tokens": 2, "decoder_input_details": True}}
    reply = client.post("/generate", json=body).get_json()
    ids = tokenizer.encode(TEXT, add_special_tokens=True)
    prefill = reply["details"]["prefill"]
    assert [t["id"] for t in prefill] == ids and set(prefill[0]) == {"id", "text", "logprob"}
    assert prefill[0]["logprob"] is None
    assert [t["text"] for t in prefill] == [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    assert [t["logprob"] for t in prefill[1:]] == pytest.approx(hf_prompt_logprobs(hf_model, ids), abs=1e-3)
    assert reply["details"]["tokens"] and "top_tokens" not in reply["details"]
    stream = client.post("/generate_stream", json=body)
    assert "`decoder_input_details` == true is not supported when streaming tokens" in stream.get_data(as_text=True)


def test_logit_bias_steers_greedy_decoding(live_client, tokenizer):
    client = live_client()
    plain = _greedy_chat_ids(client, tokenizer)
    banned = _greedy_chat_ids(client, tokenizer, logit_bias={str(plain[0]): -100})
    assert banned[0] != plain[0]
    forced_id = tokenizer.encode(" ocean", add_special_tokens=False)[0]
    assert set(_greedy_chat_ids(client, tokenizer, logit_bias={str(forced_id): 100})) == {forced_id}


def test_stop_token_ids_end_the_text_before_the_token(live_client, tokenizer):
    client = live_client()
    ids = _greedy_chat_ids(client, tokenizer)
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stop_token_ids": [ids[2]]}
    choice = client.post(CHAT, json=body).get_json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == tokenizer.decode(ids[: ids.index(ids[2])])


def test_min_p_one_keeps_only_the_most_likely_token(live_client, tokenizer):
    client = live_client()
    greedy = _greedy_chat_ids(client, tokenizer)
    assert _greedy_chat_ids(client, tokenizer, temperature=1.5, seed=3, min_p=1.0) == greedy


def test_continuous_usage_stats_count_in_every_chunk(live_client):
    client = live_client()
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {"messages": MESSAGES, "max_tokens": 5, "ignore_eos": True, "stream": True, "stream_options": options}
    chunks = openai_chunks(client.post(CHAT, json=body))
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 5
    assert all(c["usage"]["prompt_tokens"] == chunks[0]["usage"]["prompt_tokens"] for c in chunks)


def test_typical_p_samples_reproducibly(live_client):
    client = live_client()
    body = {"inputs": TEXT, "parameters": {"max_new_tokens": 8, "typical_p": 0.3, "seed": 11, "details": True}}
    first, again = (client.post("/generate", json=body).get_json() for _ in range(2))
    assert first["generated_text"] == again["generated_text"] and first["details"]["seed"] == 11
