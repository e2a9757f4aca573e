"""Refusals injected by tests: CAM denials and account-wide stops, scoped like CAM policies.

CAM can allow an action in one region and not another (docs/design.md#cam-scoping), so a refusal is
keyed by (account, region, action), where a None account or region means "every one".
"""

from __future__ import annotations

Scope = tuple[str | None, str | None, str]

# Messages of the refusals, worded as the real API words them; CAM denials get one naming the
# action and region.
MESSAGES = {
    "InvalidAccount.InsufficientBalance": "Insufficient account balance.",
}
# The common code of a CAM denial; the UnauthorizedOperation* codes are CAM denials too.
CAM_AUTH_FAILURE = "AuthFailure.UnauthorizedOperation"


class Denials:
    """Which calls are refused, and with which code."""

    __slots__ = ("_codes",)

    def __init__(self) -> None:
        self._codes: dict[Scope, str] = {}

    def __bool__(self) -> bool:
        return bool(self._codes)

    def set(self, scope: Scope, code: str | None) -> None:
        """Refuse calls in `scope` with `code`; None lifts exactly that scope's refusal."""
        if code is None:
            self._codes.pop(scope, None)
        else:
            self._codes[scope] = code

    def code(self, account: str, region: str, action: str) -> str | None:
        """The refusal of one call, the most specific scope first."""
        if not self._codes:
            return None
        for scope in ((account, region), (account, None), (None, region), (None, None)):
            code = self._codes.get((*scope, action))
            if code is not None:
                return code
        return None


def message(code: str, action: str, region: str) -> str:
    """The message a refusal is answered with."""
    known = MESSAGES.get(code)
    if known is not None:
        return known
    # Every CAM code, PermissionDenied included: a scoped policy refuses one action in one
    # region, and the message is how an operator learns which.
    if code.startswith("UnauthorizedOperation") or code == CAM_AUTH_FAILURE:
        return (
            f"You are not authorized to perform operation (cvm:{action}) in region `{region}`: "
            "the CAM policy does not allow it."
        )
    return "The account is not allowed to perform this operation."
