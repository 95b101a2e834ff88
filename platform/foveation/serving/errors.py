"""One error type for everything a request can get wrong: an HTTP status, a short machine
code and a message naming the input and what was expected. The ingress turns it into
``{"error": {"code": ..., "message": ...}}``."""

from __future__ import annotations


class RequestError(ValueError):
    def __init__(self, status: int, code: str, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.retry_after_s = retry_after_s  # a 503's ``Retry-After``

    def to_dict(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}
