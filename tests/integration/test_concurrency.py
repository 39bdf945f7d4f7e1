"""Many simultaneous streams through gunicorn + gevent + the engine process: all finish, none mixes up."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def _stream_text(url: str, question: str) -> tuple[str, str]:
    body = {
        "model": "tgi",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 24,
        "temperature": 0,
        "stream": True,
    }
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    text, finish = [], None
    with urllib.request.urlopen(request, timeout=120) as reply:
        for line in reply:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            choice = chunk["choices"][0]
            text.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    return "".join(text), finish


def test_sixteen_concurrent_streams_match_their_solo_runs(live_server):
    questions = [
        f"Question number {i}: what does the keyword {word} do?"
        for i, word in enumerate(
            [
                "lambda",
                "yield",
                "with",
                "class",
                "def",
                "import",
                "global",
                "assert",
                "return",
                "try",
                "while",
                "for",
                "del",
                "pass",
                "raise",
                "async",
            ]
        )
    ]
    solo = [_stream_text(live_server.url, q) for q in questions]
    with ThreadPoolExecutor(max_workers=16) as pool:
        together = list(pool.map(lambda q: _stream_text(live_server.url, q), questions))
    assert together == solo
    assert all(finish in ("stop", "length") for _, finish in together)
    assert len({text for text, _ in solo}) > 1, "different prompts should not all give the same text"
