from app.core.errors import Conflict, InvalidRequest, TuneforgeError


class QueueFull(TuneforgeError):
    """Rate-like: the team may retry once some of its jobs have started or ended."""

    status_code = 429
    type = "rate_limit_error"
    code = "queued_jobs_quota_exceeded"


class StorageFull(Conflict):
    """State-like: retrying does not help until the team deletes files or the quota is raised."""

    code = "storage_quota_exceeded"


class TooManyFiles(Conflict):
    code = "files_quota_exceeded"


class RateLimited(TuneforgeError):
    """Too many requests with one key; `retry_after` (seconds) is sent as the Retry-After header."""

    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, extra={"retry_after": retry_after})
        self.retry_after = retry_after


class CostLimitExceeded(InvalidRequest):
    """A request that asks for more than a per-request limit allows (tokens, LoRA rank, samples)."""

    code = "cost_limit_exceeded"


class TooManyInFlight(RateLimited):
    """Too many requests of one key or team in flight at once; retry when some have been answered."""

    code = "concurrency_limit_exceeded"


class TooManyFailedAuthentications(RateLimited):
    """Too many failed authentications from one client address."""

    code = "authentication_rate_limit_exceeded"
