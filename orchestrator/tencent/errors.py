"""Tencent Cloud error codes, grouped into the classes the engine branches on (DESIGN §3)."""

from __future__ import annotations

import enum


class ErrorClass(enum.StrEnum):
    """What an error means for a backup job."""

    THROTTLED = "throttled"
    BUSY = "busy"
    TRANSIENT = "transient"
    QUOTA = "quota"
    ALREADY_DONE = "already_done"
    ACCOUNT = "account"
    GONE = "gone"
    PERMANENT = "permanent"


# Exact codes first, then prefixes; order matters only for prefixes, most specific first.
_EXACT: dict[str, ErrorClass] = {
    "MutexOperation.TaskRunning": ErrorClass.BUSY,
    "OperationDenied.InstanceOperationInProgress": ErrorClass.BUSY,
    "UnsupportedOperation.InstanceStateRebooting": ErrorClass.BUSY,
    "UnsupportedOperation.InstanceStateStopping": ErrorClass.BUSY,
    "UnsupportedOperation.InstanceStateStarting": ErrorClass.BUSY,
    "FailedOperation.InvalidImageState": ErrorClass.BUSY,
    "InvalidParameterValue.InvalidImageState": ErrorClass.BUSY,
    "InternalServerError": ErrorClass.TRANSIENT,
    "ServiceUnavailable": ErrorClass.TRANSIENT,
    # Our own names for failures that never reached a Tencent answer.
    "ClientNetworkError": ErrorClass.TRANSIENT,
    "ServerNetworkError": ErrorClass.TRANSIENT,
    "InvalidResponse": ErrorClass.TRANSIENT,
    "ImageQuotaLimitExceeded": ErrorClass.QUOTA,
    "InvalidImageName.Duplicate": ErrorClass.ALREADY_DONE,
    "InvalidAccount.InsufficientBalance": ErrorClass.ACCOUNT,
    "InvalidInstanceId.NotFound": ErrorClass.GONE,
    "UnsupportedOperation.InstanceStateTerminating": ErrorClass.GONE,
}

_PREFIXES: tuple[tuple[str, ErrorClass], ...] = (
    ("RequestLimitExceeded", ErrorClass.THROTTLED),
    ("ResourceInUse", ErrorClass.BUSY),
    ("ResourceUnavailable", ErrorClass.BUSY),
    ("InternalError", ErrorClass.TRANSIENT),
    ("AuthFailure.", ErrorClass.ACCOUNT),
    ("UnauthorizedOperation", ErrorClass.ACCOUNT),
)


def classify(code: str) -> ErrorClass:
    """The class of an error code; unknown codes are permanent."""
    if found := _EXACT.get(code):
        return found
    for prefix, cls in _PREFIXES:
        if code.startswith(prefix):
            return cls
    return ErrorClass.PERMANENT


class TencentError(Exception):
    """An error answer (or a failed exchange) from the Tencent Cloud API.

    Carries only the code, message and request id: never the request, its headers or keys.
    """

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(code, message, request_id)
        self.code = code
        self.message = message
        self.request_id = request_id

    @property
    def error_class(self) -> ErrorClass:
        """What this error means for a job."""
        return classify(self.code)

    def __str__(self) -> str:
        rid = f" (RequestId {self.request_id})" if self.request_id else ""
        return f"{self.code}: {self.message}{rid}"

    def __repr__(self) -> str:
        return (
            f"TencentError(code={self.code!r}, message={self.message!r}, "
            f"request_id={self.request_id!r})"
        )


def network_error(message: str) -> TencentError:
    """A connection that failed or dropped before a Tencent answer arrived."""
    return TencentError("ClientNetworkError", message)
