"""OpenAI's completion and chat completion shapes (requests, responses, stream chunks), and their
translation to and from the inference protocol (app/domains/serving/protocol.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from app.domains.files import formats
from app.domains.serving import protocol
from app.domains.serving import tools as tool_calls
from app.domains.serving.errors import ParametersDisagree, UnsupportedParameter

# OpenAI's chat default is "up to the context"; a bound keeps an omitted max_tokens from running long.
CHAT_MAX_TOKENS = 256

FinishReason = Literal["stop", "length"]
ChatFinishReason = Literal["stop", "length", "tool_calls"]
FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingOptions(BaseModel):
    """What completions and chat completions share: the model and how to sample from it.

    A field OpenAI's API does not have answers 400 unknown_parameter, as OpenAI answers it ("Unrecognized request
    argument supplied"). Of OpenAI's fields that change nothing here, the end-user and cache identifiers are
    taken, as they never change an OpenAI answer either; the others are refused unless null or their default
    (unsupported())."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=255, description="A fine-tuned model of the team, or a base model.")
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        default=None, description="Token id (of the base model's tokenizer) -> bias added to its logit.")
    # Taken and not used for the answer: OpenAI uses them for abuse monitoring and prompt-cache routing only.
    user: Annotated[str, Field(max_length=512)] | None = Field(
        default=None, description="An end-user id; accepted for compatibility, it does not change the answer.")

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a chunk carrying the usage."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> dict[str, str]:
        """The parameters given with a value other than their default that this server does not honour,
        each with the value to send instead (or to leave it out)."""
        return {}

    def _generate(self, *, team_id: str, adapter_id: str | None, **prompt) -> protocol.GenerateRequest:
        """Raises UnsupportedParameter naming the first parameter this server cannot honour."""
        if unsupported := self.unsupported():
            name, default = next(iter(unsupported.items()))
            raise UnsupportedParameter(f"{name} is not supported by this server; leave it out or send {default}.",
                                       param=name)
        return protocol.GenerateRequest(team_id=team_id, adapter_id=adapter_id, stream=bool(self.stream),
                                        temperature=self.temperature, top_p=self.top_p, n=self.n, stop=self.stop,
                                        seed=self.seed, presence_penalty=self.presence_penalty,
                                        frequency_penalty=self.frequency_penalty, logit_bias=self.logit_bias,
                                        **prompt)


class CompletionCreate(SamplingOptions):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, or token ids of the base model's tokenizer, or a list of either: n choices per prompt, "
                    "indexed prompt-major (prompt p's choice i has index p*n + i).")
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    echo: bool | None = Field(default=False, description="Begin each choice's text with its prompt's.")
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = Field(
        default=None, description="Each generated token's logprob and the logprobs of this many most likely tokens.")
    best_of: Annotated[int, Field(ge=1, le=20)] | None = Field(
        default=None, description="Candidates per prompt (at least n); the n with the highest mean token logprob "
                                  "are returned. Cannot be streamed when above n.")
    # Accepted at its default only (see unsupported()): the served models have no fill-in-the-middle tokens.
    suffix: str | None = None

    def unsupported(self) -> dict[str, str]:
        found = {}
        if self.echo and self.logprobs is not None:  # OpenAI then scores the prompt's tokens too
            found["echo"] = "false when asking for logprobs"
        if self.suffix:
            found["suffix"] = "null (fill-in-the-middle needs a model trained for it)"
        return found | super().unsupported()

    def generate_request(self, *, team_id: str, adapter_id: str | None) -> protocol.GenerateRequest:
        """The request the inference process gets for this one. Raises ParametersDisagree for a stream
        with best_of above n (its candidates are ranked only once all are done)."""
        if self.stream and self.best_of is not None and self.best_of > (self.n or 1):
            raise ParametersDisagree("best_of above n cannot be streamed; drop best_of or stream.", param="best_of")
        return self._generate(team_id=team_id, adapter_id=adapter_id, prompt=self.prompt, max_tokens=self.max_tokens,
                              echo=bool(self.echo), logprobs=self.logprobs, best_of=self.best_of)


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: FunctionName
    arguments: str = Field(description="The arguments as a JSON object's text.")


class ToolCall(BaseModel):
    """A call an assistant made (in a request's messages, or in an answer)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Given to the chat template as the message's name, as training gives it (formats.template_messages).
    name: Annotated[str, Field(min_length=1)] | None = None
    tool_calls: list[ToolCall] | None = Field(default=None,
                                              description="An assistant's calls; content may then be null.")
    tool_call_id: str | None = Field(default=None, description="A tool message: the id of the call it answers.")
    # After role and tool_calls, which its validator reads.
    content: str | list[ContentPart] | None = Field(default=None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content_given(cls, content, info: ValidationInfo):
        if content is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            # "missing", as for any required field: the error names the field even when the body leaves it out.
            raise PydanticCustomError("missing", "content is required (only an assistant message with tool_calls "
                                                 "may leave it null)")
        return content

    @model_validator(mode="after")
    def _shape(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str | None:
        """The content as the chat template gets it: content parts joined as training joins them."""
        return formats.content_text(self.model_dump()["content"]) if self.content is not None else None

    def turn(self) -> protocol.ChatTurn:
        calls = [c.model_dump() for c in self.tool_calls] if self.tool_calls else None
        return protocol.ChatTurn(role=self.role, content=self.text(), name=self.name, tool_calls=calls,
                                 tool_call_id=self.tool_call_id)


class FunctionDefinition(BaseModel):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="A JSON schema of the arguments object.")
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: FunctionName


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class TextFormat(BaseModel):
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    type: Literal["json_object"]


class JsonSchema(BaseModel):
    name: FunctionName
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(BaseModel):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class ChatCompletionCreate(SamplingOptions):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = Field(default=False, description="Each generated token's logprob in the choice.")
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = Field(
        default=None, description="With logprobs: the logprobs of this many most likely tokens at each position.")
    tools: list[Tool] | None = Field(
        default=None, description="Functions the model may call, rendered into the prompt through the chat template.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, description="auto (the default with tools): the answer is parsed for calls; required or a named "
                                  "function: decoding is constrained to a valid call.")
    parallel_tool_calls: bool | None = Field(default=None,
                                             description="Whether a forced answer may hold several calls.")
    response_format: ResponseFormat | None = Field(
        default=None, description="json_object or json_schema: decoding is constrained so the answer parses (and "
                                  "validates against the schema).")
    # The deprecated forms of tools: taken so that a request giving them is refused by name (unsupported).
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    # Taken and not used for the answer, as in OpenAI's API, where they only tag the request or route it to a
    # prompt cache (this server keeps none).
    safety_identifier: Annotated[str, Field(max_length=512)] | None = Field(
        default=None, description="An end-user id; accepted for compatibility, it does not change the answer.")
    prompt_cache_key: Annotated[str, Field(max_length=1024)] | None = Field(
        default=None, description="Accepted for compatibility; there is no prompt cache to route to.")
    prompt_cache_retention: Literal["in_memory", "24h"] | None = Field(
        default=None, description="Accepted for compatibility; there is no prompt cache to keep.")
    # OpenAI's features this server does not have: accepted at the value that asks for nothing (see unsupported()).
    store: bool | None = Field(default=None, description="Only false: completions are not stored.")
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = Field(
        default=None, description="Only auto or default: there is one processing tier.")
    modalities: list[Literal["text", "audio"]] | None = Field(default=None, description='Only ["text"].')
    metadata: dict[str, str] | None = Field(default=None, description="Only null: it tags stored completions.")
    audio: Any = Field(default=None, description="Only null: no audio output.")
    prediction: Any = Field(default=None, description="Only null: no predicted outputs.")
    reasoning_effort: Any = Field(default=None, description="Only null: the served models do not reason.")
    verbosity: Any = Field(default=None, description="Only null.")
    web_search_options: Any = Field(default=None, description="Only null: no web search.")
    moderation: Any = Field(default=None, description="Only null: no moderation.")
    prompt_cache_options: Any = Field(default=None, description="Only null: there is no prompt cache.")

    def unsupported(self) -> dict[str, str]:
        found: dict[str, str] = {}
        if self.functions:
            found["functions"] = "tools instead"
        if self.function_call not in (None, "none", "auto"):
            found["function_call"] = "tool_choice instead"
        if self.store:
            found["store"] = "false (completions are not stored)"
        if self.service_tier not in (None, "auto", "default"):
            found["service_tier"] = "auto (there is one processing tier)"
        if self.modalities is not None and self.modalities != ["text"]:
            found["modalities"] = '["text"]'
        if self.metadata is not None:
            found["metadata"] = "null (metadata tags stored completions, which this server does not keep)"
        for name in ("audio", "prediction", "reasoning_effort", "verbosity", "web_search_options", "moderation",
                     "prompt_cache_options"):
            if getattr(self, name) is not None:
                found[name] = "null"
        return found | super().unsupported()

    @property
    def parses_tool_calls(self) -> bool:
        """Whether answers are read for tool calls: tools were given and tool_choice is not none."""
        return bool(self.tools) and self.tool_choice != "none"

    def _check_tools(self) -> None:
        names = [t.function.name for t in self.tools or ()]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ParametersDisagree(f"Two tools are named {name!r}; give each function its own name.",
                                         param=f"tools.{i}.function.name")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not names:
            raise ParametersDisagree("tool_choice asks for a tool call, but no tools are given.", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ParametersDisagree(f"tool_choice names {choice.function.name!r}, which is not one of the tools "
                                     f"({', '.join(names)}).", param="tool_choice.function.name")
        forced = choice == "required" or isinstance(choice, NamedToolChoice)
        if forced and self.response_format is not None and self.response_format.type != "text":
            raise ParametersDisagree("A forced tool call (tool_choice required or a named function) is its own "
                                     "format; drop response_format or let tool_choice be auto.",
                                     param="response_format")

    def generate_request(self, *, team_id: str, adapter_id: str | None) -> protocol.GenerateRequest:
        """The request the inference process gets for this one: the messages' text (content parts
        joined), rendered there with the fine-tuned model's chat template, and the tools and response_format
        that constrain its decoding. Raises ParametersDisagree for contradicting values."""
        messages = [m.turn() for m in self.messages]
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ParametersDisagree(
                f"max_completion_tokens ({self.max_completion_tokens}) and max_tokens ({self.max_tokens}) name the "
                "same limit with different values; send only max_completion_tokens.", param="max_completion_tokens")
        if self.top_logprobs and not self.logprobs:
            raise ParametersDisagree("top_logprobs needs logprobs: true.", param="top_logprobs")
        self._check_tools()
        max_tokens = self.max_completion_tokens or self.max_tokens or CHAT_MAX_TOKENS
        tools = [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice
        response_format = self.response_format.model_dump(by_alias=True, exclude_none=True) \
            if self.response_format is not None else None
        return self._generate(team_id=team_id, adapter_id=adapter_id, messages=messages, max_tokens=max_tokens,
                              logprobs=(self.top_logprobs or 0) if self.logprobs else None,
                              response_format=response_format, tools=tools, tool_choice=choice,
                              parallel_tool_calls=self.parallel_tool_calls)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, result: protocol.GenerateResult) -> Usage:
        return cls(prompt_tokens=result.usage.prompt_tokens, completion_tokens=result.usage.completion_tokens,
                   total_tokens=result.usage.total_tokens)


class CompletionLogprobs(BaseModel):
    """OpenAI's completions logprobs: per generated token its text, logprob, the most likely tokens'
    logprobs, and where it starts in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]

    @classmethod
    def of(cls, entries: list[protocol.TokenLogprob] | None, start: int = 0) -> CompletionLogprobs | None:
        if entries is None:
            return None
        offsets = []
        for entry in entries:
            offsets.append(start)
            start += len(entry.token)
        return cls(tokens=[e.token for e in entries], token_logprobs=[e.logprob for e in entries],
                   top_logprobs=[{t.token: t.logprob for t in e.top} for e in entries], text_offset=offsets)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """OpenAI's chat logprobs: per generated token its text, logprob, UTF-8 bytes and the most likely
    tokens'."""

    content: list[ChatTokenLogprob] | None
    refusal: None = None

    @classmethod
    def of(cls, entries: list[protocol.TokenLogprob] | None) -> ChatLogprobs | None:
        if entries is None:
            return None
        return cls(content=[ChatTokenLogprob(
            token=e.token, logprob=e.logprob, bytes=list(e.token.encode()),
            top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode())) for t in e.top])
            for e in entries])


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage

    @classmethod
    def of(cls, result: protocol.GenerateResult, model: str) -> Completion:
        choices = [CompletionChoice(index=c.index, text=c.text, logprobs=CompletionLogprobs.of(c.logprobs),
                                    finish_reason=c.finish_reason) for c in result.choices]
        return cls(id=result.id, created=result.created, model=model, choices=choices, usage=Usage.of(result))


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: Annotated[list[ToolCall] | None, Field(exclude_if=lambda v: v is None)] = None

    @classmethod
    def of(cls, text: str, *, parse_tools: bool) -> AssistantMessage:
        """The answer's text as a message: with parse_tools, its tagged tool calls (serving.tools) taken out of
        the content into tool_calls."""
        if not parse_tools:
            return cls(content=text)
        content, calls = tool_calls.parse(text)
        return cls(content=content, tool_calls=[ToolCall(id=tool_calls.call_id(), function=FunctionCall(
            name=c.name, arguments=c.arguments)) for c in calls] or None)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage

    @classmethod
    def of(cls, result: protocol.GenerateResult, model: str, *, parse_tools: bool = False) -> ChatCompletion:
        """With parse_tools (tools given, tool_choice not none), a choice whose text holds calls answers them as
        tool_calls, with finish_reason tool_calls when it ended by itself."""
        choices = []
        for c in result.choices:
            message = AssistantMessage.of(c.text, parse_tools=parse_tools)
            finish = "tool_calls" if message.tool_calls and c.finish_reason == "stop" else c.finish_reason
            choices.append(ChatChoice(index=c.index, message=message, logprobs=ChatLogprobs.of(c.logprobs),
                                      finish_reason=finish))
        return cls(id=chat_id(result.id), created=result.created, model=model, choices=choices,
                   usage=Usage.of(result))


def chat_id(request_id: str) -> str:
    """A chat completion's id for the inference process's request id ("cmpl-..." -> "chatcmpl-...")."""
    return "chatcmpl-" + request_id.removeprefix("cmpl-")


# --- stream chunks (server-sent events) ---------------------------------------------------------
# Fields that OpenAI leaves out of a chunk when they do not apply (a delta's role after the first
# chunk of a choice, the usage before the last chunk) are dropped when None.


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class FunctionDelta(BaseModel):
    name: Annotated[str | None, Field(exclude_if=lambda v: v is None)] = None
    arguments: str


class ToolCallDelta(BaseModel):
    """A call as OpenAI streams it: the first piece carries its id, type and name, every piece a part of its
    arguments' text (here the whole of it, once the call is complete)."""

    index: int
    id: Annotated[str | None, Field(exclude_if=lambda v: v is None)] = None
    type: Annotated[Literal["function"] | None, Field(exclude_if=lambda v: v is None)] = None
    function: FunctionDelta


class ChatDelta(BaseModel):
    role: Annotated[Literal["assistant"] | None, Field(exclude_if=lambda v: v is None)] = None
    content: str | None
    tool_calls: Annotated[list[ToolCallDelta] | None, Field(exclude_if=lambda v: v is None)] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Annotated[Usage | None, Field(exclude_if=lambda v: v is None)] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Annotated[Usage | None, Field(exclude_if=lambda v: v is None)] = None


class StreamError(BaseModel):
    """The event that ends a stream whose request failed after it began."""

    error: protocol.WireError


class ChunkEncoder:
    """Turns one request's stream of inference protocol chunks into OpenAI chunks, remembering which
    choices have begun (a chat choice's first chunk carries the assistant role) and, for completions'
    logprobs, how far into its text each choice is."""

    def __init__(self, *, model: str, chat: bool, created: int, parse_tools: bool = False) -> None:
        self.model, self.chat, self.created = model, chat, created
        self._started: set[int] = set()
        self._offsets: dict[int, int] = {}
        # With parse_tools, each chat choice's text goes through a CallParser: content streams as it comes
        # (less what may be the start of a call), each call as one tool_calls delta once it is complete.
        self._parsers: dict[int, tool_calls.CallParser] | None = {} if parse_tools else None
        self._calls: dict[int, int] = {}  # choice index -> calls streamed so far

    def delta(self, item: protocol.DeltaChunk) -> CompletionChunk | ChatCompletionChunk:
        if not self.chat:
            start = self._offsets.get(item.index, 0)
            self._offsets[item.index] = start + sum(len(e.token) for e in item.logprobs or ())
            text = CompletionChunkChoice(index=item.index, text=item.text, finish_reason=item.finish_reason,
                                         logprobs=CompletionLogprobs.of(item.logprobs, start))
            return CompletionChunk(id=item.id, created=self.created, model=self.model, choices=[text])
        role: Literal["assistant"] | None = None if item.index in self._started else "assistant"
        self._started.add(item.index)
        delta = ChatDelta(role=role, content=item.text)
        finish: ChatFinishReason | None = item.finish_reason
        if self._parsers is not None:
            delta, finish = self._tool_delta(item, role)
        choice = ChatChunkChoice(index=item.index, delta=delta, logprobs=ChatLogprobs.of(item.logprobs),
                                 finish_reason=finish)
        return ChatCompletionChunk(id=chat_id(item.id), created=self.created, model=self.model, choices=[choice])

    def _tool_delta(self, item: protocol.DeltaChunk, role: Literal["assistant"] | None
                    ) -> tuple[ChatDelta, ChatFinishReason | None]:
        assert self._parsers is not None
        parser = self._parsers.setdefault(item.index, tool_calls.CallParser())
        pieces = parser.feed(item.text) + (parser.finish() if item.finish_reason is not None else [])
        text = "".join(p for p in pieces if isinstance(p, str))
        calls = []
        for piece in pieces:
            if isinstance(piece, tool_calls.ParsedCall):
                index = self._calls.get(item.index, 0)
                self._calls[item.index] = index + 1
                calls.append(ToolCallDelta(index=index, id=tool_calls.call_id(), type="function",
                                           function=FunctionDelta(name=piece.name, arguments=piece.arguments)))
        finish: ChatFinishReason | None = item.finish_reason
        if finish == "stop" and self._calls.get(item.index):
            finish = "tool_calls"
        return ChatDelta(role=role, content=text if text or not calls else None, tool_calls=calls or None), finish

    def usage(self, result: protocol.GenerateResult) -> CompletionChunk | ChatCompletionChunk:
        """The last chunk of a stream asked to include usage: no choices, the request's usage."""
        if self.chat:
            return ChatCompletionChunk(id=chat_id(result.id), created=self.created, model=self.model, choices=[],
                                       usage=Usage.of(result))
        return CompletionChunk(id=result.id, created=self.created, model=self.model, choices=[],
                               usage=Usage.of(result))
