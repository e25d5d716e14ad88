"""Errors of the evaluation package, rendered by the API like every TuneforgeError."""

from __future__ import annotations

from app.core.errors import InvalidRequest, Unavailable


class SandboxUnavailable(Unavailable):
    """No sandbox of the required strength can run on this machine (or it was not allowed)."""

    code = "sandbox_unavailable"


class SandboxBreach(Unavailable):
    """The self-check found a protection that does not hold; nothing may be evaluated."""

    code = "sandbox_breach"


class EvaluationStopped(Exception):
    """Raised between batches of completions or programs when an evaluation must stop: reason
    "cancel" (requested), "limit" (past its wall-time limit) or "lost" (the lease was lost)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class SamplesInvalid(InvalidRequest):
    """User-provided completions (task_id + completion rows) cannot be scored as given."""

    code = "invalid_samples"
