"""How our client reads the real API's less kind answers: states, disks, codes.

The behaviours are listed in docs/design.md#tencent-cloud-api-notes."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.tencent import decode
from orchestrator.tencent.errors import (
    ErrorClass,
    PauseScope,
    TencentError,
    classify,
    pause_scope,
)
from orchestrator.tencent.models import DataDisk

# -- decode.image_state -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("NORMAL", "NORMAL"),
        ("DELETING", "DELETING"),
        (" creating ", "CREATING"),
        ("CREATEFAILED", "CREATEFAILED"),
        (None, "UNKNOWN"),
        ("", "UNKNOWN"),
        ("   ", "UNKNOWN"),
        (7, "UNKNOWN"),
        (["NORMAL"], "UNKNOWN"),
        ("删除中", "UNKNOWN"),
        ("NOT-A-STATE", "UNKNOWN"),
        ("_LEADING", "UNKNOWN"),
        ("A" * 33, "UNKNOWN"),
    ],
)
def test_unreadable_image_state_becomes_unknown(raw: Any, expected: str) -> None:
    """decode.image_state: upper-case letters and '_' are kept, anything else is UNKNOWN."""
    assert decode.image_state(raw) == expected


def test_image_without_state_decodes_as_unknown() -> None:
    """decode.image: an Image whose ImageState is missing or odd decodes with state UNKNOWN."""
    assert decode.image({"ImageId": "img-1"}).state == decode.UNKNOWN_STATE
    assert decode.image({"ImageId": "img-1", "ImageState": {"x": 1}}).state == "UNKNOWN"


# -- decode.instance: local data disks ----------------------------------------------------------


def _instance(disks: Any) -> dict[str, Any]:
    return {"InstanceId": "ins-1", "InstanceState": "RUNNING", "DataDisks": disks}


def test_local_disks_are_left_out_of_data_disk_ids() -> None:
    """decode.instance: CLOUD_* data disks go to data_disk_ids, LOCAL_* ones to left_out_disks."""
    decoded = decode.instance(
        _instance(
            [
                {"DiskId": "disk-a", "DiskType": "CLOUD_PREMIUM"},
                {"DiskId": "ldisk-b", "DiskType": "LOCAL_BASIC"},
                {"DiskId": "disk-c", "DiskType": "CLOUD_SSD"},
                {"DiskId": "ldisk-d", "DiskType": "LOCAL_SSD"},
            ]
        )
    )
    assert decoded.data_disk_ids == ("disk-a", "disk-c")
    assert decoded.left_out_disks == (
        DataDisk("ldisk-b", "LOCAL_BASIC"),
        DataDisk("ldisk-d", "LOCAL_SSD"),
    )
    assert decoded.local_disk_ids == ("ldisk-b", "ldisk-d")
    assert "a local disk (LOCAL_SSD)" in decoded.left_out_disks[1].why_left_out


def test_untyped_disks_are_tried_and_other_types_left_out() -> None:
    """decode.instance: a disk without DiskType is kept (the API decides); other types are not."""
    decoded = decode.instance(
        _instance([{"DiskId": "disk-a"}, {"DiskId": "disk-b", "DiskType": "NEW_KIND"}, {}])
    )
    assert decoded.data_disk_ids == ("disk-a",)
    assert decoded.left_out_disks == (DataDisk("disk-b", "NEW_KIND"),)
    assert decoded.left_out_disks[0].why_left_out.startswith("not a cloud disk (NEW_KIND)")


def test_instance_without_data_disks() -> None:
    """decode.instance: DataDisks null (the real answer without data disks) is no disk at all."""
    decoded = decode.instance(_instance(None))
    assert (decoded.data_disk_ids, decoded.left_out_disks) == ((), ())


# -- errors.classify and errors.pause_scope -----------------------------------------------------

SHORT_LIVED_CODES = [
    "UnsupportedOperation.InstanceStateEnterRescueMode",
    "UnsupportedOperation.InstanceStateRescueMode",
    "UnsupportedOperation.InstanceStateExitRescueMode",
    "UnsupportedOperation.InstanceStateEnterServiceLiveMigrate",
    "UnsupportedOperation.InstanceStateServiceLiveMigrate",
    "UnsupportedOperation.InstanceStateFreezing",
]


@pytest.mark.parametrize("code", SHORT_LIVED_CODES)
def test_short_lived_instance_states_are_busy(code: str) -> None:
    """errors.classify: rescue, live-migration and freezing states are BUSY (they pass)."""
    assert classify(code) is ErrorClass.BUSY
    assert TencentError(code, "later").error_class is ErrorClass.BUSY


def test_terminating_instance_is_gone_not_busy() -> None:
    """errors.classify: a terminating instance does not come back: GONE."""
    assert classify("UnsupportedOperation.InstanceStateTerminating") is ErrorClass.GONE


@pytest.mark.parametrize(
    "code",
    [
        "UnauthorizedOperation.PermissionDenied",
        "UnauthorizedOperation",
        "UnauthorizedOperation.ImageNotBelongToAccount",
        "AuthFailure.UnauthorizedOperation",
    ],
)
def test_cam_denials_pause_their_region(code: str) -> None:
    """errors.pause_scope: CAM denials are account-class but pause only their region."""
    assert classify(code) is ErrorClass.ACCOUNT
    assert pause_scope(code) is PauseScope.REGION


@pytest.mark.parametrize(
    "code",
    [
        "InvalidAccount.InsufficientBalance",
        "AuthFailure.SecretIdNotFound",
        "AuthFailure.SignatureFailure",
        "AuthFailure.SignatureExpire",
        "AuthFailure.TokenFailure",
        "UnauthorizedOperation.InvalidToken",
        "UnauthorizedOperation.MFAExpired",
        "UnauthorizedOperation.MFANotFound",
    ],
)
def test_balance_and_credential_errors_pause_the_account(code: str) -> None:
    """errors.pause_scope: balance, key, signature and token errors pause the whole account."""
    assert classify(code) is ErrorClass.ACCOUNT
    assert pause_scope(code) is PauseScope.ACCOUNT
