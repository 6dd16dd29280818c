"""Errors in OpenAI's wire format, in one table.

    ApiError                         -> {"error": {"message", "type", "param", "code"}}
    ├── InvalidRequest        400    invalid_request_error
    │   └── ContextTooLong    400    code context_length_exceeded
    ├── Unauthorized          401    authentication_error
    ├── ModelNotFound         404    code model_not_found
    ├── ModelBusy             409    admin unload of a busy model
    ├── BodyTooLarge          413
    ├── QueueFull             429    Retry-After header
    ├── ExpertsFailed         502    consensus quorum not met
    └── ServiceUnavailable    503    model_unavailable / queue_timeout / shutting_down
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    status: int = 500
    type: str = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class ContextTooLong(InvalidRequest):
    def __init__(self, message: str) -> None:
        super().__init__(message, param="messages", code="context_length_exceeded")


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"

    def __init__(self, message: str = "Incorrect or missing API key.") -> None:
        super().__init__(message, code="invalid_api_key")


class ModelNotFound(ApiError):
    status = 404
    type = "invalid_request_error"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist.", param="model", code="model_not_found")


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"


class ModelBusy(ApiError):
    """409: an admin unload of a model that has leases or a load in flight."""

    status = 409
    type = "invalid_request_error"

    def __init__(self, model: str, why: str) -> None:
        super().__init__(f"Model '{model}' is {why}; try again when it is idle.", param="model", code="model_busy")


class BodyTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"

    def __init__(self, limit: int) -> None:
        super().__init__(f"Request body exceeds the limit of {limit} bytes.", code="request_too_large")


class QueueFull(ApiError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, model: str, retry_after_s: int = 1) -> None:
        super().__init__(
            f"Too many requests waiting for model '{model}'; retry later.",
            code="queue_full",
            headers={"Retry-After": str(retry_after_s)},
        )


class ExpertsFailed(ApiError):
    status = 502
    type = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="consensus_failed")


class ServiceUnavailable(ApiError):
    status = 503
    type = "server_error"

    def __init__(self, message: str, code: str = "model_unavailable", retry_after_s: int | None = None) -> None:
        headers = {"Retry-After": str(retry_after_s)} if retry_after_s else None
        super().__init__(message, code=code, headers=headers)


class ModelCrashed(ServiceUnavailable):
    """A model's worker process died (signal, OOM kill, exception at load); 503 model_crashed."""

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message, code="model_crashed", retry_after_s=retry_after_s)
