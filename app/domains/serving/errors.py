from app.core.errors import TuneforgeError, Unavailable


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
