"""Every field of every request model is used (it reaches the engine, the chat template, the reply or the log line)
or refused, exactly as serve/field_uses.py declares; each declaration is shown through the routes, on a
scripted engine that records what reaches it."""

from __future__ import annotations

import copy
import json
import shutil
import types
import typing
from dataclasses import asdict, dataclass

import pytest
from pydantic import BaseModel

import serve.app
from serve.field_uses import FIELD_USES, Checked, Engine, Logged, Pending, Refused, Reply, Template
from serve.schemas_openai import ChatCompletionRequest, CompletionRequest
from serve.schemas_tgi import GenerateParameters, GenerateRequest
from serve.tokenizer import TextTokenizer
from tests.serve.scripted_engine import ScriptedEngine, engine_info

TOP_LEVEL: dict[type[BaseModel], tuple[str, dict]] = {
    ChatCompletionRequest: (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20},
    ),
    CompletionRequest: ("/v1/completions", {"prompt": "hi", "max_tokens": 20}),
    GenerateRequest: ("/", {"inputs": "hi", "parameters": {"max_new_tokens": 20}}),  # `/` reads `stream` too
}
NAMED_IN_ERRORS = {*TOP_LEVEL, GenerateParameters}
"""Models whose refused fields the error must name (a nested part's error names the part's place instead)."""


def _models_in(annotation: object) -> set[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {annotation}
    found: set[type[BaseModel]] = set()
    for arg in typing.get_args(annotation):
        found |= _models_in(arg)
    if isinstance(annotation, types.UnionType):
        for arg in annotation.__args__:
            found |= _models_in(arg)
    return found


def reachable(model: type[BaseModel]) -> set[type[BaseModel]]:
    """The model and every model its fields hold, however deep."""
    seen, todo = set(), [model]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for info in current.model_fields.values():
            todo += _models_in(info.annotation)
    return seen


def wire_names(model: type[BaseModel]) -> set[str]:
    """The fields as a body spells them (a field with an alias, such as `schema`, by its alias)."""
    return {info.alias or name for name, info in model.model_fields.items()}


def route_of(model: type[BaseModel]) -> tuple[str, dict]:
    return next(route for top, route in TOP_LEVEL.items() if model in reachable(top))


def merge(base: dict, patch: dict) -> dict:
    """`patch` over `base`: objects merge key by key, anything else (lists too) is replaced."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def keys_of(value: object) -> set[str]:
    if isinstance(value, dict):
        return set(value).union(*(keys_of(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(keys_of(v) for v in value))
    return set()


@dataclass
class Observation:
    status: int
    requests: list[tuple[list[int], dict]]
    template: list | None
    reply: object
    client: dict
    error: str

    def engine(self, what: str) -> object:
        if what == "requests":
            return len(self.requests)
        if what == "prompt":
            return [prompt for prompt, _ in self.requests]
        return [params[what] for _, params in self.requests]


def _normalized(value: object) -> object:
    """A reply without what differs between any two replies (ids, creation times)."""
    if isinstance(value, dict):
        return {k: _normalized(v) for k, v in value.items() if k not in ("id", "created", "system_fingerprint")}
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    return value


def _reply_body(reply) -> object:
    text = reply.get_data(as_text=True)
    if reply.mimetype == "text/event-stream":
        frames = [f.removeprefix("data: ") for f in text.split("\n\n") if f]
        return [f if f == "[DONE]" else json.loads(f) for f in frames]
    return json.loads(text)


@pytest.fixture(scope="module")
def bos_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's tokenizer files, with a tokenizer that adds a BOS token (so add_special_tokens shows)."""
    folder = tmp_path_factory.mktemp("bos-model")
    for path in tiny_model_dir.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, folder / path.name)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    template = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}},
    }
    tokenizer["post_processor"] = {"type": "Sequence", "processors": [tokenizer["post_processor"], template]}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert TextTokenizer.load(str(folder)).encode("hi", add_special_tokens=True)[0] == 0
    return folder


@pytest.fixture()
def observe(bos_model_dir, scripted, make_client, monkeypatch):
    """observe(route, body) -> what the body did: status, engine requests, template input, reply, log fields."""
    templates: list = []
    logged: list[dict] = []
    original = TextTokenizer.apply_chat_template

    def spy(self, messages, tools=None, template_kwargs=None):
        templates.append(copy.deepcopy([messages, tools, template_kwargs]))
        return original(self, messages, tools, template_kwargs)

    monkeypatch.setattr(TextTokenizer, "apply_chat_template", spy)
    monkeypatch.setattr(serve.app, "log_request", lambda record: logged.append(record.fields()))

    def run(route: str, body: dict) -> Observation:
        engine = ScriptedEngine(engine_info(str(bos_model_dir)), scripted.script)
        templates.clear()
        logged.clear()
        reply = make_client(engine).post(route, json=body)
        data = _reply_body(reply)
        reply.close()
        error = ""
        if reply.status_code >= 400:
            inner = data["error"]
            error = inner if isinstance(inner, str) else f"{inner['message']} {inner['param']}"
        requests = [(r.prompt_token_ids, asdict(r.sampling_params)) for r in engine.submitted]
        client = logged[-1].get("client", {}) if logged else {}
        return Observation(
            reply.status_code, requests, templates[-1] if templates else None, _normalized(data), client, error
        )

    return run


def test_every_field_of_every_request_model_is_declared():
    models = set().union(*(reachable(top) for top in TOP_LEVEL))
    assert set(FIELD_USES) == models, "declare every request model (and every model nested in one)"
    for model in models:
        assert set(FIELD_USES[model]) == wire_names(model), f"{model.__name__}: declare each field once"


def test_pending_fields_are_few_and_owned():
    owned = {
        (m.__name__, name): use.issue
        for m, uses in FIELD_USES.items()
        for name, use in uses.items()
        if isinstance(use, Pending)
    }
    assert owned == {}


CASES = [(model, name, use) for model, uses in FIELD_USES.items() for name, use in uses.items()]


@pytest.mark.parametrize("model, name, use", CASES, ids=[f"{m.__name__}.{n}" for m, n, _ in CASES])
def test_each_field_does_what_it_declares(observe, model, name, use):
    assert name in keys_of(use.example), "the example must set the field it stands for"
    route, base = route_of(model)
    baseline = merge(base, use.given)
    before, after = observe(route, baseline), observe(route, merge(baseline, use.example))
    assert before.status == 200, before.reply
    if isinstance(use, Refused | Checked):
        assert 400 <= after.status < 500, after.reply
        assert after.requests == [], "a refused request must never reach the engine"
        if model in NAMED_IN_ERRORS:
            assert name in after.error, after.error
        return
    if isinstance(use, Pending):
        assert after == before, f"{name} now has an effect: declare what it does (issue {use.issue})"
        return
    assert after.status == 200, after.reply
    if isinstance(use, Engine):
        assert after.engine(use.what) != before.engine(use.what)
    elif isinstance(use, Template):
        assert after.template != before.template
    elif isinstance(use, Reply):
        assert after.reply != before.reply
    elif isinstance(use, Logged):
        assert after.client != before.client
        assert (after.requests, after.template, after.reply) == (before.requests, before.template, before.reply)
    else:
        raise AssertionError(f"unknown use {use!r}")


@pytest.mark.parametrize(
    "spec_name, model",
    [("CreateChatCompletionRequest", ChatCompletionRequest), ("CreateCompletionRequest", CompletionRequest)],
)
def test_every_field_of_openais_request_is_a_declared_field(spec_name, model):
    """OpenAI's own request schema (tests/specs): none of its fields may fall through as an unknown one."""
    from tests.openai_schema import _components

    schemas = _components()["schemas"]

    def properties(name: str) -> set[str]:
        schema = schemas[name]
        found: set[str] = set()
        for part in schema.get("allOf", [schema]):
            found |= properties(part["$ref"].rsplit("/", 1)[-1]) if "$ref" in part else set(part.get("properties", {}))
        return found

    missing = properties(spec_name) - wire_names(model)
    assert not missing, f"declare these OpenAI fields (used or refused): {sorted(missing)}"
