from app.core.errors import InvalidRequest, TuneforgeError, Unavailable


class ModelNotServing(Unavailable):
    """No live inference process serves the model's base (none started, or its heartbeat stopped)."""

    code = "model_not_serving"


class InferenceError(TuneforgeError):
    """An error answered by the inference process (a bad adapter, a full queue, bad parameters),
    relayed with its own status, type, code and param."""

    def __init__(self, message: str, *, status_code: int, type: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message, param=param, code=code)
        self.status_code = status_code
        self.type = type


class UnsupportedParameter(InvalidRequest):
    """A request parameter that OpenAI's API has and this server does not honour yet, given with a
    value other than its default: refused rather than silently ignored."""

    code = "unsupported_parameter"


class ParametersDisagree(InvalidRequest):
    """Parameters whose values contradict each other: max_tokens and max_completion_tokens that differ,
    top_logprobs without logprobs, a stream with best_of above n."""

    code = "invalid_value"
