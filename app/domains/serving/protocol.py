"""The internal protocol between the API and an inference process (`tuneforge inference`), the one
definition both ends use: the API builds a GenerateRequest and parses the answers, the inference
process parses the request and builds the answers. Users never speak it; the API translates it to
and from OpenAI's shapes (app/domains/serving/schemas.py).

    GET  /health                  Health
    GET  /v1/stats                the engine's counters (InferenceEngine.stats()), a free-form object
    POST /v1/generate             GenerateRequest -> GenerateResult, or with stream=true newline-delimited
                                  JSON (STREAM_MEDIA_TYPE): DeltaChunk ..., then DoneChunk or ErrorChunk
    POST /v1/pause | /v1/resume   stop / restart admitting queued requests (operators, tests)
    POST /v1/adapters/{id}/evict  drop an adapter from memory

An error answers ErrorBody with the error's own status, so the API relays it as it is.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

HEALTH_PATH = "/health"
STATS_PATH = "/v1/stats"
GENERATE_PATH = "/v1/generate"
PAUSE_PATH = "/v1/pause"
RESUME_PATH = "/v1/resume"
ADAPTERS_PATH = "/v1/adapters/"  # + "{adapter id}" + EVICT_SUFFIX
EVICT_SUFFIX = "/evict"
STREAM_MEDIA_TYPE = "application/x-ndjson"
# The key of requests without an adapter in the engine's per-adapter counters (stats).
BASE_ADAPTER_KEY = "__base__"


class ChatTurn(BaseModel):
    role: str
    content: str | None = None  # None only for an assistant's turn with tool_calls
    name: str | None = None  # the message's name, which the chat template may render
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls, in OpenAI's shape (arguments a JSON string)
    tool_call_id: str | None = None  # a tool turn's answer to that call


class GenerateRequest(BaseModel):
    """One generation: exactly one of `prompt` (text, or token ids of the base's tokenizer, or a list
    of either) and `messages` (rendered by the inference process with the adapter's chat template), for the
    team's adapter or the base alone. Sampling values left None take the engine's defaults; the
    engine checks their ranges. Unknown fields are ignored, so an API newer than the process can
    still be served."""

    model_config = ConfigDict(extra="ignore")

    team_id: str
    adapter_id: str | None = None
    # One prompt, or several (a list of texts or of token-id lists): n choices each, indexed prompt-major.
    prompt: str | list[int] | list[str] | list[list[int]] | None = None
    messages: list[ChatTurn] | None = Field(default=None, min_length=1)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, JSON's keys) -> bias added to its logit
    logprobs: int | None = None  # k: each token's logprob and the k most likely tokens'
    best_of: int | None = None  # candidates per prompt, the n best of them returned
    echo: bool = False  # each choice's text begins with its prompt's
    # OpenAI's shapes, validated by the API: json_object / json_schema constrain the output to JSON; tools
    # are rendered into the chat prompt, and tool_choice "required" or a named function constrains it to a call.
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt and messages")
        return self

    def sampling(self) -> dict:
        """The sampling parameters that were given, as the engine's submit() keywords."""
        values = {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                  "stop": self.stop, "n": self.n, "seed": self.seed, "presence_penalty": self.presence_penalty,
                  "frequency_penalty": self.frequency_penalty, "logit_bias": self.logit_bias,
                  "logprobs": self.logprobs, "best_of": self.best_of, "echo": self.echo or None,
                  "response_format": self.response_format, "tools": self.tools, "tool_choice": self.tool_choice,
                  "parallel_tool_calls": self.parallel_tool_calls}
        return {k: v for k, v in values.items() if v is not None}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float


class TokenLogprob(BaseModel):
    """A generated token's logprob (natural log) and the most likely tokens' at its position."""

    token: str  # its text decoded alone
    token_id: int
    logprob: float
    top: list[TopLogprob] = []


class Choice(BaseModel):
    """text: the decoded completion, cut before a stop sequence; token_ids: every generated token;
    logprobs: one per token of token_ids, when the request asked for them."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    logprobs: list[TokenLogprob] | None = None


class GenerateResult(BaseModel):
    id: str  # "cmpl-..."
    created: int  # unix seconds
    adapter_id: str | None
    choices: list[Choice]
    usage: Usage
    batch_id: int  # the batch the request was admitted in (the engine's stats()["batches"]["recent"])


class WireError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: WireError


class DeltaChunk(BaseModel):
    """New output of one choice; the last delta of a choice carries its finish_reason."""

    type: Literal["delta"] = "delta"
    id: str
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: list[TokenLogprob] | None = None


class DoneChunk(BaseModel):
    type: Literal["done"] = "done"
    result: GenerateResult


class ErrorChunk(BaseModel):
    """The request failed after its stream began (the status was already 200)."""

    type: Literal["error"] = "error"
    error: WireError


StreamChunk = Annotated[DeltaChunk | DoneChunk | ErrorChunk, Field(discriminator="type")]
STREAM_CHUNK: TypeAdapter[DeltaChunk | DoneChunk | ErrorChunk] = TypeAdapter(StreamChunk)


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    base_model: str
