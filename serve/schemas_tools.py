"""Request models for tools and structured output: `tools`, `tool_choice`, tool calls in the history, OpenAI's and
TGI's `response_format`, and TGI's `parameters.grammar`; each format turns itself into an `AnswerFormat`.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from model_handler.constraints import ConstraintKind
from serve.errors import validation
from serve.structural_tags import AnswerFormat

JsonSchema = dict[str, Any]
"""A JSON Schema document: any JSON object (its keywords are JSON Schema's, checked when it compiles)."""
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


# ---- tools ----------------------------------------------------------------------------------------


class FunctionDefinition(_Body):
    name: StrictStr
    description: StrictStr | None = None
    parameters: JsonSchema | None = None
    """None: the function takes no arguments (OpenAI's reading of an omitted schema)."""
    strict: StrictBool | None = None
    """True: the arguments take no properties beyond those listed; otherwise JSON Schema's defaults apply."""

    def arguments_schema(self) -> JsonSchema:
        if self.parameters is None:
            return {"type": "object", "properties": {}, "additionalProperties": False}
        return self.parameters


class FunctionTool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: StrictStr


class NamedToolChoice(_Body):
    """`{"type": "function", "function": {"name": ...}}`: exactly one call of that tool."""

    type: Literal["function"]
    function: FunctionName


class AllowedTool(_Body):
    type: Literal["function"]
    function: FunctionName


class AllowedTools(_Body):
    mode: Literal["auto", "required"]
    tools: list[AllowedTool] = Field(min_length=1)


class AllowedToolsChoice(_Body):
    """`{"type": "allowed_tools", ...}`: only these tools may be called (the template still sees them all)."""

    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolsChoice | StrictStr
"""OpenAI's forms, and TGI's bare function name."""


def check_tool_names(tools: list[FunctionTool]) -> None:
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        name = tool.function.name
        if not _TOOL_NAME.match(name):
            raise validation(
                f"Invalid 'tools[{index}].function.name': '{name}'. Expected a string of letters, digits, "
                "underscores and dashes, at most 64 long.",
                f"tools.{index}.function.name",
            )
        if name in seen:
            raise validation(f"Invalid 'tools': the function name '{name}' appears twice.", "tools")
        seen.add(name)


# ---- tool calls in the conversation ---------------------------------------------------------------


class CalledFunction(_Body):
    name: StrictStr
    arguments: StrictStr | dict[str, Any]
    """A JSON string (OpenAI); an object is taken too (TGI's older replies sent one)."""


class MessageToolCall(_Body):
    id: StrictStr
    type: Literal["function"] = "function"
    function: CalledFunction

    def template_dict(self, where: str, call_id: str) -> dict:
        """As chat templates expect a call: `arguments` as an object, not a string."""
        arguments = self.function.arguments
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise validation(
                    f"Invalid '{where}.function.arguments': not JSON ({exc.msg}).", f"{where}.function.arguments"
                ) from None
        return {"id": call_id, "type": "function", "function": {"name": self.function.name, "arguments": arguments}}


# ---- response formats -----------------------------------------------------------------------------


class JsonSchemaSpec(_Body):
    name: StrictStr | None = None
    """The format's name: it goes to the request's log line (and into the note a description makes)."""
    description: StrictStr | None = None
    """What the format is for: shown to the model (OpenAI: "used by the model to determine how to respond")."""
    schema_: JsonSchema | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None

    def note(self) -> str | None:
        """The instruction the description makes, or None without one."""
        if self.description is None:
            return None
        named = f' "{self.name}"' if self.name else ""
        return f"Answer with JSON in the format{named}: {self.description}"

    def answer_format(self, default_strict: bool, param: str = "response_format") -> AnswerFormat:
        if self.schema_ is None:
            return AnswerFormat(ConstraintKind.JSON_OBJECT)
        strict = default_strict if self.strict is None else self.strict
        return AnswerFormat(ConstraintKind.JSON_SCHEMA, json.dumps(self.schema_), strict)


class TextFormat(_Body):
    type: Literal["text"]

    def answer_format(self, param: str = "response_format") -> AnswerFormat | None:
        return None


class JsonObjectFormat(_Body):
    """OpenAI's any-JSON-object; TGI's alias of `json`, with the schema in `value`."""

    type: Literal["json_object"]
    value: JsonSchema | StrictStr | None = None

    def answer_format(self, param: str = "response_format") -> AnswerFormat:
        if self.value is None:
            return AnswerFormat(ConstraintKind.JSON_OBJECT)
        return _tgi_schema(self.value, param)


class JsonSchemaFormat(_Body):
    """OpenAI's `{"type": "json_schema", "json_schema": {...}}`; TGI puts the same object in `value`."""

    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec | None = None
    value: JsonSchemaSpec | None = None

    @property
    def spec(self) -> JsonSchemaSpec | None:
        return self.json_schema if self.json_schema is not None else self.value

    def answer_format(self, param: str = "response_format") -> AnswerFormat:
        if (self.json_schema is None) == (self.value is None):
            raise validation(
                f"Invalid '{param}': a json_schema format needs exactly one of 'json_schema' (OpenAI) "
                "or 'value' (TGI).",
                f"{param}.json_schema",
            )
        if self.json_schema is not None:
            return self.json_schema.answer_format(default_strict=False)  # OpenAI's default
        return self.value.answer_format(default_strict=True)  # TGI constrains to the schema's listed properties


class TgiJsonFormat(_Body):
    """TGI's `{"type": "json", "value": <schema, or the schema as a JSON string>}`."""

    type: Literal["json"]
    value: JsonSchema | StrictStr

    def answer_format(self, param: str = "response_format") -> AnswerFormat:
        return _tgi_schema(self.value, param)


class RegexFormat(_Body):
    """TGI's `{"type": "regex", "value": <a regular expression the whole output matches>}`."""

    type: Literal["regex"]
    value: StrictStr

    def answer_format(self, param: str = "response_format") -> AnswerFormat:
        return AnswerFormat(ConstraintKind.REGEX, self.value)


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat | TgiJsonFormat | RegexFormat, Field(discriminator="type")
]
"""Chat's `response_format`: OpenAI's shapes and TGI's."""


class TgiJsonObjectGrammar(JsonObjectFormat):
    value: JsonSchema | StrictStr


class TgiJsonSchemaGrammar(_Body):
    type: Literal["json_schema"]
    value: JsonSchemaSpec

    def answer_format(self, param: str = "grammar") -> AnswerFormat:
        return self.value.answer_format(default_strict=True, param=param)


Grammar = Annotated[
    TgiJsonFormat | TgiJsonObjectGrammar | TgiJsonSchemaGrammar | RegexFormat, Field(discriminator="type")
]
"""TGI's `parameters.grammar` on `/generate`: `{"type": "json" | "json_object" | "json_schema" | "regex", "value"}`."""


def _tgi_schema(value: JsonSchema | str, param: str) -> AnswerFormat:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise validation(f"{param} is not valid: the schema is not JSON ({exc.msg})", f"{param}.value") from None
        if not isinstance(value, dict):
            raise validation(f"{param} is not valid: the schema must be a JSON object", f"{param}.value")
    return AnswerFormat(ConstraintKind.JSON_SCHEMA, json.dumps(value), strict=True)
