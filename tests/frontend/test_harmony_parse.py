"""The token-level harmony parser on completions rendered by openai-harmony itself.

Every case is fed whole and streamed split at every token boundary (one token at a time and
in two chunks at each cut), and must give the same result."""
from __future__ import annotations

import pytest
from openai_harmony import Message, Role

from frontend_svc.harmony_parse import HarmonyParser, Kind, parse_completion

TOOLS = {"get_weather", "get_system_health"}


def T(enc, text):
    return enc.encode(text, allowed_special="all")


def completion(enc, *messages, end="<|return|>"):
    """Tokens the model would emit after the prompt's `<|start|>assistant`."""
    ids: list[int] = []
    for m in messages:
        ids += enc.render(m)
    start = T(enc, "<|start|>assistant")
    assert ids[:len(start)] == start
    ids = ids[len(start):]
    if end is not None:
        assert ids[-1] in T(enc, "<|end|><|call|>")   # harmony ends a tool call with <|call|>
        ids = ids[:-1] + T(enc, end)
    return ids


def analysis(t):
    return Message.from_role_and_content(Role.ASSISTANT, t).with_channel("analysis")


def final(t):
    return Message.from_role_and_content(Role.ASSISTANT, t).with_channel("final")


def call(name, args):
    return (Message.from_role_and_content(Role.ASSISTANT, args).with_channel("commentary")
            .with_recipient(f"functions.{name}").with_content_type("<|constrain|>json"))


def preamble(t):
    return Message.from_role_and_content(Role.ASSISTANT, t).with_channel("commentary")


def summary(result):
    return (result.reasoning, result.content, [(c.name, c.arguments) for c in result.tool_calls])


def assert_stream_invariant(enc, specials, ids, tools=TOOLS):
    """Whole, token-by-token, and every two-chunk split give the same result."""
    whole, p = parse_completion(enc, specials, ids, tools)
    expected = summary(whole)
    for cut in range(len(ids) + 1):
        s = HarmonyParser(enc, specials, tools)
        rebuilt_text = {Kind.REASONING: "", Kind.CONTENT: ""}
        deltas = s.feed_many(ids[:cut]) + s.feed_many(ids[cut:]) + s.flush()
        for d in deltas:
            if d.kind is not Kind.TOOL_CALL:
                rebuilt_text[d.kind] += d.text
        assert summary(s.result) == expected, cut
        assert (rebuilt_text[Kind.REASONING], rebuilt_text[Kind.CONTENT]) == expected[:2]
        assert s.ended_by == p.ended_by
    return whole, p


def test_reasoning_then_final(enc, specials):
    ids = completion(enc, analysis("Think héllo ✓."), final("The answer is 4."))
    r, p = assert_stream_invariant(enc, specials, ids)
    assert r.reasoning == "Think héllo ✓."
    assert r.content == "The answer is 4."
    assert r.tool_calls == []
    assert p.ended_by == "return"


def test_tool_call_rendered_by_harmony_recipient_in_role(enc, specials):
    ids = completion(enc, analysis("Need weather."), call("get_weather", '{"loc": "Paris"}'), end="<|call|>")
    assert "to=functions.get_weather<|channel|>" in enc.decode(ids)
    r, p = assert_stream_invariant(enc, specials, ids)
    assert r.reasoning == "Need weather."
    assert r.content == ""
    assert [(c.name, c.arguments) for c in r.tool_calls] == [("get_weather", '{"loc": "Paris"}')]
    assert r.tool_calls[0].id.startswith("call_")
    assert p.ended_by == "call" and p.has_tool_calls


@pytest.mark.parametrize("header", [
    "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>",
    "<|channel|>commentary to=functions.get_weather<|constrain|>json<|message|>",   # no space
    " to=functions.get_weather<|channel|>commentary<|constrain|>json<|message|>",   # in the role
    "<|channel|>commentary to=functions.get_weather json<|message|>",
])
def test_tool_call_header_variants(enc, specials, header):
    ids = T(enc, header + '{"loc":"x"}<|call|>')
    r, _ = assert_stream_invariant(enc, specials, ids)
    assert [(c.name, c.arguments) for c in r.tool_calls] == [("get_weather", '{"loc":"x"}')]
    assert "<|" not in r.tool_calls[0].name


def test_unknown_tool_is_not_a_tool_call(enc, specials):
    ids = T(enc, "<|channel|>commentary to=functions.rm_rf<|constrain|>json<|message|>{}<|call|>")
    r, _ = assert_stream_invariant(enc, specials, ids)
    assert r.tool_calls == [] and r.reasoning == "{}"


def test_name_strips_exactly_functions_prefix(enc, specials):
    ids = T(enc, "<|channel|>commentary to=functions.functions.get_weather<|message|>{}<|call|>")
    r, _ = parse_completion(enc, specials, ids, TOOLS | {"functions.get_weather"})
    # "functions.get_weather" is not a valid tool name in the request's schema sense, but
    # stripping must remove one prefix only.
    assert [c.name for c in r.tool_calls] == ["functions.get_weather"]


def test_preamble_goes_to_reasoning(enc, specials):
    ids = completion(enc, preamble("Let me check."), call("get_system_health", "{}"), end="<|call|>")
    r, _ = assert_stream_invariant(enc, specials, ids)
    assert r.reasoning == "Let me check."
    assert r.content == ""
    assert [c.name for c in r.tool_calls] == ["get_system_health"]


def test_junk_after_return_is_ignored(enc, specials):
    ids = completion(enc, final("Done.")) + T(enc, "<|start|>assistant<|channel|>final<|message|>again<|end|>") \
        + T(enc, "random words <|return|><|call|>") + [201000, 199999]
    r, p = assert_stream_invariant(enc, specials, ids)
    assert r.content == "Done."
    assert p.num_ignored > 0


def test_junk_after_call_is_ignored(enc, specials):
    ids = completion(enc, call("get_weather", "{}"), end="<|call|>") + T(enc, "<|message|>x<|start|>") + [200012] * 5
    r, p = assert_stream_invariant(enc, specials, ids)
    assert len(r.tool_calls) == 1 and p.ended_by == "call"


def test_return_or_call_in_the_middle_ends_turn(enc, specials):
    ids = T(enc, "<|channel|>analysis<|message|>thinking<|return|><|channel|>final<|message|>late<|end|>")
    r, p = assert_stream_invariant(enc, specials, ids)
    assert r.reasoning == "thinking" and r.content == "" and p.ended_by == "return"
    ids = T(enc, "<|channel|>analysis<|call|>junk<|message|>")
    r, p = assert_stream_invariant(enc, specials, ids)
    assert p.ended_by == "call" and r.reasoning == ""


def test_repeated_final_is_bounded(enc, specials):
    ids = completion(enc, final("One."), end=None) + completion(enc, final("Two."), end=None)[0:0] \
        + T(enc, "<|start|>assistant<|channel|>final<|message|>Two.<|end|>") * 3
    r, _ = assert_stream_invariant(enc, specials, ids)
    assert r.content == "One."


def test_many_analysis_messages_bounded(enc, specials):
    ids = T(enc, "<|channel|>analysis<|message|>a<|end|>") + \
        T(enc, "<|start|>assistant<|channel|>analysis<|message|>a<|end|>") * 100
    r, p = parse_completion(enc, specials, ids, TOOLS)
    assert p.ended_by == "limit" and len(r.reasoning) < 100


def test_truncated_by_length_flushes(enc, specials):
    ids = completion(enc, analysis("abc"), final("partial answer"), end=None)[:-2]
    r, p = assert_stream_invariant(enc, specials, ids)
    assert r.content.startswith("partial") and p.ended_by is None


def test_no_channel_is_content_and_random_tokens_never_raise(enc, specials):
    import random
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(0, 201088) for _ in range(40)] + [rng.choice([200005, 200006, 200008, 200007]) for _ in range(10)]
        rng.shuffle(ids)
        parse_completion(enc, specials, ids, TOOLS)   # must not raise
    r, _ = parse_completion(enc, specials, T(enc, "<|message|>plain<|return|>"), TOOLS)
    assert r.content == "plain"


def test_streamed_tool_deltas(enc, specials):
    ids = completion(enc, call("get_weather", '{"loc": "Paris, France"}'), end="<|call|>")
    p = HarmonyParser(enc, specials, TOOLS)
    deltas = [d for t in ids for d in p.feed(t)]
    tool = [d for d in deltas if d.kind is Kind.TOOL_CALL]
    assert tool[0].name == "get_weather" and tool[0].call_id and tool[0].text == ""
    assert len(tool) > 2   # arguments arrive in several deltas
    assert "".join(d.text for d in tool[1:]) == '{"loc": "Paris, France"}'
    assert all(d.tool_index == 0 for d in tool)


@pytest.mark.parametrize("forced,generated,name", [
    # tool_choice names get_weather: the prompt holds the whole header, the model writes arguments
    (" to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>", '{"city": "Oslo"}<|call|>',
     "get_weather"),
    # "required" with several tools: the prompt stops after " to=functions", the model names one
    (" to=functions", '.get_system_health<|channel|>commentary <|constrain|>json<|message|>{"city": "Oslo"}<|call|>',
     "get_system_health"),
])
def test_forced_header_starts_the_parser_inside_a_call(enc, specials, forced, generated, name):
    p = HarmonyParser(enc, specials, TOOLS, T(enc, forced))
    deltas = [d for t in T(enc, generated) for d in p.feed(t)]
    assert deltas[0].kind is Kind.TOOL_CALL and deltas[0].name == name and deltas[0].call_id
    assert [(c.name, c.arguments) for c in p.result.tool_calls] == [(name, '{"city": "Oslo"}')]
    assert p.ended_by == "call" and not p.result.content and not p.result.reasoning
