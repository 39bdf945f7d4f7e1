"""`tools`, `tool_choice` and `parallel_tool_calls` checked together and resolved into the calls a request allows."""

from __future__ import annotations

import json

from serve.errors import validation
from serve.schemas_tools import AllowedToolsChoice, FunctionTool, NamedToolChoice, ToolChoice, check_tool_names
from serve.structural_tags import ToolPlan, ToolSpec
from serve.tool_formats import ToolCallFormat


def check_tools(tools: list[FunctionTool] | None, tool_choice: ToolChoice | None) -> None:
    """400 for a choice without tools, or naming a tool that is not given (OpenAI's wording). (Without tools,
    `parallel_tool_calls` holds trivially: clients send it with every request, so it is not refused.)"""
    if not tools:
        if tool_choice is not None:
            raise validation(
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                "tool_choice",
            )
        return
    check_tool_names(tools)
    names = {tool.function.name for tool in tools}
    for name in _named(tool_choice):
        if name not in names:
            raise validation(
                f"Invalid value for 'tool_choice': no function named '{name}' was given in 'tools'.", "tool_choice"
            )


def tool_plan(
    tools: list[FunctionTool] | None, tool_choice: ToolChoice | None, parallel: bool | None, fmt: ToolCallFormat
) -> ToolPlan | None:
    """The calls allowed (None: no calls; the tools do not reach the prompt either). Call `check_tools` first."""
    choice = tool_choice if tool_choice is not None else "auto"
    if not tools or choice == "none":
        return None
    allowed = tools
    required = choice == "required"
    if isinstance(choice, AllowedToolsChoice):
        names = set(_named(choice))
        allowed = [tool for tool in tools if tool.function.name in names]
        required = choice.allowed_tools.mode == "required"
    elif isinstance(choice, NamedToolChoice) or choice not in ("auto", "required"):
        name = _named(choice)[0]
        allowed = [tool for tool in tools if tool.function.name == name]
        return ToolPlan(fmt, _specs(allowed), required=True, parallel=False)
    return ToolPlan(fmt, _specs(allowed), required, parallel=True if parallel is None else parallel)


def _named(choice: ToolChoice | None) -> list[str]:
    if isinstance(choice, NamedToolChoice):
        return [choice.function.name]
    if isinstance(choice, AllowedToolsChoice):
        return [tool.function.name for tool in choice.allowed_tools.tools]
    if isinstance(choice, str) and choice not in ("none", "auto", "required"):
        return [choice]  # TGI's bare function name
    return []


def _specs(tools: list[FunctionTool]) -> tuple[ToolSpec, ...]:
    return tuple(
        ToolSpec(t.function.name, json.dumps(t.function.arguments_schema()), bool(t.function.strict)) for t in tools
    )
