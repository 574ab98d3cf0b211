"""Token-level parsing of a gpt-oss (harmony) completion: ONE state machine for reasoning,
final content and tool calls.

Why token ids and not text: header pieces (`<|channel|>`, recipients, `<|constrain|>`) may
arrive in separate stream chunks, and decoded text loses the special tokens. Why our own
machine and not openai_harmony.StreamableParser: that one raises on tokens after the end of a
turn (ignore_eos runs past `<|return|>`/`<|call|>`), and a parser error must never become an
HTTP error. Here every token is accepted; what does not fit is ignored and counted.

Routing of messages (the policy is documented in docs and tests):
- channel `analysis`                         -> reasoning
- channel `final` (or no channel)            -> content
- recipient `functions.NAME`, NAME a tool of the request -> a tool call (id, name, arguments)
- `commentary` without recipient (preamble)  -> reasoning: preambles are interleaved with tool
  calls; clients that read `content` as the answer must not see them as one.
- any other recipient/channel (built-in tools we do not serve, unknown names) -> reasoning.
After a final message ends, or after `<|return|>`/`<|call|>`, the turn is over and all later
tokens are ignored (bounds repeated finals); a turn holds at most MAX_MESSAGES messages.
"""
from __future__ import annotations

import enum
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from .detokenize import Detokenizer, decode_lossy

MAX_MESSAGES = 32
FUNCTIONS_PREFIX = "functions."


@dataclass(frozen=True)
class HarmonySpecials:
    """Special token ids, read from the encoding (never hard-coded)."""
    start: int
    channel: int
    message: int
    end: int
    ret: int
    call: int
    constrain: int
    all_special: frozenset[int]

    @classmethod
    def from_encoding(cls, enc) -> HarmonySpecials:
        def one(s: str) -> int:
            (tid,) = enc.encode(s, allowed_special="all")
            return tid

        return cls(
            start=one("<|start|>"), channel=one("<|channel|>"), message=one("<|message|>"),
            end=one("<|end|>"), ret=one("<|return|>"), call=one("<|call|>"), constrain=one("<|constrain|>"),
            all_special=frozenset(one(s) for s in enc.special_tokens_set),
        )


class Kind(enum.Enum):
    REASONING = "reasoning"
    CONTENT = "content"
    TOOL_CALL = "tool_call"


@dataclass(frozen=True)
class Delta:
    """One parser event. For TOOL_CALL: the first delta of a call has `name` and `call_id` set and
    empty text; later ones carry argument text. `tool_index` counts tool calls from 0."""
    kind: Kind
    text: str = ""
    tool_index: int = -1
    call_id: str | None = None
    name: str | None = None


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class ParsedCompletion:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def apply(self, delta: Delta) -> None:
        if delta.kind is Kind.REASONING:
            self.reasoning += delta.text
        elif delta.kind is Kind.CONTENT:
            self.content += delta.text
        elif delta.call_id is not None:
            self.tool_calls.append(ToolCall(delta.call_id, delta.name or ""))
        else:
            self.tool_calls[delta.tool_index].arguments += delta.text


class _State(enum.Enum):
    HEADER = 1    # between <|start|> (or the prompt's trailing "<|start|>assistant") and <|message|>
    BODY = 2      # message content
    BETWEEN = 3   # after <|end|>, waiting for the next <|start|>
    DONE = 4      # turn over: every further token is ignored


@dataclass(frozen=True)
class _Header:
    kind: Kind
    tool_name: str | None = None


def parse_header(role_text: str, channel_text: str, tool_names: frozenset[str]) -> _Header:
    """Decide where a message goes. The recipient (` to=...`) may sit in the role part or the
    channel part; `<|constrain|>` text has already been split off by the caller."""
    words = role_text.split() + channel_text.split()
    recipient = next((w[3:] for w in words if w.startswith("to=")), None)
    channel_words = [w for w in channel_text.split() if not w.startswith("to=")]
    channel = channel_words[0] if channel_words else None
    if recipient is not None:
        if recipient.startswith(FUNCTIONS_PREFIX) and recipient[len(FUNCTIONS_PREFIX):] in tool_names:
            return _Header(Kind.TOOL_CALL, recipient[len(FUNCTIONS_PREFIX):])
        return _Header(Kind.REASONING)
    if channel is None or channel == "final":
        return _Header(Kind.CONTENT)
    return _Header(Kind.REASONING)


class HarmonyParser:
    """Feed completion token ids one at a time (or in chunks); get Deltas back.

    Starts in the header of an assistant message because the prompt ends with
    `<|start|>assistant`. Never raises on a token.
    """

    def __init__(self, enc, specials: HarmonySpecials, tool_names: Iterable[str] = (),
                 forced_header: Iterable[int] = ()):
        self._enc = enc
        self._sp = specials
        self._tool_names = frozenset(tool_names)
        self.result = ParsedCompletion()
        self.ended_by: str | None = None   # "return", "call", "final", "limit" once the turn is over
        self.num_ignored = 0
        self._state = _State.HEADER
        self._role: list[int] = []
        self._channel: list[int] | None = None
        self._in_constrain = False
        self._header: _Header | None = None
        self._body_text = Detokenizer(enc)   # holds back a character split across body tokens
        self._num_messages = 0
        self._num_tools = 0
        self._tool_started = False
        for tid in forced_header:   # the prompt's end, which the model continues: no deltas yet
            self._step(tid)

    @property
    def finished(self) -> bool:
        return self._state is _State.DONE

    @property
    def has_tool_calls(self) -> bool:
        return self._num_tools > 0

    def feed_many(self, token_ids: Iterable[int]) -> list[Delta]:
        out: list[Delta] = []
        for t in token_ids:
            out.extend(self.feed(t))
        return out

    def feed(self, tid: int) -> list[Delta]:
        out = self._step(tid)
        for d in out:
            self.result.apply(d)
        return out

    def _step(self, tid: int) -> list[Delta]:
        sp, st = self._sp, self._state
        if st is _State.DONE:
            self.num_ignored += 1
            return []
        if tid in (sp.ret, sp.call):
            out = self._close_message() if st is _State.BODY else []
            # The terminal token names the true end of the turn (pitfall 5: tool_calls vs stop).
            self._state = _State.DONE
            self.ended_by = "return" if tid == sp.ret else "call"
            return out
        if st is _State.HEADER:
            return self._feed_header(tid)
        if st is _State.BODY:
            return self._feed_body(tid)
        # BETWEEN messages: only a new header is meaningful.
        if tid == sp.start:
            self._begin_header(role_known=False)
        elif tid == sp.channel:   # model skipped "<|start|>assistant": tolerate it
            self._begin_header(role_known=True)
            self._channel = []
        else:
            self.num_ignored += 1
        return []

    def flush(self) -> list[Delta]:
        """End of the stream (length limit, stop string, ...): emit what is held back."""
        out = self._emit_text(self._body_text.flush()) if self._state is _State.BODY else []
        for d in out:
            self.result.apply(d)
        return out

    # -- internals ---------------------------------------------------------------------------
    def _finish(self, why: str) -> None:
        self._state = _State.DONE
        if self.ended_by is None:
            self.ended_by = why

    def _begin_header(self, role_known: bool) -> None:
        self._state = _State.HEADER
        self._role = [] if not role_known else self._role
        self._channel = None
        self._in_constrain = False

    def _feed_header(self, tid: int) -> list[Delta]:
        sp = self._sp
        if tid == sp.channel:
            self._channel = []
            self._in_constrain = False
        elif tid == sp.constrain:
            self._in_constrain = True
        elif tid == sp.message:
            self._open_message()
        elif tid == sp.start:
            self._begin_header(role_known=False)
        elif tid == sp.end:
            self._state = _State.BETWEEN
        elif tid in sp.all_special:
            self.num_ignored += 1
        elif self._in_constrain:
            pass   # content type (e.g. "json"): does not change where the message goes
        elif self._channel is not None:
            self._channel.append(tid)
        else:
            self._role.append(tid)
        return []

    def _open_message(self) -> None:
        role_text = decode_lossy(self._enc, self._role)
        channel_text = decode_lossy(self._enc, self._channel or [])
        self._header = parse_header(role_text, channel_text, self._tool_names)
        self._state = _State.BODY
        self._body_text = Detokenizer(self._enc)
        self._role = []
        self._tool_started = False

    def _feed_body(self, tid: int) -> list[Delta]:
        sp = self._sp
        if tid == sp.end:
            out = self._close_message()
            if self._state is not _State.DONE:
                self._state = _State.BETWEEN
            return out
        if tid == sp.start or tid == sp.channel:
            # A new header without <|end|>: close this message and continue leniently.
            out = self._close_message()
            if self._state is not _State.DONE:
                self._begin_header(role_known=tid == sp.channel)
                if tid == sp.channel:
                    self._channel = []
            return out
        if tid in sp.all_special:
            self.num_ignored += 1
            return []
        return self._emit_text(self._body_text.push((tid,)))

    def _emit_text(self, text: str) -> list[Delta]:
        """The tool call's opening delta on its first body token, then the body text, if any."""
        out = self._start_tool_call_if_needed()
        if text:
            h = self._header
            out.append(Delta(h.kind, text, tool_index=self._num_tools - 1 if h.kind is Kind.TOOL_CALL else -1))
        return out

    def _start_tool_call_if_needed(self) -> list[Delta]:
        h = self._header
        if h is None or h.kind is not Kind.TOOL_CALL or self._tool_started:
            return []
        self._tool_started = True
        self._num_tools += 1
        return [Delta(Kind.TOOL_CALL, "", self._num_tools - 1, "call_" + secrets.token_hex(12), h.tool_name)]

    def _close_message(self) -> list[Delta]:
        out = self._emit_text(self._body_text.flush())
        h = self._header
        self._header = None
        self._num_messages += 1
        if h is not None and h.kind is Kind.CONTENT:
            self._finish("final")
        elif self._num_messages >= MAX_MESSAGES:
            self._finish("limit")
        return out


def parse_completion(enc, specials: HarmonySpecials, token_ids: Iterable[int],
                     tool_names: Iterable[str] = ()) -> tuple[ParsedCompletion, HarmonyParser]:
    """Parse a whole completion (non-streaming); same machine as streaming."""
    p = HarmonyParser(enc, specials, tool_names)
    p.feed_many(token_ids)
    p.flush()
    return p.result, p
