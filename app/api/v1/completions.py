"""OpenAI-compatible completions and chat completions, served by the inference process of the
model's base.

The API checks the team's right to the model (another team's model answers 404, like a missing
one), finds the live inference processes for its base (serving domain), and forwards the request
over HTTP to the one its adapter is routed to, or the next if that one refuses the connection; it
never loads a model itself. stream=true answers server-sent events in OpenAI's chunk
shapes, ending with `data: [DONE]`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from app.api import forward
from app.api.deps import PrincipalDep, in_unit_of_work
from app.domains.serving import service as serving
from app.domains.serving.schemas import ChatCompletion, ChatCompletionCreate, Completion, CompletionCreate

router = APIRouter(tags=["completions"])

_STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}},
                          "description": "With stream=true: server-sent events, one chunk per piece of text, "
                                         "then `data: [DONE]`."}}


@router.post("/completions", response_model=Completion, responses=_STREAM_RESPONSE)
async def create_completion(body: CompletionCreate, principal: PrincipalDep):
    """Complete `prompt` with the model (temperature 0 is greedy)."""
    return await _answer(principal.team_id, body, chat=False)


@router.post("/chat/completions", response_model=ChatCompletion, responses=_STREAM_RESPONSE)
async def create_chat_completion(body: ChatCompletionCreate, principal: PrincipalDep):
    """Answer the conversation. The prompt is rendered with the chat template saved with the fine-tuned
    model's tokenizer, the one its training used, with `tools` given to it (or described in a system message
    when the template has no tool support). Tool calls are read from the answer in the Hermes/Qwen form, a JSON
    `{"name", "arguments"}` between `<tool_call>` tags; `tool_choice` required or a named function, and
    `response_format` json_object / json_schema, constrain decoding to a grammar so the answer always parses."""
    return await _answer(principal.team_id, body, chat=True)


async def _answer(team_id: str, body: CompletionCreate | ChatCompletionCreate, *, chat: bool):
    # The route is read in a short transaction: no connection is held while the model generates or
    # the answer streams out.
    route = await in_unit_of_work(lambda session: serving.route(session, team_id=team_id, model=body.model))
    request = body.generate_request(team_id=team_id, adapter_id=route.adapter_id)
    forwarded = await forward.generate(route.urls, request, base_model=route.base_model)
    parse_tools = isinstance(body, ChatCompletionCreate) and body.parses_tool_calls
    if not request.stream:
        result = await forwarded.result()
        if chat:
            return ChatCompletion.of(result, body.model, parse_tools=parse_tools)
        return Completion.of(result, body.model)
    events = forwarded.events(model=body.model, chat=chat, include_usage=body.include_usage, parse_tools=parse_tools)
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
