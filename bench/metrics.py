"""Per-request timings and the metrics of one load level, computed like vLLM's benchmark_serving.

TTFT = time to the first streamed chunk that carries content; ITL = every gap between consecutive content
chunks, pooled over requests; TPOT = (latency - TTFT) / (output_tokens - 1) per request.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class RequestResult:
    """What one streamed request did; times are seconds on the client's perf_counter clock."""

    start: float
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with non-empty content
    text: str = ""
    output_tokens: int | None = None  # None until known (usage or re-tokenizing)
    tokens_from_usage: bool = False
    retokenized_tokens: int | None = None  # the streamed text re-encoded: a cross-check of the server's count
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    completed: bool = False  # the server ended the stream properly (finish_reason or [DONE])
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.completed

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def latency(self) -> float:
        return self.end - self.start

    def inter_chunk_gaps(self) -> list[float]:
        times = self.chunk_times
        return [later - earlier for earlier, later in zip(times, times[1:])]


@dataclass(slots=True)
class LevelMetrics:
    """Aggregate metrics of one (server, model, concurrency) run; times in milliseconds, rates per second."""

    concurrency: int
    num_requests: int
    num_ok: int
    num_failed: int
    duration_s: float
    total_output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_ms_p50: float
    ttft_ms_p99: float
    ttft_ms_mean: float
    itl_ms_p50: float
    itl_ms_p99: float
    itl_ms_mean: float
    tpot_ms_p50: float
    tpot_ms_p99: float
    e2e_ms_p50: float
    e2e_ms_p99: float
    output_tokens_min: int
    output_tokens_max: int
    prompt_tokens_min: int | None
    prompt_tokens_max: int | None
    tokens_counted_by: str  # "usage", "retokenized" or "mixed"
    total_retokenized_tokens: int | None  # sum over ok requests of the text re-encoded (differs for byte junk)
    num_chunks: int
    num_without_content: int  # ok requests whose tokens all decoded to nothing: no TTFT or ITL from them
    finish_reasons: dict[str, int]
    errors: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for an empty list."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize(results: list[RequestResult], concurrency: int) -> LevelMetrics:
    """Pool the requests of one load level; duration spans the first start to the last end."""
    if not results:
        raise ValueError("summarize needs at least one request result")
    ok = [r for r in results if r.ok]
    duration = max(r.end for r in results) - min(r.start for r in results)
    out_counts = [r.output_tokens or 0 for r in ok]
    total_out = sum(out_counts)
    timed = [(r, n) for r, n in zip(ok, out_counts) if r.chunk_times]
    ttfts = [r.ttft * 1e3 for r, _ in timed]
    itls = [gap * 1e3 for r, _ in timed for gap in r.inter_chunk_gaps()]
    tpots = [(r.latency - r.ttft) * 1e3 / (n - 1) for r, n in timed if n > 1]
    e2es = [r.latency * 1e3 for r in ok]
    prompt_counts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    by_usage = {r.tokens_from_usage for r in ok}
    counted_by = "mixed" if len(by_usage) > 1 else ("usage" if by_usage == {True} else "retokenized")
    reasons: dict[str, int] = {}
    for r in ok:
        reasons[str(r.finish_reason)] = reasons.get(str(r.finish_reason), 0) + 1
    return LevelMetrics(
        concurrency=concurrency,
        num_requests=len(results),
        num_ok=len(ok),
        num_failed=len(results) - len(ok),
        duration_s=duration,
        total_output_tokens=total_out,
        output_tokens_per_s=total_out / duration if duration > 0 else math.nan,
        requests_per_s=len(ok) / duration if duration > 0 else math.nan,
        ttft_ms_p50=percentile(ttfts, 50),
        ttft_ms_p99=percentile(ttfts, 99),
        ttft_ms_mean=_mean(ttfts),
        itl_ms_p50=percentile(itls, 50),
        itl_ms_p99=percentile(itls, 99),
        itl_ms_mean=_mean(itls),
        tpot_ms_p50=percentile(tpots, 50),
        tpot_ms_p99=percentile(tpots, 99),
        e2e_ms_p50=percentile(e2es, 50),
        e2e_ms_p99=percentile(e2es, 99),
        output_tokens_min=min(out_counts, default=0),
        output_tokens_max=max(out_counts, default=0),
        prompt_tokens_min=min(prompt_counts, default=None),
        prompt_tokens_max=max(prompt_counts, default=None),
        tokens_counted_by=counted_by,
        total_retokenized_tokens=None
        if any(r.retokenized_tokens is None for r in ok)
        else sum(r.retokenized_tokens for r in ok),
        num_chunks=sum(len(r.chunk_times) for r in ok),
        num_without_content=len(ok) - len(timed),
        finish_reasons=reasons,
        errors=sorted({r.error for r in results if r.error is not None})[:5],
    )
