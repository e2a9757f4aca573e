"""DescribeImages / DescribeInstances filters: Filters are ANDed, the Values of one are ORed.

Image filters run as list comprehensions, one per filter, rather than a predicate per image:
a benchmark fleet holds thousands of images and DescribeImages is called 40 times a second.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from orchestrator.simulator.apierror import ApiError
from orchestrator.simulator.params import Filters
from orchestrator.simulator.records import InstanceRecord, SimImage

Images = list[SimImage]
ImageStep = Callable[[Images, list[str]], Images]
InstanceTest = Callable[[InstanceRecord, list[str]], bool]


def _unknown(name: str) -> ApiError:
    return ApiError("InvalidFilter", f"The filter `{name}` is not supported.")


def _by_id(images: Images, values: list[str]) -> Images:
    wanted = set(values)
    return [i for i in images if i.image_id in wanted]


def _by_type(images: Images, values: list[str]) -> Images:
    # Every image the simulator lists is a custom (private) image of the account.
    return images if "PRIVATE_IMAGE" in values else []


def _by_name(images: Images, values: list[str]) -> Images:
    # The real image-name filter is a fuzzy match: "bk-1" also finds "bk-10".
    if len(values) == 1:
        value = values[0]
        return [i for i in images if value in i.name]
    return [i for i in images if any(v in i.name for v in values)]


def _by_tag_key(images: Images, values: list[str]) -> Images:
    return [i for i in images if any(k in i.tags for k in values)]


def _by_tag_value(images: Images, values: list[str]) -> Images:
    wanted = set(values)
    return [i for i in images if not wanted.isdisjoint(i.tags.values())]


def _by_tag(key: str) -> ImageStep:
    def step(images: Images, values: list[str]) -> Images:
        wanted = set(values)
        return [i for i in images if i.tags.get(key) in wanted]

    return step


IMAGE_STEPS: dict[str, ImageStep] = {
    "image-id": _by_id,
    "image-type": _by_type,
    "image-name": _by_name,
    "tag-key": _by_tag_key,
    "tag-value": _by_tag_value,
}


def image_steps(filters: Filters) -> list[tuple[ImageStep, list[str]]]:
    """The steps of DescribeImages filters; unknown names answer InvalidFilter."""
    steps = []
    for name, values in filters:
        if name.startswith("tag:") and len(name) > 4:
            steps.append((_by_tag(name[4:]), values))
        elif name in IMAGE_STEPS:
            steps.append((IMAGE_STEPS[name], values))
        else:
            raise _unknown(name)
    return steps


def _tags_match(tags: Mapping[str, str], key: str, values: list[str]) -> bool:
    return tags.get(key) in values


INSTANCE_TESTS: dict[str, InstanceTest] = {
    "instance-id": lambda r, v: r.spec.instance_id in v,
    "instance-state": lambda r, v: r.state in v,
    "instance-name": lambda r, v: any(x in r.spec.name for x in v),
    "zone": lambda r, v: r.spec.zone in v,
    "tag-key": lambda r, v: any(k in r.spec.tags for k in v),
    "tag-value": lambda r, v: any(x in r.spec.tags.values() for x in v),
}


def _instance_test(name: str) -> InstanceTest:
    if name.startswith("tag:") and len(name) > 4:
        key = name[4:]
        return lambda r, v: _tags_match(r.spec.tags, key, v)
    test = INSTANCE_TESTS.get(name)
    if test is None:
        raise _unknown(name)
    return test


def instance_filter(filters: Filters) -> Callable[[InstanceRecord], bool]:
    """One predicate for DescribeInstances filters; unknown names answer InvalidFilter."""
    checks = [(_instance_test(name), values) for name, values in filters]
    return lambda record: all(test(record, values) for test, values in checks)
