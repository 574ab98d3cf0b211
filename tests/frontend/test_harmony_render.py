"""Rendering chat requests into harmony prompts: reasoning effort, tools, multi-turn rules."""
from __future__ import annotations

import pytest

from frontend_svc.harmony_render import RenderError, render_chat
from frontend_svc.openai_models import ChatCompletionRequest

HEALTH_TOOL = {"type": "function", "function": {
    "name": "get_system_health", "description": "Returns the current health status of the LLM runtime.",
    "parameters": {"type": "object", "properties": {}}}}


def render(enc, body):
    req = ChatCompletionRequest.model_validate({"model": "m", **body})
    p = render_chat(enc, req.messages, [t.function for t in req.tools or []], req.effort())
    return enc.decode(p.token_ids), p


def system_message(text):
    return text.split("<|end|>", 1)[0]


@pytest.mark.parametrize("where", ["top", "chat_template_args"])
def test_reasoning_effort_high(enc, where):
    body = {"messages": [{"role": "user", "content": "hi"}]}
    if where == "top":
        body["reasoning_effort"] = "high"
    else:
        body["chat_template_args"] = {"reasoning_effort": "high"}
    text, _ = render(enc, body)
    assert "Reasoning: high" in system_message(text)
    assert text.endswith("<|start|>assistant")


def test_tools_and_instructions_in_developer_message(enc):
    text, p = render(enc, {"messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "up?"}], "tools": [HEALTH_TOOL]})
    dev = text.split("<|start|>developer<|message|>", 1)[1].split("<|end|>", 1)[0]
    assert "Be brief." in dev and "type get_system_health = () => any;" in dev
    assert p.tool_names == frozenset({"get_system_health"})


def test_seed_tool_round_trip_renders_call_and_result(enc):
    text, _ = render(enc, {"messages": [
        {"role": "user", "content": "Hey, quick check: is everything up and running?"},
        {"role": "assistant", "reasoning_content": "Use the tool.", "tool_calls": [
            {"id": "call-1", "type": "function", "function": {"name": "get_system_health", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": '{"status":"ok"}'},
    ], "tools": [HEALTH_TOOL]})
    assert "<|start|>assistant<|channel|>analysis<|message|>Use the tool.<|end|>" in text  # kept: tool loop open
    assert "<|start|>assistant to=functions.get_system_health<|channel|>commentary <|constrain|>json<|message|>{}<|call|>" in text
    assert ('<|start|>functions.get_system_health to=assistant<|channel|>commentary<|message|>{"status":"ok"}<|end|>'
            in text)


def test_earlier_analysis_dropped_after_final_and_reasoning_alias(enc):
    text, _ = render(enc, {"messages": [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "reasoning": "OLD-THOUGHT", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]})
    assert "OLD-THOUGHT" not in text
    assert "<|start|>assistant<|channel|>final<|message|>a1<|end|>" in text   # <|return|> stored as <|end|>
    assert "<|return|>" not in text


def test_tool_message_without_known_call_is_an_error(enc):
    with pytest.raises(RenderError) as e:
        render(enc, {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "nope", "content": "1"}]})
    assert e.value.param == "messages[1].tool_call_id"
