"""OpenAI's completion and chat completion shapes (requests, responses, stream chunks), and their
translation to and from the inference protocol (app/domains/serving/protocol.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.domains.files import formats
from app.domains.serving import protocol
from app.domains.serving.errors import ParametersDisagree, UnsupportedParameter

# OpenAI's chat default is "up to the context"; a bound keeps an omitted max_tokens from running long.
CHAT_MAX_TOKENS = 256

FinishReason = Literal["stop", "length"]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingOptions(BaseModel):
    """What completions and chat completions share: the model and how to sample from it."""

    model_config = ConfigDict(extra="ignore")

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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    # Given to the chat template as the message's name, as training gives it (formats.template_messages).
    name: Annotated[str, Field(min_length=1)] | None = None

    def text(self) -> str:
        """The content as the chat template gets it: content parts joined as training joins them."""
        return formats.content_text(self.model_dump()["content"]) or ""


class ChatCompletionCreate(SamplingOptions):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = Field(default=False, description="Each generated token's logprob in the choice.")
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = Field(
        default=None, description="With logprobs: the logprobs of this many most likely tokens at each position.")
    # Not honoured yet: taken so that a request giving them is refused by name (unsupported), not
    # answered as if they had been applied.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> dict[str, str]:
        found: dict[str, str] = {}
        if self.tools:
            found["tools"] = "no tools"
        if self.tool_choice not in (None, "none", "auto"):
            found["tool_choice"] = '"none"'
        if self.functions:
            found["functions"] = "no functions"
        if self.function_call not in (None, "none", "auto"):
            found["function_call"] = '"none"'
        if self.response_format is not None and self.response_format.get("type") != "text":
            found["response_format"] = '{"type": "text"}'
        return found | super().unsupported()

    def generate_request(self, *, team_id: str, adapter_id: str | None) -> protocol.GenerateRequest:
        """The request the inference process gets for this one: the messages' text (content parts
        joined), rendered there with the fine-tuned model's chat template."""
        messages = [protocol.ChatTurn(role=m.role, content=m.text(), name=m.name) for m in self.messages]
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ParametersDisagree(
                f"max_completion_tokens ({self.max_completion_tokens}) and max_tokens ({self.max_tokens}) name the "
                "same limit with different values; send only max_completion_tokens.", param="max_completion_tokens")
        if self.top_logprobs and not self.logprobs:
            raise ParametersDisagree("top_logprobs needs logprobs: true.", param="top_logprobs")
        max_tokens = self.max_completion_tokens or self.max_tokens or CHAT_MAX_TOKENS
        return self._generate(team_id=team_id, adapter_id=adapter_id, messages=messages, max_tokens=max_tokens,
                              logprobs=(self.top_logprobs or 0) if self.logprobs else None)


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
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage

    @classmethod
    def of(cls, result: protocol.GenerateResult, model: str) -> ChatCompletion:
        choices = [ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                              logprobs=ChatLogprobs.of(c.logprobs), finish_reason=c.finish_reason)
                   for c in result.choices]
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


class ChatDelta(BaseModel):
    role: Annotated[Literal["assistant"] | None, Field(exclude_if=lambda v: v is None)] = None
    content: str


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


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

    def __init__(self, *, model: str, chat: bool, created: int) -> None:
        self.model, self.chat, self.created = model, chat, created
        self._started: set[int] = set()
        self._offsets: dict[int, int] = {}

    def delta(self, item: protocol.DeltaChunk) -> CompletionChunk | ChatCompletionChunk:
        if not self.chat:
            start = self._offsets.get(item.index, 0)
            self._offsets[item.index] = start + sum(len(e.token) for e in item.logprobs or ())
            text = CompletionChunkChoice(index=item.index, text=item.text, finish_reason=item.finish_reason,
                                         logprobs=CompletionLogprobs.of(item.logprobs, start))
            return CompletionChunk(id=item.id, created=self.created, model=self.model, choices=[text])
        role = None if item.index in self._started else "assistant"
        self._started.add(item.index)
        choice = ChatChunkChoice(index=item.index, delta=ChatDelta(role=role, content=item.text),
                                 logprobs=ChatLogprobs.of(item.logprobs), finish_reason=item.finish_reason)
        return ChatCompletionChunk(id=chat_id(item.id), created=self.created, model=self.model, choices=[choice])

    def usage(self, result: protocol.GenerateResult) -> CompletionChunk | ChatCompletionChunk:
        """The last chunk of a stream asked to include usage: no choices, the request's usage."""
        if self.chat:
            return ChatCompletionChunk(id=chat_id(result.id), created=self.created, model=self.model, choices=[],
                                       usage=Usage.of(result))
        return CompletionChunk(id=result.id, created=self.created, model=self.model, choices=[],
                               usage=Usage.of(result))
