"""The name look-up: which listed image is a job's, and when an image with its name is not ours.

CreateImage and SyncImages take no client token, so a job's deterministic image name is how an
earlier call is resolved (after a crash, a lost answer, an older API's answer without ImageId).
An image is the job's only when the name matches exactly and it is provably ours
(docs/design.md#invariants, 1).
"""

from __future__ import annotations

from orchestrator import naming
from orchestrator.context import EngineContext
from orchestrator.jobs import Job
from orchestrator.tencent.errors import TencentError
from orchestrator.tencent.models import Image

# A job whose exact name belongs to an image that is not provably ours ends with this code.
NAME_TAKEN = "ImageNameTaken"


class NameTaken(TencentError):
    """An image with the job's exact name exists without this deployment's and policy's tags."""

    def __init__(self, image: Image) -> None:
        super().__init__(NAME_TAKEN, f"name taken by {image.image_id}")
        self.image = image


async def lookup(ctx: EngineContext, job: Job) -> Image | None:
    """The job's image by exact name, if it is provably ours; NameTaken when it is not."""
    images = await ctx.client(job.account).find_images_by_name(job.region, job.image_name)
    # Names are unique per region, so at most one. Only tags naming this deployment and the
    # job's policy prove the image is ours: a copy made by hand, another installation or a
    # cross-region copy can carry the exact name, and adopting it would later delete it.
    for image in images:
        if naming.is_ours(
            image.tags,
            ctx.settings.deployment,
            job.policy_name,
            instance_id=job.instance_id,
            slot=job.slot,
        ) or _untagged_copy(job, image):
            return image
    if images:
        raise NameTaken(images[0])
    return None


def _untagged_copy(job: Job, image: Image) -> bool:
    """Whether `image` can be the copy `job` made: whether SyncImages carries tags over is not
    documented, so a copy is known by its exact name in the destination and by carrying no
    tags at all; one with someone else's tags is never taken for ours."""
    return job.kind == "copy" and not image.tags
