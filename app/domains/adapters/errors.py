from app.core.errors import NotFound


class AdapterNotFound(NotFound):
    code = "adapter_not_found"
