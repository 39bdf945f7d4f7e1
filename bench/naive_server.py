"""The naive baseline: a minimal OpenAI-compatible chat server that runs `model.generate` once per request.

Stdlib `ThreadingHTTPServer` (a thread per connection). By default generation is serial, one request at a time
behind a lock, the way a simple server avoids oversubscribing the CPU; `--parallel` drops the lock so each
request's `generate` runs in its own thread at batch size 1. Tokens stream one SSE chunk per token.
Run: `python -m bench.naive_server --model DIR --port 8000`.
"""

from __future__ import annotations

import argparse
import json
import queue
import threading
import time
import uuid
from contextlib import nullcontext
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from tokenizers.decoders import DecodeStream
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

_DONE = object()


class _Cancelled(Exception):
    pass


class TokenStreamer(BaseStreamer):
    """Receives ids from `generate` and queues (text, num_new_tokens) per token; raises once cancelled."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer.backend_tokenizer  # the Rust tokenizer: O(1) incremental decoding
        self._decoder = DecodeStream(skip_special_tokens=True)
        self._skip_prompt = True
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.num_tokens = 0

    def put(self, value: torch.Tensor) -> None:
        if self.cancelled.is_set():
            raise _Cancelled()
        if self._skip_prompt:  # generate's first put() is the prompt
            self._skip_prompt = False
            return
        for token_id in value.reshape(-1).tolist():
            self.num_tokens += 1
            text = self._decoder.step(self._tokenizer, token_id)
            self.events.put((text or "", 1))

    def end(self) -> None:
        self.events.put(_DONE)


class NaiveEngine:
    """The model, its tokenizer and the lock that makes generation serial (unless parallel)."""

    def __init__(self, model_dir: str, parallel: bool) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
        self.model_name = model_dir
        self._lock = nullcontext() if parallel else threading.Lock()

    def start(self, body: dict[str, Any]) -> tuple[TokenStreamer, int, int]:
        """Validate the body and start `generate` in a thread; returns (streamer, prompt_tokens, max_tokens)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 256)
        min_tokens = max_tokens if body.get("ignore_eos") else int(body.get("min_tokens") or 0)
        if max_tokens < 1 or min_tokens > max_tokens:
            raise ValueError(f"need 1 <= max_tokens and min_tokens <= max_tokens, got {max_tokens}, {min_tokens}")
        temperature = float(body.get("temperature", 1.0))
        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )  # input_ids: [1, prompt_len]
        sampling = (
            {"do_sample": False}
            if temperature == 0.0
            else {"do_sample": True, "temperature": temperature, "top_p": float(body.get("top_p", 1.0))}
        )
        streamer = TokenStreamer(self.tokenizer)

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    if body.get("seed") is not None:
                        torch.manual_seed(int(body["seed"]))
                    self.model.generate(
                        **inputs,
                        max_new_tokens=max_tokens,
                        min_new_tokens=min_tokens,
                        streamer=streamer,
                        pad_token_id=self.tokenizer.pad_token_id,
                        **sampling,
                    )
            except _Cancelled:
                streamer.end()
            except Exception as exc:  # reported to the client inside the stream
                streamer.events.put(exc)

        threading.Thread(target=run, daemon=True).start()
        return streamer, int(inputs["input_ids"].shape[-1]), max_tokens


def _chunk(request_id: str, model: str, delta: dict, finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


class Handler(BaseHTTPRequestHandler):
    engine: NaiveEngine  # set by serve()

    def log_message(self, *args: Any) -> None:  # quiet: a benchmark server should not print per request
        pass

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path in ("/health", "/ping"):
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.engine.model_name, "object": "model"}]})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            return self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            streamer, prompt_tokens, max_tokens = self.engine.start(body)
        except (ValueError, TypeError) as exc:
            return self._json(400, {"error": {"message": str(exc), "type": "invalid_request_error"}})
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            if body.get("stream"):
                self._stream(streamer, request_id, body, prompt_tokens, max_tokens)
            else:
                self._complete(streamer, request_id, prompt_tokens, max_tokens)
        except (BrokenPipeError, ConnectionResetError):
            streamer.cancelled.set()  # the client left: stop generating at the next token

    def _stream(self, streamer: TokenStreamer, rid: str, body: dict, prompt_tokens: int, max_tokens: int) -> None:
        model = self.engine.model_name
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()  # HTTP/1.0: the body ends when the connection closes

        def send(payload: dict[str, Any]) -> None:
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())

        send(_chunk(rid, model, {"role": "assistant", "content": ""}))
        while (event := streamer.events.get()) is not _DONE:
            if isinstance(event, Exception):
                send({"error": {"message": str(event), "type": "server_error"}})
                break
            if event[0]:
                send(_chunk(rid, model, {"content": event[0]}))
        finish = "length" if streamer.num_tokens >= max_tokens else "stop"
        send(_chunk(rid, model, {}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": streamer.num_tokens,
                "total_tokens": prompt_tokens + streamer.num_tokens,
            }
            send(
                {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )
        self.wfile.write(b"data: [DONE]\n\n")

    def _complete(self, streamer: TokenStreamer, rid: str, prompt_tokens: int, max_tokens: int) -> None:
        text = ""
        while (event := streamer.events.get()) is not _DONE:
            if isinstance(event, Exception):
                return self._json(500, {"error": {"message": str(event), "type": "server_error"}})
            text += event[0]
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": streamer.num_tokens,
            "total_tokens": prompt_tokens + streamer.num_tokens,
        }
        finish = "length" if streamer.num_tokens >= max_tokens else "stop"
        self._json(
            200,
            {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.engine.model_name,
                "usage": usage,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            },
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # listen backlog: a burst of concurrent clients must not be refused


def serve(model_dir: str, host: str, port: int, parallel: bool) -> None:
    Handler.engine = NaiveEngine(model_dir, parallel)
    server = _Server((host, port), Handler)
    print(f"naive server: {model_dir} on http://{host}:{port} ({'parallel' if parallel else 'serial'})", flush=True)
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--parallel", action="store_true", help="one generate thread per request, no lock")
    args = parser.parse_args()
    serve(args.model, args.host, args.port, args.parallel)


if __name__ == "__main__":
    main()
