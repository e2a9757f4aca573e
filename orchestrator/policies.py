"""Backup policies: the model, validation, the TOML file format, diffs and cron slots.

The file format is an outside contract (docs/design.md#policy-file).

A policy read from the `policies` table goes through the same validation as one read from a
file, so a row written with plain SQL is exactly as valid as an applied file.

Cron slots are computed on local wall-clock time in the policy's timezone and then mapped to
instants, so each local time fires once across DST changes:
- a local time that occurs twice (clocks go back) fires at its first occurrence;
- a local time that does not exist (clocks go forward) fires when the gap ends, that is at the
  transition itself, like Vixie cron running skipped jobs right after the change.
All slot functions return aware UTC datetimes.
"""

from __future__ import annotations

import re
import reprlib
import tomllib
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterBadDateError, croniter

from orchestrator.errors import UsageError

# Every pattern is used with fullmatch: `$` would let a trailing newline through.
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,19}")
ACCOUNT_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
REGION_RE = re.compile(r"[a-z]{2,}(-[a-z0-9]+){1,4}")
TIMEZONE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_+/-]{0,63}")
INSTANCE_ID_RE = re.compile(r"ins-[a-z0-9]{1,32}")
DURATION_RE = re.compile(r"(?:[0-9]{1,9}[dhms]){1,4}")
_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_LONGEST_DURATION = 10_000 * 86400
# Upper bounds (docs/design.md#policy-file). Each keeps date arithmetic far from datetime's limits,
# and Migration 0006 holds the same numbers as CHECK constraints.
MAX_WINDOW = timedelta(days=31)
MAX_KEEP = 10_000
MAX_AGE_DAYS = 36_500
MAX_INSTANCE_IDS = 10_000
MAX_SCHEDULE_CHARS = 200
MAX_FILE_BYTES = 16 * 2**20
# Tencent's tag rules: keys up to 127 characters, values up to 255, no control characters.
MAX_TAG_KEY = 127
MAX_TAG_VALUE = 255
# Cross-region copies: AWS DLM's limit, and each destination is a SyncImages call per backup.
MAX_COPIES = 3
ON_QUOTA = ("rotate", "fail")
# DescribeInstances takes at most 10 filters (docs/design.md#filters-and-paging) and each tag is one
# `tag:KEY` filter; one stays free for the query itself. Migration 0004 holds the same limit in SQL.
MAX_INSTANCE_TAGS = 9
KEEP_RULES = ("keep_last", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")


class PolicyError(UsageError):
    """One or more invalid policies; `messages` holds every problem found (exit 2)."""


class FieldError(ValueError):
    """A single field's value is wrong; the message says what was expected."""


@dataclass(frozen=True, slots=True)
class Retention:
    """Which images a policy keeps: an image is kept if any rule keeps it."""

    keep_last: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    max_age_days: int | None = None


@dataclass(frozen=True, slots=True)
class CopyTarget:
    """A region that gets a copy of every backup, with the copies' own retention."""

    region: str
    retention: Retention


@dataclass(frozen=True, slots=True)
class Policy:
    """One backup policy; `id` is None until it is stored."""

    name: str
    region: str
    schedule: str
    timezone: str = "UTC"
    account: str = "default"
    instance_ids: tuple[str, ...] = ()
    instance_tags: Mapping[str, str] = field(default_factory=dict)
    force_poweroff: bool = False
    sysprep: bool = False
    include_data_disks: bool = False
    on_quota: str = "rotate"
    completion_window: timedelta = timedelta(hours=6)
    enabled: bool = True
    retention: Retention = field(default_factory=Retention)
    copies: tuple[CopyTarget, ...] = ()
    id: int | None = None

    @property
    def zone(self) -> ZoneInfo:
        """The policy's timezone."""
        return ZoneInfo(self.timezone)


# ---------------------------------------------------------------- field validators


def _shortener() -> reprlib.Repr:
    # reprlib never builds the whole repr of a huge value, so a 50 MB string stays cheap.
    short = reprlib.Repr()
    short.maxstring, short.maxother, short.maxlist, short.maxdict = 60, 60, 4, 4
    return short


_SHORT = _shortener()


def _describe(value: object) -> str:
    kind = {
        bool: "boolean",
        int: "integer",
        float: "float",
        str: "string",
        list: "array",
        dict: "table",
    }.get(type(value), type(value).__name__)
    return f"{kind} {_SHORT.repr(value)}"


def _expect(ok: bool, expected: str, value: object) -> None:
    if not ok:
        raise FieldError(f"expected {expected}, got {_describe(value)}")


def _string(value: object, pattern: re.Pattern[str], expected: str) -> str:
    _expect(isinstance(value, str) and bool(pattern.fullmatch(value)), expected, value)
    assert isinstance(value, str)
    return value


def check_name(value: object) -> str:
    """Policy name: lowercase letters, digits and '-', starting with a letter or digit, <= 20."""
    return _string(
        value, NAME_RE, "lowercase letters, digits and '-' (at most 20, not starting with '-')"
    )


def check_account(value: object) -> str:
    """Account name as configured in [[accounts]]."""
    return _string(value, ACCOUNT_RE, "an account name (letters, digits, '_', '.', '-')")


def check_region(value: object) -> str:
    """Region like ap-guangzhou or ap-shanghai-fsi."""
    return _string(value, REGION_RE, 'a region like "ap-guangzhou"')


def check_schedule(value: object) -> str:
    """Five-field cron expression that croniter accepts and that matches some date."""
    expected = 'a five-field cron expression like "0 3 * * *"'
    ok = isinstance(value, str) and len(value) <= MAX_SCHEDULE_CHARS and len(value.split()) == 5
    _expect(ok, expected, value)
    assert isinstance(value, str)
    _expect(not _has_control(value.replace("\t", " ")), expected, value)
    try:
        croniter(value, datetime(2000, 1, 1)).get_next(datetime)
    except (CroniterBadCronError, CroniterBadDateError, ValueError, KeyError):
        raise FieldError(
            f"expected {expected} that croniter accepts and that matches a "
            f"date, got {_describe(value)}"
        ) from None
    return value


def check_timezone(value: object) -> str:
    """IANA timezone name known to zoneinfo."""
    expected = 'an IANA timezone like "Asia/Shanghai"'
    _expect(isinstance(value, str) and bool(TIMEZONE_RE.fullmatch(value)), expected, value)
    assert isinstance(value, str)
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise FieldError(f"expected {expected}, got unknown timezone {value!r}") from None
    return value


def check_instance_ids(value: object) -> tuple[str, ...]:
    """Array of distinct instance ids like "ins-6pb6lrmy"."""
    expected = 'an array of instance ids like "ins-6pb6lrmy"'
    _expect(isinstance(value, list | tuple), expected, value)
    assert isinstance(value, list | tuple)
    if len(value) > MAX_INSTANCE_IDS:
        raise FieldError(f"expected at most {MAX_INSTANCE_IDS} instance ids, got {len(value)}")
    for item in value:
        _expect(isinstance(item, str) and bool(INSTANCE_ID_RE.fullmatch(item)), expected, item)
    _expect(len(set(value)) == len(value), "distinct instance ids", value)
    return tuple(value)


def _has_control(text: str) -> bool:
    # Cc: C0 and C1 controls and DEL; stored raw they would rewrite an operator's terminal.
    return any(unicodedata.category(char) == "Cc" for char in text)


def _tag_problem(key: object, item: object) -> str | None:
    if not (isinstance(key, str) and key and isinstance(item, str) and item):
        return "non-empty string keys and values"
    if len(key) > MAX_TAG_KEY or len(item) > MAX_TAG_VALUE:
        return f"keys of at most {MAX_TAG_KEY} and values of at most {MAX_TAG_VALUE} characters"
    if _has_control(key) or _has_control(item):
        return "no control characters in tag keys or values"
    return None


def check_tags(value: object) -> dict[str, str]:
    """Table of tag key -> value: non-empty, within Tencent's lengths, no control characters."""
    expected = 'a table of non-empty string tag values, like { backup = "nightly" }'
    _expect(isinstance(value, Mapping), expected, value)
    assert isinstance(value, Mapping)
    if len(value) > MAX_INSTANCE_TAGS:
        raise FieldError(
            f"expected at most {MAX_INSTANCE_TAGS} tags (DescribeInstances takes at most 10"
            f" filters, one per tag), got {len(value)}"
        )
    for key, item in value.items():
        if (problem := _tag_problem(key, item)) is not None:
            raise FieldError(f"expected {problem}, got {_describe({key: item})}")
    return dict(value)


def check_bool(value: object) -> bool:
    """true or false (not 0/1, not a string)."""
    _expect(isinstance(value, bool), "true or false", value)
    assert isinstance(value, bool)
    return value


def check_on_quota(value: object) -> str:
    """What a full image quota does: "rotate" or "fail"."""
    _expect(value in ON_QUOTA, '"rotate" or "fail"', value)
    assert isinstance(value, str)
    return value


def parse_duration(text: str) -> timedelta:
    """ "6h", "90m", "1d", "1h30m" -> timedelta; raises FieldError otherwise."""
    _expect(bool(DURATION_RE.fullmatch(text)), 'a duration like "6h", "90m" or "1d"', text)
    seconds = sum(int(n) * _DURATION_UNITS[u] for n, u in re.findall(r"([0-9]+)([dhms])", text))
    # Four parts of nine digits still fit in a float, but not always in a timedelta.
    _expect(seconds <= _LONGEST_DURATION, "a duration of at most 10000 days", text)
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    """timedelta -> the shortest duration string parse_duration reads back."""
    seconds, parts = int(delta.total_seconds()), []
    for unit, size in _DURATION_UNITS.items():
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"


def check_window(value: object) -> timedelta:
    """Positive duration string."""
    _expect(isinstance(value, str), 'a duration like "6h", "90m" or "1d"', value)
    assert isinstance(value, str)
    delta = parse_duration(value)
    _expect(delta > timedelta(0), "a positive duration", value)
    _expect(delta <= MAX_WINDOW, f"a duration of at most {format_duration(MAX_WINDOW)}", value)
    return delta


def _count(value: object, minimum: int, maximum: int) -> int:
    # bool is an int subclass in Python; `keep_last = true` is a mistake, not 1.
    ok = isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum
    _expect(ok, f"an integer from {minimum} to {maximum}", value)
    assert isinstance(value, int)
    return value


# ---------------------------------------------------------------- whole policies

Validator = Callable[[object], Any]

_FIELDS: Mapping[str, Validator] = {
    "name": check_name,
    "account": check_account,
    "region": check_region,
    "schedule": check_schedule,
    "timezone": check_timezone,
    "instance_ids": check_instance_ids,
    "instance_tags": check_tags,
    "force_poweroff": check_bool,
    "sysprep": check_bool,
    "include_data_disks": check_bool,
    "on_quota": check_on_quota,
    "completion_window": check_window,
    "enabled": check_bool,
}
_REQUIRED = ("name", "region", "schedule")
_RETENTION_FIELDS = (*KEEP_RULES, "max_age_days")


class _Errors:
    """Collects every problem of one policy, each naming its field."""

    def __init__(self, where: str, label: str) -> None:
        self.where, self.label, self.messages = where, label, list[str]()

    def add(self, field_name: str, problem: str) -> None:
        """Record one problem with one field."""
        self.messages.append(f"{self.where}: policy {self.label}: {field_name}: {problem}")


_TABLES = ("retention", "copies")


def _check_fields(raw: Mapping[str, Any], errors: _Errors) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _TABLES:
            continue
        if key not in _FIELDS:
            errors.add(key, f"unknown key; expected one of {', '.join([*_FIELDS, *_TABLES])}")
            continue
        try:
            values[key] = _FIELDS[key](value)
        except FieldError as exc:
            errors.add(key, str(exc))
    for key in _REQUIRED:
        if key not in raw:
            errors.add(key, "missing; this field is required")
    return values


def _check_retention(raw: object, errors: _Errors) -> Retention | None:
    if not isinstance(raw, Mapping):
        errors.add(
            "retention",
            "expected a [policies.retention] table with at least one "
            f"keep rule ({', '.join(KEEP_RULES)}), got {_describe(raw)}",
        )
        return None
    return _rules(raw, "retention", _RETENTION_FIELDS, errors)


def _rules(
    raw: Mapping[str, Any], label: str, allowed: Sequence[str], errors: _Errors
) -> Retention:
    """Keep rules and max age from `raw`; every other key in `allowed` is left to the caller."""
    values: dict[str, Any] = {}
    found = len(errors.messages)
    for key, value in raw.items():
        if key not in allowed:
            errors.add(f"{label}.{key}", f"unknown key; expected one of {', '.join(allowed)}")
        elif key in _RETENTION_FIELDS:
            try:
                values[key] = _retention_count(key, value)
            except FieldError as exc:
                errors.add(f"{label}.{key}", str(exc))
    bad_rule = any(f"{label}.{r}:" in m for r in KEEP_RULES for m in errors.messages[found:])
    if not any(values.get(rule, 0) > 0 for rule in KEEP_RULES) and not bad_rule:
        errors.add(label, f"expected at least one keep rule > 0 ({', '.join(KEEP_RULES)})")
    return Retention(**values)


_COPY_FIELDS = ("region", *_RETENTION_FIELDS)


def _check_copies(raw: object, region: object, errors: _Errors) -> tuple[CopyTarget, ...]:
    """Up to MAX_COPIES destinations: each another region than the policy's, none twice."""
    expected = f"an array of at most {MAX_COPIES} [[policies.copies]] tables"
    if not isinstance(raw, list | tuple) or not all(isinstance(t, Mapping) for t in raw):
        errors.add("copies", f"expected {expected}, got {_describe(raw)}")
        return ()
    if len(raw) > MAX_COPIES:
        errors.add("copies", f"expected {expected}, got {len(raw)}")
        return ()
    copies: list[CopyTarget] = []
    for index, table in enumerate(raw, start=1):
        target = _copy_target(table, f"copies[{index}]", region, errors)
        if target is not None and target.region in {c.region for c in copies}:
            errors.add(f"copies[{index}].region", f"duplicate; {target.region!r} is listed twice")
        elif target is not None:
            copies.append(target)
    return tuple(copies)


def _copy_target(
    table: Mapping[str, Any], label: str, source: object, errors: _Errors
) -> CopyTarget | None:
    rules = _rules(table, label, _COPY_FIELDS, errors)
    if "region" not in table:
        errors.add(f"{label}.region", "missing; this field is required")
        return None
    try:
        region = check_region(table["region"])
    except FieldError as exc:
        errors.add(f"{label}.region", str(exc))
        return None
    if region == source:
        errors.add(f"{label}.region", f"is the policy's own region {region!r}; copy elsewhere")
        return None
    return CopyTarget(region, rules)


def _retention_count(key: str, value: object) -> int:
    if key == "max_age_days":
        return _count(value, 1, MAX_AGE_DAYS)
    return _count(value, 0, MAX_KEEP)


def _check_targets(values: Mapping[str, Any], raw: Mapping[str, Any], errors: _Errors) -> None:
    if "instance_ids" in raw and "instance_ids" not in values:
        return  # already reported
    if "instance_tags" in raw and "instance_tags" not in values:
        return
    if not values.get("instance_ids") and not values.get("instance_tags"):
        errors.add(
            "instance_ids",
            "expected at least one target: a non-empty instance_ids "
            "array and/or a non-empty instance_tags table",
        )


def _label(raw: Mapping[str, Any], index: int) -> str:
    name = raw.get("name")
    if not isinstance(name, str):
        return f"#{index}"
    # A hostile name may be megabytes long; the label only has to tell policies apart.
    shown = repr(name)
    return f"#{index} {shown if len(shown) <= 40 else shown[:37] + '...'}"


def validate(
    raw: Mapping[str, Any], *, where: str, index: int = 1, policy_id: int | None = None
) -> tuple[Policy | None, list[str]]:
    """Check one policy's fields; the policy, or None and every problem found."""
    errors = _Errors(where, _label(raw, index))
    values = _check_fields(raw, errors)
    retention = _check_retention(raw.get("retention"), errors)
    copies = _check_copies(raw.get("copies", []), raw.get("region"), errors)
    _check_targets(values, raw, errors)
    if errors.messages or retention is None:
        return None, errors.messages
    return Policy(**values, retention=retention, copies=copies, id=policy_id), []


def _duplicates(raws: Sequence[Mapping[str, Any]], where: str) -> list[str]:
    seen: dict[str, int] = {}
    messages = []
    for index, raw in enumerate(raws, start=1):
        name = raw.get("name")
        if not isinstance(name, str):
            continue
        if name in seen:
            messages.append(
                f"{where}: policy {_label(raw, index)}: name: duplicate; policy "
                f"#{seen[name]} already has this name"
            )
        seen.setdefault(name, index)
    return messages


def _policy_tables(data: Mapping[str, Any], where: str) -> list[Mapping[str, Any]]:
    unknown = sorted(set(data) - {"policies"})
    if unknown:
        raise PolicyError(
            f"{where}: unknown top-level key(s) {', '.join(unknown)}; expected "
            "only [[policies]] tables"
        )
    tables = data.get("policies")
    if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
        raise PolicyError(
            f"{where}: policies: expected [[policies]] tables, got {_describe(tables)}"
        )
    return tables


def _toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{where}: not valid TOML: {exc}") from None
    except RecursionError:
        raise PolicyError(f"{where}: not valid TOML: nested too deeply") from None
    except ValueError:
        # int() refuses numbers of more than 4300 digits before TOML's own checks run.
        raise PolicyError(f"{where}: not valid TOML: a number is too long") from None


def parse_text(text: str, where: str) -> list[Policy]:
    """Policies from TOML text; raises PolicyError listing every problem."""
    tables = _policy_tables(_toml(text, where), where)
    messages = _duplicates(tables, where)
    policies = []
    for index, raw in enumerate(tables, start=1):
        policy, problems = validate(raw, where=where, index=index)
        messages.extend(problems)
        if policy is not None:
            policies.append(policy)
    if messages:
        raise PolicyError(*messages)
    return policies


def load_file(path: Path) -> list[Policy]:
    """Policies from a TOML file (docs/design.md#policy-file); PolicyError lists every problem."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy file: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise PolicyError(f"{path}: policy file is larger than {MAX_FILE_BYTES // 2**20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML: not UTF-8 (byte {exc.start})") from None
    if "\0" in text:
        raise PolicyError(f"{path}: not valid TOML: the file contains a NUL byte")
    return parse_text(text, str(path))


# Fields that are not one flat value each: the id, and the nested tables.
_NOT_FLAT = {"id", "retention", "copies"}


def _rules_raw(rules: Retention) -> dict[str, int]:
    return {k: v for k in _RETENTION_FIELDS if (v := getattr(rules, k)) is not None}


def copies_raw(copies: Sequence[CopyTarget]) -> list[dict[str, Any]]:
    """The file-format (and `policies.copies` column) form of a policy's copies."""
    return [{"region": c.region, **_rules_raw(c.retention)} for c in copies]


# ---------------------------------------------------------------- diffs


def comparable(policy: Policy) -> dict[str, Any]:
    """Flat field -> value (retention.* included, id excluded), for diffs and upserts."""
    flat = {f.name: getattr(policy, f.name) for f in fields(policy) if f.name not in _NOT_FLAT}
    flat["instance_tags"] = dict(policy.instance_tags)
    flat["copies"] = copies_raw(policy.copies)
    for key in _RETENTION_FIELDS:
        flat[f"retention.{key}"] = getattr(policy.retention, key)
    return flat


@dataclass(frozen=True, slots=True)
class Change:
    """One field that differs: stored value -> file value."""

    field: str
    old: Any
    new: Any


@dataclass(frozen=True, slots=True)
class PolicyDiff:
    """What applying a file would do to the stored policies."""

    added: tuple[Policy, ...]
    changed: tuple[tuple[Policy, tuple[Change, ...]], ...]
    unchanged: tuple[Policy, ...]
    missing: tuple[Policy, ...]  # stored but not in the file

    @property
    def writes(self) -> bool:
        """True when applying (without prune) writes anything."""
        return bool(self.added or self.changed)


def changes(old: Policy, new: Policy) -> tuple[Change, ...]:
    """Fields whose values differ, in declaration order."""
    before, after = comparable(old), comparable(new)
    return tuple(Change(k, before[k], after[k]) for k in after if before[k] != after[k])


def diff(stored: Sequence[Policy], wanted: Sequence[Policy]) -> PolicyDiff:
    """Compare stored policies with a file's, by name."""
    by_name = {p.name: p for p in stored}
    added, changed, unchanged = [], [], []
    for policy in wanted:
        old = by_name.get(policy.name)
        if old is None:
            added.append(policy)
        elif delta := changes(old, policy):
            changed.append((policy, delta))
        else:
            unchanged.append(policy)
    names = {p.name for p in wanted}
    missing = tuple(p for p in stored if p.name not in names)
    return PolicyDiff(tuple(added), tuple(changed), tuple(unchanged), missing)


# ---------------------------------------------------------------- cron slots


def _local(when: datetime, zone: ZoneInfo) -> datetime:
    return when.astimezone(zone).replace(tzinfo=None)


def _gap_end(naive: datetime, zone: ZoneInfo) -> datetime:
    # In a gap, fold=0 applies the offset from before the transition and fold=1 the one after,
    # so the transition instant lies between the two readings: bisect to the second.
    low = naive.replace(tzinfo=zone, fold=1).astimezone(UTC)
    high = naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
    after = high.astimezone(zone).utcoffset()
    while high - low > timedelta(seconds=1):
        mid = low + (high - low) / 2
        if mid.astimezone(zone).utcoffset() == after:
            high = mid
        else:
            low = mid
    return high.replace(microsecond=0)


def local_to_instant(naive: datetime, zone: ZoneInfo) -> datetime:
    """Local wall time -> UTC instant: first occurrence if repeated, gap end if skipped."""
    instant = naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if _local(instant, zone) == naive:
        return instant
    return _gap_end(naive, zone)


def _margin(zone: ZoneInfo, when: datetime) -> timedelta:
    # How far local times near `when` can be shifted by an offset change; zero without DST.
    offsets = [
        (when + timedelta(days=d)).astimezone(zone).utcoffset() or timedelta(0) for d in (-1, 0, 1)
    ]
    return max(offsets) - min(offsets)


def _aware(when: datetime) -> datetime:
    if when.tzinfo is None:
        raise ValueError("slot computations need timezone-aware datetimes")
    return when


def _forward(policy: Policy, after: datetime) -> Iterator[datetime]:
    """Distinct slot instants strictly after `after`, ascending, forever."""
    zone, after = policy.zone, _aware(after)
    cron = croniter(policy.schedule, _local(after, zone) - _margin(zone, after))
    last: datetime | None = None
    while True:
        instant = local_to_instant(cron.get_next(datetime), zone)
        if instant > after and instant != last:
            last = instant
            yield instant


def slots_between(policy: Policy, start: datetime, end: datetime) -> list[datetime]:
    """Slots in (start, end], ascending, as aware UTC datetimes."""
    found = []
    for slot in _forward(policy, start):
        if slot > _aware(end):
            break
        found.append(slot)
    return found


def next_slot_after(policy: Policy, when: datetime) -> datetime:
    """The first slot strictly after `when` (aware UTC)."""
    return next(_forward(policy, when))


def latest_slot_at_or_before(policy: Policy, when: datetime) -> datetime:
    """The newest slot at or before `when` (aware UTC)."""
    zone, when = policy.zone, _aware(when)
    # Start a minute past `when` (slots are whole minutes) plus any DST shift, walk backwards.
    base = _local(when, zone) + _margin(zone, when) + timedelta(minutes=1)
    cron = croniter(policy.schedule, base)
    while True:
        instant = local_to_instant(cron.get_prev(datetime), zone)
        if instant <= when:
            return instant
