"""The load generator against a real naive server on loopback (tiny model), and its HTTP body parsing."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from bench import loadgen
from bench.metrics import percentile, summarize
from bench.servers import SERVERS, ServerProcess
from bench.workload import build_prompts, chat_body

PROMPT_TOKENS = 24
OUTPUT_TOKENS = 8


@pytest.fixture(scope="module")
def naive_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("naive") / "naive.log"
    with ServerProcess(SERVERS["naive"], str(tiny_model_dir), log).start(ready_timeout_s=60) as server:
        yield server


@pytest.fixture(scope="module")
def prompts(tiny_model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return build_prompts(tokenizer, 2, PROMPT_TOKENS, model_dir=str(tiny_model_dir))


def _bodies(prompts, output_tokens: int = OUTPUT_TOKENS) -> list[dict]:
    return [chat_body("openai-ext", "bench", prompt, output_tokens) for prompt in prompts]


def test_two_concurrent_streams_give_consistent_metrics(naive_server: ServerProcess, prompts) -> None:
    results = loadgen.run_load_sync(
        naive_server.url + "/v1/chat/completions", _bodies(prompts), concurrency=2, timeout_s=60
    )
    loadgen.fill_token_counts(results, lambda text: len(text.split()))  # usage, when present, keeps priority

    assert len(results) == 2
    for result in results:
        assert result.ok, result.error
        assert result.output_tokens == OUTPUT_TOKENS and result.tokens_from_usage  # ignore_eos forced the length
        assert result.prompt_tokens == PROMPT_TOKENS
        assert result.finish_reason == "length"
        assert result.start < result.chunk_times[0] <= result.chunk_times[-1] <= result.end
        assert result.chunk_times == sorted(result.chunk_times)
        assert 1 <= len(result.chunk_times) <= OUTPUT_TOKENS
        assert result.text
        assert result.retokenized_tokens == len(result.text.split())

    metrics = summarize(results, concurrency=2)
    assert (metrics.num_requests, metrics.num_ok, metrics.num_failed) == (2, 2, 0)
    assert metrics.total_output_tokens == 2 * OUTPUT_TOKENS
    assert metrics.output_tokens_min == metrics.output_tokens_max == OUTPUT_TOKENS
    assert metrics.prompt_tokens_min == metrics.prompt_tokens_max == PROMPT_TOKENS
    assert metrics.tokens_counted_by == "usage"
    assert metrics.total_retokenized_tokens == sum(len(r.text.split()) for r in results)
    assert metrics.num_chunks == sum(len(r.chunk_times) for r in results)
    assert metrics.output_tokens_per_s == pytest.approx(2 * OUTPUT_TOKENS / metrics.duration_s)
    assert 0 < metrics.ttft_ms_p50 <= metrics.ttft_ms_p99 <= metrics.e2e_ms_p99
    assert 0 <= metrics.itl_ms_p50 <= metrics.itl_ms_p99
    assert metrics.duration_s * 1e3 >= metrics.e2e_ms_p99
    # the serial naive server answers one request after the other: the second waits for the first
    assert max(r.ttft for r in results) > min(r.latency for r in results)


def test_rejected_request_is_counted_as_failed(naive_server: ServerProcess, prompts) -> None:
    bad = {**_bodies(prompts)[0], "messages": []}
    results = loadgen.run_load_sync(
        naive_server.url + "/v1/chat/completions", [bad, _bodies(prompts)[1]], concurrency=1, timeout_s=60
    )

    assert results[0].error is not None and results[0].error.startswith("HTTP 400")
    metrics = summarize(results, concurrency=1)
    assert (metrics.num_ok, metrics.num_failed) == (1, 1)
    assert metrics.total_output_tokens == OUTPUT_TOKENS
    assert metrics.errors and "HTTP 400" in metrics.errors[0]


def test_tokens_are_retokenized_when_the_server_reports_no_usage(naive_server, prompts, tiny_model_dir) -> None:
    body = _bodies(prompts)[0]
    body.pop("stream_options")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    results = loadgen.run_load_sync(naive_server.url + "/v1/chat/completions", [body], 1, timeout_s=60)
    loadgen.fill_token_counts(results, lambda text: len(tokenizer.encode(text, add_special_tokens=False)))

    assert results[0].ok and not results[0].tokens_from_usage
    assert results[0].output_tokens == len(tokenizer.encode(results[0].text, add_special_tokens=False))
    assert summarize(results, 1).tokens_counted_by == "retokenized"


def test_chunked_body_is_decoded_piece_by_piece() -> None:
    async def read_all() -> list[bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(b"6\r\ndata: \r\n5;ext=1\r\nhello\r\n0\r\n\r\n")
        reader.feed_eof()
        return [piece async for piece in loadgen._iter_body(reader, {"transfer-encoding": "chunked"})]

    assert asyncio.run(read_all()) == [b"data: ", b"hello"]


def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 100) == 4.0
    assert percentile(values, 99) == pytest.approx(3.97)
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_a_point_records_the_server_cpu_it_cost(naive_server: ServerProcess, prompts) -> None:
    """bench.serving's point: the server tree's CPU during the load, by role, per output token (one process: rest)."""
    import argparse

    from bench.serving import measure_point

    args = argparse.Namespace(no_wait_quiet=True, quiet_timeout=0.0, request_timeout=60.0, output_tokens=OUTPUT_TOKENS)
    point = measure_point(naive_server, _bodies(prompts), 2, args, lambda text: len(text.split()))
    assert point["output_tokens_exact"] and point["metrics"]["total_output_tokens"] == 2 * OUTPUT_TOKENS
    cpu, per_token = point["server_cpu_s"], point["server_cpu_us_per_output_token"]
    assert cpu["rest"] > 0 and cpu["engine"] == 0 and cpu["http"] == 0  # generate() runs in the server's process
    assert per_token["rest"] == pytest.approx(cpu["rest"] * 1e6 / (2 * OUTPUT_TOKENS))
    # The client's own CPU (this process): more than nothing, at most all of the cores for the point's duration.
    assert 0 < point["client_cpu_s"] <= os.cpu_count() * point["metrics"]["duration_s"]
    assert point["client_cpu_percent_of_core"] == pytest.approx(
        100 * point["client_cpu_s"] / point["metrics"]["duration_s"]
    )
