"""Rendering chat requests into harmony prompts: reasoning effort, tools, multi-turn rules."""
from __future__ import annotations

import pytest

from frontend_svc.harmony_render import RenderError, ToolChoice, render_chat
from frontend_svc.openai_models import ChatCompletionRequest

HEALTH_TOOL = {"type": "function", "function": {
    "name": "get_system_health", "description": "Returns the current health status of the LLM runtime.",
    "parameters": {"type": "object", "properties": {}}}}


def render(enc, body):
    req = ChatCompletionRequest.model_validate({"model": "m", **body})
    p = render_chat(enc, req.messages, [t.function for t in req.tools or []], req.effort(),
                    ToolChoice.of(req.tool_choice))
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


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
ASK = {"messages": [{"role": "user", "content": "up?"}], "tools": [HEALTH_TOOL, WEATHER_TOOL]}


def test_tool_choice_none_offers_no_tool(enc):
    text, p = render(enc, {**ASK, "tool_choice": "none"})
    assert "get_system_health" not in text and "get_weather" not in text
    assert p.tool_names == frozenset() and p.forced_header == ()
    assert text.endswith("<|start|>assistant")
    _, auto = render(enc, ASK)
    assert auto.tool_names == {"get_system_health", "get_weather"} and auto.forced_header == ()


def test_named_tool_choice_ends_the_prompt_in_that_call_header_as_harmony_renders_it(enc):
    """The forced header must be the very tokens openai-harmony writes for an assistant's call."""
    call = {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "get_weather", "arguments": "{}"}}]}
    _, history = render(enc, {**ASK, "messages": ASK["messages"] + [call]})
    ids = history.token_ids   # ... <|start|>assistant HEADER<|message|>{}<|call|> <|start|>assistant
    (start,), (assistant,), (message,) = (enc.encode(t, allowed_special="all")
                                          for t in ("<|start|>", "assistant", "<|message|>"))
    call_at = max(i for i in range(len(ids) - 2) if ids[i:i + 2] == [start, assistant])
    rendered_call = ids[call_at + 2:ids.index(message, call_at) + 1]
    text, p = render(enc, {**ASK, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert list(p.forced_header) == rendered_call
    assert p.token_ids[-len(p.forced_header):] == rendered_call
    assert text.endswith("<|start|>assistant to=functions.get_weather"
                         "<|channel|>commentary <|constrain|>json<|message|>")


def test_required_forces_the_only_tool_and_leaves_the_name_open_with_several(enc):
    one, _ = render(enc, {**ASK, "tools": [WEATHER_TOOL], "tool_choice": "required"})
    assert one.endswith("<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>")
    several, _ = render(enc, {**ASK, "tool_choice": "required"})
    assert several.endswith("<|start|>assistant to=functions")


@pytest.mark.parametrize("body", [{**ASK, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                                  {"messages": ASK["messages"], "tool_choice": "required"}])
def test_impossible_tool_choice_is_refused(enc, body):
    with pytest.raises(RenderError) as e:
        render(enc, body)
    assert e.value.param == "tool_choice"
