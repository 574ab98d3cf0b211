"""Rendering OpenAI chat messages + tools into a harmony prompt (token ids), with openai-harmony.

Multi-turn rules (harmony format.md):
- chain-of-thought (analysis) of earlier turns that ended in a final answer is dropped; the
  analysis between a tool call and its result (the turn still in progress) is kept;
- an assistant's tool call is rendered as commentary `to=functions.NAME` with `<|constrain|>json`;
- a tool result is authored by `functions.NAME`, addressed `to=assistant`, on commentary;
- a stored assistant answer ends with `<|end|>` (openai-harmony renders history that way,
  never `<|return|>`).

tool_choice: "none" offers no tool (the model is not told of any); a named function is forced by
ending the prompt inside that call's header, ` to=functions.NAME<|channel|>commentary
<|constrain|>json<|message|>` (the form openai-harmony renders calls in), so the model writes only
the arguments; "required" does that for the only tool, and with several stops after
` to=functions`, leaving the name to the model (no grammar holds it to the list: a name that is
not a tool ends as reasoning, with no tool call).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
class ToolChoice:
    mode: Literal["auto", "none", "required", "function"] = "auto"
    name: str | None = None   # mode "function": the function to call

    @classmethod
    def of(cls, tool_choice) -> ToolChoice:
        """From a request's tool_choice: None (auto), a mode string, or a named-function object."""
        if tool_choice is None:
            return cls()
        return cls(tool_choice) if isinstance(tool_choice, str) else cls("function", tool_choice.name)


@dataclass(frozen=True)
class RenderedPrompt:
    token_ids: list[int]
    tool_names: frozenset[str]   # the tools offered: a call to any other name is not a tool call
    # The completion's first tokens, already at the end of token_ids (a forced tool call's
    # header): the parser reads them before the generated tokens.
    forced_header: tuple[int, ...] = ()


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


def _forced_header(choice: ToolChoice, tools: list[FunctionDef]) -> str:
    """Text after `<|start|>assistant` that commits the model to a tool call ("" for none)."""
    if choice.mode == "function":
        name = choice.name
    elif choice.mode == "required" and len(tools) == 1:
        name = tools[0].name
    elif choice.mode == "required":
        return " to=functions"
    else:
        return ""
    return f" to=functions.{name}<|channel|>commentary <|constrain|>json<|message|>"


def render_chat(enc, messages: list[ChatMessage], tools: list[FunctionDef], effort: str | None,
                choice: ToolChoice = ToolChoice()) -> RenderedPrompt:
    """Token ids of the prompt, ending with `<|start|>assistant` (the parser starts there), or
    with a forced tool call's header after it."""
    if choice.mode == "function" and choice.name not in {t.name for t in tools}:
        raise RenderError(f"tool_choice names {choice.name!r}, which is not one of the tools", "tool_choice")
    if choice.mode == "required" and not tools:
        raise RenderError("tool_choice 'required' needs at least one tool", "tool_choice")
    offered = [] if choice.mode == "none" else tools
    convo = Conversation.from_messages(build_messages(messages, offered, effort))
    # We drop analysis ourselves (rules above); harmony's own dropping must not interfere.
    ids = enc.render_conversation_for_completion(convo, Role.ASSISTANT, RenderConversationConfig(auto_drop_analysis=False))
    header = enc.encode(_forced_header(choice, offered), allowed_special="all")
    return RenderedPrompt(list(ids) + header, frozenset(t.name for t in offered), tuple(header))
