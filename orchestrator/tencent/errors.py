"""Tencent Cloud error codes, grouped into the classes the engine branches on.

The table and what each class does to a job: docs/design.md#error-classes.
"""

from __future__ import annotations

import enum
from datetime import datetime


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
    # Short-lived states (docs/design.md#short-lived-instance-states): rescue mode is an operator's
    # few minutes, live migration and freezing are the platform's; the instance comes back by
    # itself.
    "UnsupportedOperation.InstanceStateEnterRescueMode": ErrorClass.BUSY,
    "UnsupportedOperation.InstanceStateRescueMode": ErrorClass.BUSY,
    "UnsupportedOperation.InstanceStateExitRescueMode": ErrorClass.BUSY,
    "UnsupportedOperation.InstanceStateEnterServiceLiveMigrate": ErrorClass.BUSY,
    "UnsupportedOperation.InstanceStateServiceLiveMigrate": ErrorClass.BUSY,
    "UnsupportedOperation.InstanceStateFreezing": ErrorClass.BUSY,
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


class PauseScope(enum.StrEnum):
    """How much of an account an ACCOUNT-class answer stops."""

    ACCOUNT = "account"  # balance, keys, signature: every region of the account
    REGION = "region"  # a CAM denial: only the (account, region) it came from


# CAM policies can be scoped per region, resource and tag (docs/design.md#cam-scoping): a denial in
# one region says nothing about the others. These UnauthorizedOperation codes are about the
# credentials themselves (a session token, MFA), not a policy, so they stop the whole account.
_CREDENTIAL_DENIALS = frozenset(
    {
        "UnauthorizedOperation.InvalidToken",
        "UnauthorizedOperation.MFAExpired",
        "UnauthorizedOperation.MFANotFound",
    }
)
# The common code of a CAM denial (an API 3.0 common error code), classed with AuthFailure.* by
# its prefix.
_CAM_AUTH_FAILURE = "AuthFailure.UnauthorizedOperation"
# The request's timestamp is too far from the server's clock: the clock is wrong, not the keys.
SIGNATURE_EXPIRE = "AuthFailure.SignatureExpire"


def pause_scope(code: str) -> PauseScope:
    """What an ACCOUNT-class code pauses: the region for a CAM denial, else the account."""
    if code == _CAM_AUTH_FAILURE:
        return PauseScope.REGION
    if code.startswith("UnauthorizedOperation") and code not in _CREDENTIAL_DENIALS:
        return PauseScope.REGION
    return PauseScope.ACCOUNT


SYNC_IMAGES = "SyncImages"
# SyncImages' own meanings (docs/design.md#syncimages), over the table above: the call names a
# source image and destination regions, not an instance. Call it with one destination so that a
# refusal belongs to that destination alone.
_BY_ACTION: dict[str, dict[str, ErrorClass]] = {
    SYNC_IMAGES: {
        # The source is not NORMAL yet (or is busy with another operation): it gets there.
        "InvalidImageId.IncorrectState": ErrorClass.BUSY,
        "FailedOperation.InvalidImageState": ErrorClass.BUSY,
        "InvalidParameterValue.InvalidImageState": ErrorClass.BUSY,
        # The destination's quota (ImageQuotaLimitExceeded) stays QUOTA: rotate there, retry.
        # InvalidImageName.Duplicate stays ALREADY_DONE: look the copy up by exact name in the
        # destination and adopt it only when it is provably ours.
        # The source image is gone: nothing left to copy.
        "InvalidImageId.NotFound": ErrorClass.GONE,
        # Permanent for that destination, or for that source (too large, encrypted, an
        # instance image): these never pass by waiting.
        "InvalidImageId.TooLarge": ErrorClass.PERMANENT,
        "InvalidImageId.Malformed": ErrorClass.PERMANENT,
        "InvalidParameterValue.InvalidImageId": ErrorClass.PERMANENT,
        "InvalidParameterValue.InvalidRegion": ErrorClass.PERMANENT,
        "InvalidParameterValue.LimitExceeded": ErrorClass.PERMANENT,
        "InvalidParameter.InstanceImageNotSupport": ErrorClass.PERMANENT,
        "InvalidParameter.InvalidKmsKeyId": ErrorClass.PERMANENT,
        "InvalidRegion.NotFound": ErrorClass.PERMANENT,
        "InvalidRegion.Unavailable": ErrorClass.PERMANENT,
        "UnsupportedOperation.Region": ErrorClass.PERMANENT,
        "UnsupportedOperation.EncryptedImagesNotSupported": ErrorClass.PERMANENT,
        "UnsupportedOperation.LocationImageNotSupported": ErrorClass.PERMANENT,
        "UnsupportedOperation.SyncEncryptImageNotSupport": ErrorClass.PERMANENT,
    },
}


def classify(code: str, action: str | None = None) -> ErrorClass:
    """The class of an error code (as answered to `action`, when given); unknown: permanent."""
    if action is not None and (found := _BY_ACTION.get(action, {}).get(code)):
        return found
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

    def __init__(
        self,
        code: str,
        message: str,
        request_id: str | None = None,
        *,
        server_date: datetime | None = None,
        received_at: datetime | None = None,
    ) -> None:
        super().__init__(code, message, request_id)
        self.code = code
        self.message = message
        self.request_id = request_id
        # The answer's HTTP `Date` and our clock when it arrived: a SignatureExpire is
        # explained by how far apart they are (`explain`).
        self.server_date = server_date
        self.received_at = received_at
        # The action that got this answer (set by the client): a pause names what was refused.
        self.action: str | None = None

    @property
    def error_class(self) -> ErrorClass:
        """What this error means for a job (in the action that got it, once the client set it)."""
        return classify(self.code, self.action)

    def __str__(self) -> str:
        rid = f" (RequestId {self.request_id})" if self.request_id else ""
        return f"{self.code}: {self.message}{rid}"

    def __repr__(self) -> str:
        return (
            f"TencentError(code={self.code!r}, message={self.message!r}, "
            f"request_id={self.request_id!r})"
        )


def clock_skew(exc: TencentError) -> float | None:
    """Seconds our clock was ahead of the API's when the answer came (None: no Date header)."""
    if exc.server_date is None or exc.received_at is None:
        return None
    return (exc.received_at - exc.server_date).total_seconds()


def explain(exc: TencentError) -> str:
    """The message to record and log: the API's, or for a SignatureExpire what is really wrong."""
    if exc.code != SIGNATURE_EXPIRE:
        return exc.message
    skew = clock_skew(exc)
    if skew is None:
        measured = "the answer carried no Date header to compare with"
    else:
        measured = (
            f"this host's clock read {exc.received_at:%Y-%m-%d %H:%M:%S}Z when the API's Date"
            f" header said {exc.server_date:%Y-%m-%d %H:%M:%S}Z ({skew:+.0f} s)"
        )
    return (
        "the local clock is off, not the keys: requests are signed with this host's time and"
        f" the API allows 5 minutes of difference; {measured}; fix the clock (NTP)."
        f" API message: {exc.message}"
    )


def network_error(message: str) -> TencentError:
    """A connection that failed or dropped before a Tencent answer arrived."""
    return TencentError("ClientNetworkError", message)
