"""The engine end to end on a real small model folder, checked against transformers' greedy generate."""

from __future__ import annotations

import pytest
import torch

from model_handler.cpu_features import has_native_bf16
from model_handler.engine_protocol import EngineRequest, FinishReason, StepEngine
from model_handler.sampling_params import SamplingParams
from tests import cpu_kernels
from tests.model_handler.engine_factories import (
    create_engine,
    greedy,
    hf_greedy,
    random_prompt,
    run_to_completion,
    tokens_of,
)

N = 12  # tokens generated per request
# Every engine test runs twice: steps read one at a time, and with async scheduling (one step in flight,
# its outputs returned by the next step() call), which must give the very same tokens.
MODES = {"sync": "0", "async": "1"}


@pytest.fixture(scope="module", params=MODES)
def engine(test_model_dir, request):
    return create_engine(test_model_dir, ASYNC_SCHEDULING=MODES[request.param])


@pytest.fixture(scope="module", params=MODES)
def chunking_engine(test_model_dir, request):
    return create_engine(test_model_dir, MAX_BATCH_PREFILL_TOKENS="16", ASYNC_SCHEDULING=MODES[request.param])


@pytest.fixture(scope="module", params=MODES)
def small_cache_engine(test_model_dir, request):
    # 12 blocks of 8 tokens (8 KiB each): prompts of 11, 24 and 40 tokens fit (10 blocks), but not
    # once each has grown by 12 tokens (15 blocks).
    return create_engine(
        test_model_dir, KV_CACHE_CPU_BYTES="96KiB", PREFIX_CACHING="false", ASYNC_SCHEDULING=MODES[request.param]
    )


def lag(engine) -> int:
    """Steps between a step's launch and its outputs: 1 with async scheduling."""
    return int(engine.config.async_scheduling)


@pytest.fixture(scope="module")
def prompts():
    return [random_prompt(n, seed=n) for n in (3, 11, 24, 40)]


@pytest.fixture(scope="module")
def expected(hf_model, prompts):
    return [hf_greedy(hf_model, p, N) for p in prompts]


def test_each_prompt_alone_matches_transformers(engine, prompts, expected):
    for i, prompt in enumerate(prompts):
        engine.add_request(greedy(f"alone-{i}", prompt, N))
        outputs = run_to_completion(engine)[f"alone-{i}"]
        assert tokens_of(outputs) == expected[i]
        assert len(outputs) == N  # one token per step
        assert outputs[-1].finished and outputs[-1].finish_reason is FinishReason.LENGTH
        assert not any(o.finished for o in outputs[:-1])
        assert all(o.num_prompt_tokens == len(prompt) for o in outputs)


def test_mixed_batch_with_a_request_joining_midway_matches_transformers(engine, prompts, expected):
    for i in (0, 1, 2):
        engine.add_request(greedy(f"mix-{i}", prompts[i], N))
    collected: dict[str, list] = {}
    for _ in range(4):  # the first three decode for a few steps before the fourth arrives
        for out in engine.step():
            collected.setdefault(out.request_id, []).append(out)
    engine.add_request(greedy("mix-3", prompts[3], N))
    for request_id, outs in run_to_completion(engine).items():
        collected.setdefault(request_id, []).extend(outs)
    for i in range(4):
        assert tokens_of(collected[f"mix-{i}"]) == expected[i], f"request {i}"


def test_chunked_prefill_with_decodes_in_the_same_steps_matches_transformers(chunking_engine, prompts, expected):
    engine = chunking_engine
    engine.add_request(greedy("short", prompts[0], N))
    for _ in range(lag(engine)):
        assert engine.step() == []  # launched, not read yet
    first = engine.step()
    assert [o.request_id for o in first] == ["short"]
    engine.add_request(greedy("long", prompts[3], N))  # 40 tokens under a 16-token budget
    steps_until_first_token = 0
    collected = {"short": first}
    while "long" not in collected:
        outs = engine.step()
        steps_until_first_token += 1
        # The short request keeps decoding while the long prompt is being prefilled in chunks.
        assert "short" in [o.request_id for o in outs]
        for out in outs:
            collected.setdefault(out.request_id, []).append(out)
    assert steps_until_first_token == 3 + lag(engine)  # 15 + 15 + 10 prompt tokens next to a decode each
    for request_id, outs in run_to_completion(engine).items():
        collected.setdefault(request_id, []).extend(outs)
    assert tokens_of(collected["short"]) == expected[0]
    assert tokens_of(collected["long"]) == expected[3]


def test_last_layer_goes_past_attention_only_for_the_rows_that_sample(chunking_engine, hf_model):
    """Prompt tokens that sample nothing skip the last layer's o_proj and MLP; their k/v is still stored,
    so the decodes that attend over it give transformers' tokens."""
    engine = chunking_engine
    layers = engine.model_runner.model.model.layers
    rows = {"first": [], "last": []}
    hooks = [
        layers[0].mlp.register_forward_pre_hook(lambda m, args: rows["first"].append(args[0].shape[0])),
        layers[-1].mlp.register_forward_pre_hook(lambda m, args: rows["last"].append(args[0].shape[0])),
    ]
    try:
        prompt = random_prompt(40, seed=401)  # 16 + 16 + 8 tokens under the 16-token budget
        engine.add_request(greedy("pruned", prompt, N))
        outputs = run_to_completion(engine)["pruned"]
    finally:
        for hook in hooks:
            hook.remove()
    assert tokens_of(outputs) == hf_greedy(hf_model, prompt, N)
    assert rows["first"] == [16, 16, 8] + [1] * (N - 1)
    # The middle chunks sample nothing and run in full; the last chunk's 8 tokens leave one row.
    assert rows["last"] == [16, 16, 1] + [1] * (N - 1)


def test_long_prompt_alone_takes_several_steps_before_its_first_token(chunking_engine, hf_model):
    prompt = random_prompt(40, seed=400)  # not in the prefix cache; 16 tokens per step
    chunking_engine.add_request(greedy("alone", prompt, N))
    assert chunking_engine.step() == [] and chunking_engine.step() == []
    outputs = run_to_completion(chunking_engine)["alone"]
    assert outputs[0].num_cached_tokens == 0
    assert tokens_of(outputs) == hf_greedy(hf_model, prompt, N)


def test_preemption_recomputes_and_still_matches_transformers(small_cache_engine, prompts, expected):
    engine = small_cache_engine
    before = engine.scheduler.num_preemptions
    for i in (1, 2, 3):
        engine.add_request(greedy(f"pre-{i}", prompts[i], N))
    results = run_to_completion(engine)
    assert engine.scheduler.num_preemptions > before
    for i in (1, 2, 3):
        assert tokens_of(results[f"pre-{i}"]) == expected[i], f"request {i}"


def test_engine_is_what_the_engine_server_drives(engine):
    """`model_handler/server.py` relies on the `StepEngine` protocol only."""
    assert isinstance(engine, StepEngine)


def test_abort_frees_blocks_and_reports_the_request(engine, prompts, expected):
    engine.add_request(greedy("keep", prompts[1], N))
    engine.add_request(greedy("drop", prompts[2], N))
    outs = engine.step() + engine.step()
    free_before = engine.block_manager.num_free_blocks
    engine.abort_requests(["drop", "never-seen"])  # with async scheduling, while a step of it is in flight
    assert engine.block_manager.num_free_blocks > free_before  # freed at once, not at the next step
    after = engine.step()
    aborted = [o for o in after if o.request_id == "drop"]
    assert len(aborted) == 1 and aborted[0].finished and aborted[0].finish_reason is FinishReason.ABORTED
    assert aborted[0].new_token_ids == []
    rest = run_to_completion(engine)
    assert "drop" not in rest
    keep = [o for o in outs + after if o.request_id == "keep"] + rest["keep"]
    assert tokens_of(keep) == expected[1]


def test_stop_token_ends_the_request_and_is_included(engine, prompts, expected):
    stop = expected[2][4]
    first_hit = expected[2].index(stop)
    params = SamplingParams(max_tokens=N, temperature=0.0, stop_token_ids=(stop,))  # no min_tokens here
    engine.add_request(EngineRequest("stop", prompts[2], params))
    outputs = run_to_completion(engine)["stop"]
    assert tokens_of(outputs) == expected[2][: first_hit + 1]
    assert outputs[-1].finish_reason is FinishReason.STOP_TOKEN


def test_a_penalty_request_joining_greedy_ones_matches_transformers(engine, hf_model, prompts, expected):
    """A repetition penalty needs each output token on the host before the next step: async scheduling
    reads the step in flight and runs synchronously while such a request is there, then overlaps again."""
    engine.add_request(greedy("plain", prompts[1], N))
    collected: dict[str, list] = {}
    for _ in range(3):
        for out in engine.step():
            collected.setdefault(out.request_id, []).append(out)
    engine.add_request(greedy("penalty", prompts[2], N, repetition_penalty=1.3))
    for request_id, outs in run_to_completion(engine).items():
        collected.setdefault(request_id, []).extend(outs)
    assert tokens_of(collected["plain"]) == expected[1]
    assert tokens_of(collected["penalty"]) == hf_greedy(hf_model, prompts[2], N, repetition_penalty=1.3)
    assert tokens_of(collected["penalty"]) != expected[2]  # the penalty changed something


def test_logprobs_match_transformers(engine, hf_model, prompts, expected):
    prompt = prompts[1]
    engine.add_request(greedy("lp", prompt, 5, logprobs=3))
    outputs = run_to_completion(engine)["lp"]
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + expected[1][:4]])).logits[0, len(prompt) - 1 :]  # [5, vocab]
    reference = torch.log_softmax(logits.float(), dim=-1)
    for step, out in enumerate(outputs):
        (lp,) = out.new_logprobs
        assert lp.token_id == expected[1][step]
        assert lp.logprob == pytest.approx(reference[step, lp.token_id].item(), abs=1e-4)
        top = reference[step].topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert lp.top[0][0] == lp.token_id  # greedy: the chosen token is the most likely one


def test_seeded_sampling_is_reproducible_alone_or_batched(engine, prompts):
    def sampled(request_id: str) -> EngineRequest:
        params = SamplingParams(max_tokens=N, min_tokens=N, temperature=1.0, top_p=0.95, seed=2024)
        return EngineRequest(request_id, prompts[2], params)

    engine.add_request(sampled("seed-a"))
    alone = tokens_of(run_to_completion(engine)["seed-a"])
    engine.add_request(greedy("other-1", prompts[0], N))
    engine.add_request(sampled("seed-b"))
    engine.add_request(EngineRequest("other-2", prompts[3], SamplingParams(max_tokens=N, temperature=1.0)))
    batched = tokens_of(run_to_completion(engine)["seed-b"])
    assert batched == alone
    assert len(set(alone)) > 1


def test_requests_that_can_never_run_are_rejected(engine, prompts):
    max_len = engine.info().max_model_len
    with pytest.raises(ValueError, match="MAX_TOTAL_TOKENS"):
        engine.add_request(greedy("too-long", [5] * (max_len - 3), 4))
    with pytest.raises(ValueError, match="no tokens"):
        engine.add_request(greedy("empty", [], 4))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request(greedy("bad-id", [5, 100_000], 4))
    engine.add_request(greedy("dup", prompts[0], 2))
    with pytest.raises(ValueError, match="already"):
        engine.add_request(greedy("dup", prompts[0], 2))
    run_to_completion(engine)


def test_request_larger_than_the_cache_is_rejected(small_cache_engine):
    """MAX_TOTAL_TOKENS unset: the context is what the 12 blocks hold, so a longer request is refused as too long."""
    info = small_cache_engine.info()
    assert (info.max_model_len, info.max_input_tokens, info.context_limited_by) == (96, 95, "kv_cache")
    with pytest.raises(ValueError, match=r"exceeds the model length 96 \(MAX_TOTAL_TOKENS, limited by kv_cache\)"):
        small_cache_engine.add_request(greedy("huge", [5] * 200, 10))


def test_explicit_limits_beyond_the_cache_stop_startup_with_the_numbers(test_model_dir):
    with pytest.raises(
        ValueError,
        match=r"MAX_TOTAL_TOKENS=200 does not fit the KV cache: one request that long needs 25 blocks of 8 tokens, "
        r"the cache holds 12 \(96 tokens; KV_CACHE_CPU_BYTES=96.0 KiB at 8.0 KiB a block\)",
    ):
        create_engine(test_model_dir, KV_CACHE_CPU_BYTES="96KiB", MAX_TOTAL_TOKENS="200")
    with pytest.raises(ValueError, match=r"MAX_INPUT_TOKENS=100 must be smaller than the total token limit 96"):
        create_engine(test_model_dir, KV_CACHE_CPU_BYTES="96KiB", MAX_INPUT_TOKENS="100")
    engine = create_engine(test_model_dir, KV_CACHE_CPU_BYTES="96KiB", MAX_TOTAL_TOKENS="97", MAX_INPUT_TOKENS="50")
    info = engine.info()  # 97 tokens fit 12 blocks of 8: the last sampled token needs no KV slot
    assert (info.max_model_len, info.max_input_tokens, info.context_limited_by) == (97, 50, "MAX_TOTAL_TOKENS")


def test_info_and_stats(engine, test_model_dir):
    info = engine.info()
    assert info.model_dir == str(test_model_dir)
    assert info.architecture == "LlamaForCausalLM" and info.vocab_size == 512
    assert info.device == "cpu" and info.dtype == "float32"
    assert info.attention_backend == cpu_kernels.expected_backend()  # the C++ kernels wherever a compiler is
    # A block: 2 layers x 8 tokens x 2 kv heads x 32 dims x (k, v) x 4 bytes = 8 KiB; 4 MiB hold 512.
    assert info.block_size == 8 and info.num_kv_blocks == 512
    assert info.kv_cache_bytes == 4 << 20
    assert info.max_model_len == 512 and not info.cuda_graphs and info.prefix_caching
    # MAX_TOTAL_TOKENS unset: the model's 512 positions, since the cache holds more (4096 tokens).
    assert (info.max_input_tokens, info.max_position_embeddings, info.context_limited_by) == (511, 512, "model")
    assert info.eos_token_ids == [2]
    assert engine.stats() == (0, 0, 512)
    engine.add_request(greedy("s", [5] * 20, 2))
    assert engine.stats() == (0, 1, 512)
    engine.step()
    assert engine.stats() == (1, 0, 512 - 3)
    run_to_completion(engine)


def count_replays(graph_runner, replays: list[int]) -> None:
    """Record each replay's batch size. Kept out of the test's frame: a local there holding the original bound
    method would keep the first engine's KV cache alive while the second one sizes its own."""
    original = graph_runner.run
    graph_runner.run = lambda *a: replays.append(a[0].shape[0]) or original(*a)


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager_on_gpu(test_model_dir, prompts):
    """Decode under CUDA graphs (padded batches, and a batch too large for any graph) gives eager's tokens,
    with async scheduling (input tokens patched on the device before the replay) and without."""
    import gc

    def run(engine, batch: list[list[int]]) -> dict[str, list[int]]:
        for i, prompt in enumerate(batch):
            engine.add_request(greedy(f"g{len(batch)}-{i}", prompt, N))
        return {rid: tokens_of(outs) for rid, outs in run_to_completion(engine).items()}

    batches = [
        prompts[:1],
        prompts[:3],
        [random_prompt(5 + i, seed=50 + i) for i in range(6)],
        [random_prompt(7 + i, seed=70 + i) for i in range(10)],
    ]  # 1, 3 -> 4, 6 -> 8, 10 > 8: eager
    env = dict(DTYPE="float32", CUDA_MEMORY_FRACTION="0.2", MAX_BATCH_SIZE="16")
    results = {}
    for graphs, overlap in (("1,2,4,8", "1"), ("1,2,4,8", "0"), ("0", "1"), ("0", "0")):
        engine = create_engine(test_model_dir, device="cuda", CUDA_GRAPHS=graphs, ASYNC_SCHEDULING=overlap, **env)
        assert engine.config.async_scheduling == (overlap == "1")
        info = engine.info()
        assert info.cuda_graphs == (graphs != "0") and info.attention_backend == "triton"
        assert info.num_kv_blocks > 0 and info.device.startswith("cuda")
        replays = []
        if engine.model_runner.graph_runner is not None:
            count_replays(engine.model_runner.graph_runner, replays)
        results[graphs, overlap] = [run(engine, batch) for batch in batches]
        if graphs != "0":
            assert {1, 3, 6} <= set(replays) and 10 not in replays
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    eager_sync = results["0", "0"]
    assert all(result == eager_sync for result in results.values())


def test_bf16_engine_on_cpu_runs_in_bf16_close_to_fp32(test_model_dir, engine):
    """A bf16 engine on CPU (what DTYPE=auto picks where bf16 is native, see test_config.py): weights and KV
    cache in bf16, matmuls through oneDNN's packed kernel where native; its greedy first tokens are fp32's
    but for near-ties (bf16 keeps ~3 significant digits)."""
    bf16_engine = create_engine(test_model_dir, DTYPE="bfloat16")
    assert bf16_engine.config.dtype == "bfloat16" and bf16_engine.info().dtype == "bfloat16"
    runner = bf16_engine.model_runner
    assert {p.dtype for p in runner.model.parameters()} == {torch.bfloat16}
    assert {t.dtype for cache in runner.kv_caches for t in cache} == {torch.bfloat16}
    prompts = [random_prompt(9 + i, seed=900 + i) for i in range(16)]
    first_tokens = []
    for e in (bf16_engine, engine):
        for i, prompt in enumerate(prompts):
            e.add_request(greedy(f"dtype-{i}", prompt, 4))
        outputs = run_to_completion(e)
        first_tokens.append([tokens_of(outputs[f"dtype-{i}"])[0] for i in range(len(prompts))])
    packed = runner.model.model.layers[0].mlp.down_proj.packed_weight.packed
    assert (packed is not None) == has_native_bf16()  # oneDNN's bf16 kernel ran where the CPU has bf16
    agree = sum(a == b for a, b in zip(*first_tokens, strict=True))
    assert agree >= 12, first_tokens  # 15 of 16 here; unrelated models would agree on ~0 of 512 ids
