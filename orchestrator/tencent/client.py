"""The async CVM API client: one aiohttp session, TC3-signed calls, a short in-call retry layer.

In-call retries are deliberately short and bounded (docs/design.md#invariants, 5): durable retries
live in Postgres. A throttled call was not executed, so it is retried for every action. Other
transient failures are retried here only for read-only `Describe*` actions: a dropped CreateImage
(or SyncImages) may have made the image (or the copy), and only the engine, which resolves by name,
may decide to call again.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self

import aiohttp

from orchestrator import logs
from orchestrator.tencent import decode, transport
from orchestrator.tencent.credentials import CredentialsProvider
from orchestrator.tencent.endpoints import DEFAULT_ENDPOINT, resolve, validate
from orchestrator.tencent.errors import SYNC_IMAGES, ErrorClass, TencentError
from orchestrator.tencent.models import (
    CreateImageResult,
    Filter,
    Image,
    ImagePage,
    Instance,
    InstancePage,
    Json,
    SyncImagesResult,
)
from orchestrator.tencent.signing import build_headers

SERVICE = "cvm"
API_VERSION = "2017-03-12"
REQUEST_CLIENT = "CVM_BACKUP_0.1.0"
PAGE_SIZE = 100  # the API's maximum Limit and ids per call
LANGUAGES = frozenset({"zh-CN", "en-US"})
DRY_RUN_OK = "DryRunOperation"

log = logs.get("tencent.client")

# Told (account, action, region, code) after every HTTP attempt; code "ok" for a success.
# Metrics count API calls through this without the client knowing about Prometheus.
CallObserver = Callable[[str, str, str, str], None]
OK_CODE = "ok"
# Asked after the limiter's grant, just before sending: False withholds the call. Calls wait
# at the limiter for seconds; what the caller learned meanwhile (a full quota) can still count.
Guard = Callable[[], bool]


class CallWithheld(Exception):
    """The caller's guard said no after the limiter's grant: nothing was sent."""


class RateLimit(Protocol):
    """The per (account, action) limiter the client waits on before every HTTP attempt."""

    async def acquire(self, account: str, action: str) -> None:
        """Wait until one more call of `action` fits under the account's limit."""
        ...

    def throttled(self, account: str, action: str) -> None:
        """The server answered RequestLimitExceeded*: slow down."""
        ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Budgets of the in-call retry layer; waits are full-jitter exponential, in seconds."""

    throttle_retries: int = 5
    transient_attempts: int = 3
    base_delay: float = 0.2
    max_delay: float = 2.0

    def delay(self, retry: int) -> float:
        """The wait before retry number `retry` (1-based)."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (retry - 1)))


@dataclass(slots=True)
class _Tally:
    throttles: int = 0
    transients: int = 0

    @property
    def attempt(self) -> int:
        return self.throttles + self.transients + 1


def _chunks(items: Sequence[str], size: int = PAGE_SIZE) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _lookup_params(ids: Sequence[str] | None, filters: Sequence[Filter] | None, key: str) -> Json:
    if ids is not None and filters:
        raise ValueError(f"{key} and filters cannot be combined in one call")
    params: Json = {}
    if ids is not None:
        params[key] = list(ids)
    if filters:
        params["Filters"] = [f.to_json() for f in filters]
    return params


def _tag_specification(tags: Mapping[str, str]) -> list[Json]:
    pairs = [{"Key": k, "Value": v} for k, v in tags.items()]
    return [{"ResourceType": "image", "Tags": pairs}]


def _flag(value: bool) -> str:
    # CreateImage takes these two as the strings "true"/"false", not JSON booleans.
    return "true" if value else "false"


class CvmClient:
    """Typed CVM actions for one account over one aiohttp session; use as `async with`."""

    def __init__(
        self,
        *,
        credentials: CredentialsProvider,
        endpoint: str = DEFAULT_ENDPOINT,
        limiter: RateLimit | None = None,
        account: str = "default",
        timeout: float = 30.0,
        language: str = "en-US",
        retry: RetryPolicy | None = None,
        max_connections: int = 100,
    ) -> None:
        if language not in LANGUAGES:
            raise ValueError(f"language must be one of {sorted(LANGUAGES)}, not {language!r}")
        self._credentials = credentials
        self._endpoint = validate(endpoint)
        self._limiter = limiter
        self.account = account
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._language = language
        self._retry = retry or RetryPolicy()
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._observers: list[CallObserver] = []

    def __repr__(self) -> str:
        return f"CvmClient(account={self.account!r}, endpoint={self._endpoint!r})"

    @property
    def limiter(self) -> RateLimit | None:
        """The limiter this client waits on (shared by the process's clients)."""
        return self._limiter

    def add_observer(self, observer: CallObserver) -> None:
        """Tell `observer` the outcome of every HTTP attempt from now on."""
        self._observers.append(observer)

    def remove_observer(self, observer: CallObserver) -> None:
        """Stop telling `observer` (no-op when it was not added)."""
        if observer in self._observers:
            self._observers.remove(observer)

    def _observe(self, action: str, region: str, code: str) -> None:
        for observer in self._observers:
            observer(self.account, action, region, code)

    async def open(self) -> None:
        """Create the HTTP session (idempotent); must run inside the event loop that uses it."""
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections)
            self._session = aiohttp.ClientSession(connector=connector)

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- the raw call and its retry layer ---------------------------------------------------

    async def call(
        self, action: str, region: str, params: Mapping[str, Any], *, guard: Guard | None = None
    ) -> Json:
        """Call `action` in `region`; the answer's `Response` object, or a TencentError.

        With a `guard`, CallWithheld when it says no at the moment of sending.
        """
        payload = transport.encode(params)
        tally = _Tally()
        while True:
            started = time.monotonic()
            try:
                response = await self._attempt(action, region, payload, guard)
            except TencentError as exc:
                exc.action = action
                attempt = tally.attempt
                delay = self._retry_delay(action, exc, tally)
                self._log_error(action, region, exc, attempt, delay)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
                continue
            elapsed_ms = round((time.monotonic() - started) * 1000, 1)
            log.debug(
                "api.call",
                action=action,
                region=region,
                request_id=response["RequestId"],
                attempt=tally.attempt,
                elapsed_ms=elapsed_ms,
            )
            return response

    async def _attempt(
        self, action: str, region: str, payload: bytes, guard: Guard | None = None
    ) -> Json:
        if self._session is None:
            raise RuntimeError("CvmClient is not open: use `async with CvmClient(...)`")
        if self._limiter is not None:
            await self._limiter.acquire(self.account, action)
        if guard is not None and not guard():
            raise CallWithheld(action)
        creds = await self._credentials.get()
        endpoint = resolve(self._endpoint, region)
        headers = build_headers(
            secret_id=creds.secret_id,
            secret_key=creds.secret_key,
            token=creds.token,
            service=SERVICE,
            host=endpoint.host,
            action=action,
            version=API_VERSION,
            region=region,
            timestamp=int(time.time()),
            payload=payload,
            language=self._language,
        )
        headers["X-TC-RequestClient"] = REQUEST_CLIENT
        headers["X-TC-TraceId"] = str(uuid.uuid4())
        try:
            response = await transport.post(
                self._session, endpoint.url, headers, payload, self._timeout
            )
        except TencentError as exc:
            self._observe(action, region, exc.code)
            raise
        self._observe(action, region, OK_CODE)
        return response

    def _retry_delay(self, action: str, exc: TencentError, tally: _Tally) -> float | None:
        """The wait before retrying after `exc`, or None to give up; counts the retry."""
        error_class = exc.error_class
        if error_class is ErrorClass.THROTTLED:
            if self._limiter is not None:
                self._limiter.throttled(self.account, action)
            if tally.throttles >= self._retry.throttle_retries:
                return None
            tally.throttles += 1
            return self._retry.delay(tally.throttles)
        read_only = action.startswith("Describe")
        if error_class is ErrorClass.TRANSIENT and read_only:
            if tally.transients + 1 >= self._retry.transient_attempts:
                return None
            tally.transients += 1
            return self._retry.delay(tally.transients)
        return None

    @staticmethod
    def _log_error(
        action: str, region: str, exc: TencentError, attempt: int, delay: float | None
    ) -> None:
        log.debug(
            "api.error",
            action=action,
            region=region,
            code=exc.code,
            request_id=exc.request_id,
            attempt=attempt,
            retry_in=None if delay is None else round(delay, 3),
        )

    # -- images -----------------------------------------------------------------------------

    async def create_image(
        self,
        region: str,
        *,
        instance_id: str,
        name: str,
        description: str | None = None,
        force_poweroff: bool = False,
        sysprep: bool = False,
        data_disk_ids: Sequence[str] = (),
        tags: Mapping[str, str] | None = None,
        dry_run: bool = False,
        guard: Guard | None = None,
    ) -> CreateImageResult:
        """CreateImage; `image_id` is None for the older API (resolve by name) and for a DryRun.

        `guard`: see `call` (CallWithheld when it says no before sending).
        """
        params: Json = {"ImageName": name, "InstanceId": instance_id}
        if description is not None:
            params["ImageDescription"] = description
        params["ForcePoweroff"] = _flag(force_poweroff)
        params["Sysprep"] = _flag(sysprep)
        if data_disk_ids:
            params["DataDiskIds"] = list(data_disk_ids)
        if dry_run:
            params["DryRun"] = True
        if tags:
            params["TagSpecification"] = _tag_specification(tags)
        try:
            response = await self.call("CreateImage", region, params, guard=guard)
        except TencentError as exc:
            if exc.code != DRY_RUN_OK:
                raise
            return CreateImageResult(image_id=None, request_id=exc.request_id or "", dry_run=True)
        image_id = None if dry_run else response.get("ImageId") or None
        return CreateImageResult(
            image_id=None if image_id is None else str(image_id),
            request_id=response["RequestId"],
            dry_run=dry_run,
        )

    async def describe_images(
        self,
        region: str,
        *,
        image_ids: Sequence[str] | None = None,
        filters: Sequence[Filter] | None = None,
        offset: int = 0,
        limit: int = PAGE_SIZE,
    ) -> ImagePage:
        """One page of DescribeImages (ImageIds and Filters cannot be combined)."""
        params = _lookup_params(image_ids, filters, "ImageIds")
        params.update(Offset=offset, Limit=limit)
        response = await self.call("DescribeImages", region, params)
        return decode.checked("DescribeImages", decode.image_page, response)

    async def iter_images(
        self, region: str, *, filters: Sequence[Filter] | None = None
    ) -> AsyncIterator[Image]:
        """Every image matching `filters`, page by page."""
        offset = 0
        while True:
            page = await self.describe_images(region, filters=filters, offset=offset)
            for image in page.images:
                yield image
            offset += len(page.images)
            if not page.images or offset >= page.total_count:
                return

    async def images_by_ids(self, region: str, ids: Iterable[str]) -> list[Image]:
        """The images among `ids` that exist (100 ids per call); unknown ids are left out."""
        found: list[Image] = []
        for chunk in _chunks(_unique(ids)):
            page = await self.describe_images(region, image_ids=chunk, limit=PAGE_SIZE)
            found.extend(page.images)
        return found

    async def find_images_by_name(self, region: str, name: str) -> list[Image]:
        """Images named exactly `name` (the server's image-name filter is a fuzzy match)."""
        fuzzy = [Filter("image-name", (name,))]
        images = self.iter_images(region, filters=fuzzy)
        return [image async for image in images if image.name == name]

    async def delete_images(
        self,
        region: str,
        image_ids: Sequence[str],
        *,
        delete_binded_snap: bool = True,
        dry_run: bool = False,
    ) -> str:
        """DeleteImages; the request id (a successful DryRun included)."""
        if not image_ids:
            raise ValueError("delete_images needs at least one image id")
        params: Json = {"ImageIds": list(image_ids), "DeleteBindedSnap": delete_binded_snap}
        if dry_run:
            params["DryRun"] = True
        try:
            response = await self.call("DeleteImages", region, params)
        except TencentError as exc:
            if exc.code != DRY_RUN_OK or not dry_run:
                raise
            return exc.request_id or ""
        return str(response["RequestId"])

    async def sync_images(
        self,
        region: str,
        image_id: str,
        destinations: Sequence[str],
        *,
        image_name: str | None = None,
        dry_run: bool = False,
        guard: Guard | None = None,
    ) -> SyncImagesResult:
        """SyncImages: copy the NORMAL custom image `image_id` of `region` to `destinations`.

        The copies are named `image_name` (default: the source's name) and are SYNCING in their
        regions until NORMAL. There is no client token, so a lost answer is never re-sent here
        (only throttling is retried): the caller looks the copy up by exact name in each
        destination before calling again, and does the same when the answer's `copies` lacks a
        destination (see SyncImagesResult). Errors are classed for SyncImages
        (`TencentError.error_class`): a source not NORMAL yet is BUSY, a full destination QUOTA,
        a name taken there ALREADY_DONE, a refused destination PERMANENT. One destination per
        call keeps each refusal that destination's own. `guard`: see `call`.
        """
        regions = _unique(destinations)
        if not regions:
            raise ValueError("sync_images needs at least one destination region")
        params: Json = {"ImageIds": [image_id], "DestinationRegions": regions}
        if image_name is not None:
            params["ImageName"] = image_name
        params["ImageSetRequired"] = True
        if dry_run:
            params["DryRun"] = True
        try:
            response = await self.call(SYNC_IMAGES, region, params, guard=guard)
        except TencentError as exc:
            if exc.code != DRY_RUN_OK or not dry_run:
                raise
            return SyncImagesResult(copies=(), request_id=exc.request_id or "", dry_run=True)
        copies = () if dry_run else decode.checked(SYNC_IMAGES, decode.sync_images, response)
        request_id = str(response["RequestId"])
        return SyncImagesResult(copies=copies, request_id=request_id, dry_run=dry_run)

    async def describe_image_quota(self, region: str) -> int:
        """The account's custom-image quota in `region`."""
        response = await self.call("DescribeImageQuota", region, {})
        return decode.checked("DescribeImageQuota", lambda r: int(r["ImageNumQuota"]), response)

    # -- instances --------------------------------------------------------------------------

    async def describe_instances(
        self,
        region: str,
        *,
        instance_ids: Sequence[str] | None = None,
        filters: Sequence[Filter] | None = None,
        offset: int = 0,
        limit: int = PAGE_SIZE,
    ) -> InstancePage:
        """One page of DescribeInstances (InstanceIds and Filters cannot be combined)."""
        params = _lookup_params(instance_ids, filters, "InstanceIds")
        params.update(Offset=offset, Limit=limit)
        response = await self.call("DescribeInstances", region, params)
        return decode.checked("DescribeInstances", decode.instance_page, response)

    async def iter_instances(
        self,
        region: str,
        *,
        instance_ids: Sequence[str] | None = None,
        filters: Sequence[Filter] | None = None,
    ) -> AsyncIterator[Instance]:
        """Every instance among `instance_ids` (100 per call), or matching `filters`, paginated."""
        if instance_ids is not None:
            for chunk in _chunks(_unique(instance_ids)):
                page = await self.describe_instances(region, instance_ids=chunk)
                for instance in page.instances:
                    yield instance
            return
        offset = 0
        while True:
            page = await self.describe_instances(region, filters=filters, offset=offset)
            for instance in page.instances:
                yield instance
            offset += len(page.instances)
            if not page.instances or offset >= page.total_count:
                return
