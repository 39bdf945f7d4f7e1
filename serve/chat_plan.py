"""Everything a chat request decides before generation: the rendered prompt, the output constraint, what to look
for in the output (reasoning, tool calls), and the special tokens the output must keep visible for that."""

from __future__ import annotations

from dataclasses import dataclass

from model_handler.constraints import Constraint
from serve.chat_output import OutputShape
from serve.chat_prompt import render_chat_prompt
from serve.errors import validation
from serve.reasoning import THINK_CLOSE, THINK_OPEN, ReasoningStart
from serve.schemas_openai import ChatCompletionRequest
from serve.schemas_tools import JsonSchemaFormat
from serve.structural_tags import build_constraint
from serve.tokenizer import TextTokenizer
from serve.tool_choice import tool_plan
from serve.tool_formats import ToolSupport


@dataclass(frozen=True, slots=True)
class ChatPlan:
    prompt: str
    constraint: Constraint | None
    shape: OutputShape
    visible_ids: dict[int, str]
    """Special tokens whose text the output keeps (tool-call markers and think tags the parser reads)."""


def plan_chat(req: ChatCompletionRequest, tokenizer: TextTokenizer, support: ToolSupport) -> ChatPlan:
    plan = tool_plan(req.tools, req.tool_choice, req.parallel_tool_calls, support.format)
    tools = [tool.model_dump(exclude_none=True) for tool in req.tools] if plan is not None else None
    messages = req.template_messages(support)
    template_kwargs = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort is not None:
        if "reasoning_effort" not in tokenizer.chat_template_source:
            raise validation(
                "Invalid 'reasoning_effort': this model's chat template takes no reasoning effort.", "reasoning_effort"
            )
        template_kwargs["reasoning_effort"] = req.reasoning_effort
    spec = req.response_format.spec if isinstance(req.response_format, JsonSchemaFormat) else None
    note = spec.note() if spec is not None else None
    prompt = render_chat_prompt(tokenizer, messages, tools, support, template_kwargs, req.tool_prompt, note)
    if req.thinking_token_budget is not None and THINK_OPEN not in tokenizer.chat_template_source:
        raise validation(
            "Invalid 'thinking_token_budget': this model's chat template has no reasoning block.",
            "thinking_token_budget",
        )
    answer = req.response_format.answer_format() if req.response_format is not None else None
    constraint = build_constraint(answer, plan, prompt.reasoning, req.thinking_token_budget)
    names = frozenset(tool.name for tool in plan.tools) if plan is not None else frozenset()
    shape = OutputShape(
        prompt.reasoning,
        plan.format if plan is not None else None,
        names,
        calls_only=plan is not None and plan.required and answer is None,
    )
    markers = [plan.format.opener] if plan is not None and plan.format.opener_is_token else []
    if shape.reasoning is not ReasoningStart.NONE:
        markers += [THINK_OPEN, THINK_CLOSE]
    visible = {}
    for marker in markers:
        token_id = tokenizer.token_id(marker)
        if token_id is not None and tokenizer.is_special(token_id):
            visible[token_id] = marker
    return ChatPlan(prompt.text, constraint, shape, visible)
