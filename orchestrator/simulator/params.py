"""Typed access to a request body, answering with the API's parameter errors."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from orchestrator.simulator.apierror import ApiError, invalid, missing

MAX_FILTERS = 10
# Integer parameters are int64 on the real API.
MAX_INTEGER = 2**63 - 1
MAX_FILTER_VALUES = 5
Filters = list[tuple[str, list[str]]]


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body (an empty body is an empty object)."""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw, parse_constant=_not_json)
    except json.JSONDecodeError as exc:
        raise ApiError("InvalidParameter", f"The request body is not valid JSON: {exc}.") from None
    except UnicodeDecodeError:
        raise ApiError("InvalidParameter", "The request body is not UTF-8 JSON.") from None
    except ValueError:
        # Python's own limit on integer digits (4300): no int64 parameter is that long, and its
        # message would talk about sys.set_int_max_str_digits.
        raise ApiError("InvalidParameter", "The request body holds a number too long.") from None
    except RecursionError:
        # Deeply nested arrays or objects exhaust the parser's stack: refuse, do not crash.
        raise ApiError("InvalidParameter", "The request body is nested too deeply.") from None
    if not isinstance(body, dict):
        raise ApiError("InvalidParameter", "The request body must be a JSON object.")
    return body


def _not_json(constant: str) -> Any:
    # json.loads takes NaN and Infinity, which are not JSON: the real API's parser refuses them.
    raise ApiError("InvalidParameter", f"The request body is not valid JSON: `{constant}`.")


class Params:
    """One action's parameters; names outside `allowed` answer UnknownParameter."""

    __slots__ = ("_body",)

    def __init__(self, body: dict[str, Any], allowed: Collection[str]) -> None:
        unknown = sorted(set(body) - set(allowed))
        if unknown:
            raise ApiError("UnknownParameter", f"The parameter `{unknown[0]}` is not recognized.")
        self._body = body

    def has(self, name: str) -> bool:
        """Whether a parameter was sent (and is not null)."""
        return self._body.get(name) is not None

    def text(self, name: str, *, required: bool = False) -> str | None:
        """A string parameter."""
        value = self._body.get(name)
        if value is None:
            if required:
                raise missing(name)
            return None
        if not isinstance(value, str):
            raise invalid(name, "expected a string")
        return value

    def texts(self, name: str) -> list[str]:
        """A list-of-strings parameter (empty when absent)."""
        value = self._body.get(name)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise invalid(name, "expected a list of strings")
        return value

    def integer(self, name: str, default: int) -> int:
        """A non-negative integer parameter."""
        value = self._body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise invalid(name, "expected a non-negative integer")
        if value > MAX_INTEGER:
            raise invalid(name, f"must be at most {MAX_INTEGER}")
        return value

    def flag(self, name: str) -> bool:
        """A JSON boolean parameter (DryRun, DeleteBindedSnap)."""
        value = self._body.get(name, False)
        if not isinstance(value, bool):
            raise invalid(name, "expected a boolean")
        return value

    def bool_text(self, name: str) -> str | None:
        """A boolean sent as the string "true"/"false", as ForcePoweroff and Sysprep are."""
        value = self.text(name)
        if value is not None and value not in ("true", "false"):
            raise ApiError(
                "InvalidParameterValue", f"The value of `{name}` must be `true` or `false`."
            )
        return value

    def filters(self) -> Filters:
        """The Filters parameter: at most 10 filters of at most 5 values."""
        raw = self._body.get("Filters")
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise invalid("Filters", "expected a list")
        if len(raw) > MAX_FILTERS:
            raise ApiError(
                "InvalidParameterValue.LimitExceeded",
                f"At most {MAX_FILTERS} filters may be given.",
            )
        return [_filter(item) for item in raw]

    def tag_specification(self) -> dict[str, str]:
        """The tags of a TagSpecification for ResourceType "image"."""
        raw = self._body.get("TagSpecification")
        if raw is None:
            return {}
        if not isinstance(raw, list):
            raise invalid("TagSpecification", "expected a list")
        tags: dict[str, str] = {}
        for spec in raw:
            tags.update(_tag_spec(spec))
        return tags


def _filter(item: Any) -> tuple[str, list[str]]:
    if not isinstance(item, dict) or not isinstance(item.get("Name"), str):
        raise invalid("Filters", "each filter needs a Name")
    values = item.get("Values")
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise invalid("Filters.Values", "expected a list of strings")
    if len(values) > MAX_FILTER_VALUES:
        raise ApiError(
            "InvalidFilterValue.LimitExceeded",
            f"A filter may have at most {MAX_FILTER_VALUES} values.",
        )
    return item["Name"], values


def _tag_spec(spec: Any) -> dict[str, str]:
    if not isinstance(spec, dict) or not isinstance(spec.get("ResourceType"), str):
        raise missing("TagSpecification.ResourceType")
    if spec["ResourceType"] != "image":
        raise ApiError(
            "InvalidParameterValue", "TagSpecification.ResourceType must be `image` here."
        )
    tags = spec.get("Tags")
    if not isinstance(tags, list):
        raise missing("TagSpecification.Tags")
    return dict(_tag(tag) for tag in tags)


def _tag(tag: Any) -> tuple[str, str]:
    if not isinstance(tag, dict):
        raise invalid("TagSpecification.Tags", "expected Key/Value objects")
    key, value = tag.get("Key"), tag.get("Value")
    if not isinstance(key, str) or not key or not isinstance(value, str):
        raise invalid("TagSpecification.Tags", "each tag needs a string Key and Value")
    return key, value
