"""Pydantic models of the OpenAI requests we accept (chat, responses, completions).

Unknown fields are ignored (clients and benchmark tools send vendor extras); known fields are
validated, and a validation error names the offending parameter (see errors.py).
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ReasoningEffortName = Literal["low", "medium", "high"]
ToolChoiceMode = Literal["none", "auto", "required"]
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionDef(_Lenient):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _TOOL_NAME.match(v):
            raise ValueError("tool name must match ^[A-Za-z0-9_-]{1,64}$")
        return v

    @field_validator("parameters")
    @classmethod
    def _params(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type", "object") != "object":
            raise ValueError("function parameters must be a JSON schema of type 'object'")
        return v


class ChatTool(_Lenient):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Lenient):
    name: str


class ChatToolChoice(_Lenient):
    """tool_choice {"type": "function", "function": {"name": ...}}: call this function."""
    type: Literal["function"]
    function: FunctionName

    @property
    def name(self) -> str:
        return self.function.name


class ToolCallFunction(_Lenient):
    name: str
    arguments: str = ""


class ToolCallIn(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    # Both spellings are in use (vLLM renamed reasoning_content to reasoning): accept either.
    reasoning_content: str | None = None
    reasoning: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type in ("text", "input_text", "output_text"))

    def reasoning_text(self) -> str | None:
        return self.reasoning_content if self.reasoning_content is not None else self.reasoning


class StreamOptions(_Lenient):
    include_usage: bool = False


class NvExt(_Lenient):
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    top_k: int | None = None


class _Sampling(_Lenient):
    """Sampling fields shared by all three endpoints."""
    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(default=None, ge=0)
    nvext: NvExt | None = None
    n: int = Field(default=1, ge=1, le=1)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: at most 4 non-empty strings")
        return stops

    def effective_ignore_eos(self) -> bool:
        nv = self.nvext.ignore_eos if self.nvext else None
        return bool(self.ignore_eos or nv)

    def effective_min_tokens(self) -> int:
        nv = self.nvext.min_tokens if self.nvext else None
        return int(self.min_tokens or nv or 0)

    def effective_top_k(self) -> int:
        k = self.top_k if self.top_k is not None else (self.nvext.top_k if self.nvext else None)
        return max(0, int(k or 0))


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoiceMode | ChatToolChoice | None = None   # None: "auto"
    reasoning_effort: ReasoningEffortName | None = None
    chat_template_args: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("chat_template_args")
    @classmethod
    def _cta(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v and "reasoning_effort" in v and v["reasoning_effort"] not in ("low", "medium", "high"):
            raise ValueError("chat_template_args.reasoning_effort must be one of low, medium, high")
        return v

    @model_validator(mode="after")
    def _tool_names_unique(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or []]
        if len(names) != len(set(names)):
            raise ValueError("tools: function names must be unique")
        return self

    def effort(self) -> str | None:
        if self.reasoning_effort:
            return self.reasoning_effort
        return (self.chat_template_args or {}).get("reasoning_effort")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ResponsesTool(_Lenient):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None

    def as_function(self) -> FunctionDef:
        return FunctionDef(name=self.name, description=self.description, parameters=self.parameters)


class ResponsesToolChoice(_Lenient):
    """tool_choice {"type": "function", "name": ...} (the Responses API's flat form)."""
    type: Literal["function"]
    name: str


class ResponsesReasoning(_Lenient):
    effort: ReasoningEffortName | None = None


class ResponsesInputItem(_Lenient):
    type: str = "message"
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: str | list[ContentPart] | None = None
    # function_call / function_call_output items
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


class ResponsesRequest(_Sampling):
    input: str | list[ResponsesInputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    tools: list[ResponsesTool] | None = None
    tool_choice: ToolChoiceMode | ResponsesToolChoice | None = None
    reasoning: ResponsesReasoning | None = None

    @field_validator("input")
    @classmethod
    def _nonempty(cls, v):
        if not v:
            raise ValueError("input must not be empty")
        return v


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be empty")
            if isinstance(v[0], (str, list)):
                if len(v) != 1:
                    raise ValueError("only one prompt per request is supported")
                v = v[0]
        if not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and any(t < 0 for t in v):
            raise ValueError("token ids must be >= 0")
        return v
