"""The error answer of a simulated API call."""

from __future__ import annotations


class ApiError(Exception):
    """A Tencent API 3.0 error: answered with HTTP 200 and `Response.Error`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def missing(name: str) -> ApiError:
    """The error for a required parameter that was not sent."""
    return ApiError("MissingParameter", f"The request is missing a required parameter `{name}`.")


def invalid(name: str, why: str) -> ApiError:
    """The error for a parameter of the wrong type or form."""
    return ApiError("InvalidParameter", f"The parameter `{name}` is invalid: {why}.")
