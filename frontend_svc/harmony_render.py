"""Rendering OpenAI chat messages + tools into a harmony prompt (token ids), with openai-harmony.

Multi-turn rules (harmony format.md):
- chain-of-thought (analysis) of earlier turns that ended in a final answer is dropped; the
  analysis between a tool call and its result (the turn still in progress) is kept;
- an assistant's tool call is rendered as commentary `to=functions.NAME` with `<|constrain|>json`;
- a tool result is authored by `functions.NAME`, addressed `to=assistant`, on commentary;
- a stored assistant answer ends with `<|end|>` (openai-harmony renders history that way,
  never `<|return|>`).
"""
from __future__ import annotations

from dataclasses import dataclass

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
    ToolDescription,
)

from .openai_models import ChatMessage, FunctionDef

_EFFORT = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}


class RenderError(ValueError):
    """The conversation cannot be rendered; `param` names the offending request field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class RenderedPrompt:
    token_ids: list[int]
    tool_names: frozenset[str]


def _tool_descriptions(tools: list[FunctionDef]) -> list[ToolDescription]:
    # A tool without properties renders as `() => any` (as in OpenAI's examples), not `(_: {})`.
    return [ToolDescription.new(t.name, t.description or "",
                                parameters=t.parameters if (t.parameters or {}).get("properties") else None)
            for t in tools]


def _last_final_index(messages: list[ChatMessage]) -> int:
    """Index of the last assistant message that holds a final answer (content), or -1."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m.role == "assistant" and m.text():
            return i
    return -1


def build_messages(messages: list[ChatMessage], tools: list[FunctionDef], effort: str | None) -> list[Message]:
    system = SystemContent.new()
    if effort:
        system = system.with_reasoning_effort(_EFFORT[effort])
    out = [Message.from_role_and_content(Role.SYSTEM, system)]

    instructions = "\n\n".join(m.text() for m in messages if m.role in ("system", "developer") and m.text())
    if instructions or tools:
        dev = DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions(instructions)
        if tools:
            dev = dev.with_function_tools(_tool_descriptions(tools))
        out.append(Message.from_role_and_content(Role.DEVELOPER, dev))

    drop_analysis_until = _last_final_index(messages)
    call_names: dict[str, str] = {}
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.role in ("system", "developer"):
            continue
        if m.role == "user":
            out.append(Message.from_role_and_content(Role.USER, m.text()))
        elif m.role == "assistant":
            reasoning = m.reasoning_text()
            if reasoning and i > drop_analysis_until:
                out.append(Message.from_role_and_content(Role.ASSISTANT, reasoning).with_channel("analysis"))
            for j, tc in enumerate(m.tool_calls or []):
                if tc.id:
                    call_names[tc.id] = tc.function.name
                out.append(Message.from_role_and_content(Role.ASSISTANT, tc.function.arguments or "{}")
                           .with_channel("commentary")
                           .with_recipient(f"functions.{tc.function.name}")
                           .with_content_type("<|constrain|>json"))
            if m.text():
                out.append(Message.from_role_and_content(Role.ASSISTANT, m.text()).with_channel("final"))
        else:  # tool
            name = m.name or (call_names.get(m.tool_call_id) if m.tool_call_id else None)
            if not name:
                raise RenderError(f"{where}: tool message needs a tool_call_id of an earlier tool call "
                                  "(or a name)", f"{where}.tool_call_id")
            out.append(Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), m.text())
                       .with_recipient("assistant").with_channel("commentary"))
    return out


def render_chat(enc, messages: list[ChatMessage], tools: list[FunctionDef], effort: str | None) -> RenderedPrompt:
    """Token ids of the prompt, ending with `<|start|>assistant` (the parser starts there)."""
    convo = Conversation.from_messages(build_messages(messages, tools, effort))
    # We drop analysis ourselves (rules above); harmony's own dropping must not interfere.
    ids = enc.render_conversation_for_completion(convo, Role.ASSISTANT, RenderConversationConfig(auto_drop_analysis=False))
    return RenderedPrompt(list(ids), frozenset(t.name for t in tools))
