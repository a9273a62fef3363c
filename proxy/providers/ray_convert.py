"""The `ray` kind's pure conversions: a request -> the replica's wire dict (the local route's mapping), a
replica's reply -> images or the proxy's error, a failed Ray call or HTTP status -> the proxy's error, a
partial's PNG -> the request's format.

The replies are local_backend.ray_wire's plain data; over HTTP their bytes are base64 text.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping

from local_backend import EngineConfig, InvalidParamsError
from local_backend.ray_wire import params_to_wire

from ..errors import (
    InvalidRequest,
    ProxyError,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    retry_after_from_headers,
)
from ..media.output import encode_image
from ..request import ImageRequest
from .base import GeneratedImage
from .local_convert import client_param, request_tier, to_params


class _Partials:
    """Marks that a request wants previews: to_params keeps partial_images only with an on_partial."""

    def __call__(self, *args: object) -> None:  # never called here: the replica makes its own
        pass


def to_wire(req: ImageRequest, config: EngineConfig, timeout: float, partials: bool) -> dict:
    """ImageRequest -> the replica's plain dict (pure): the local route's mapping (the speed tier that
    quality / use_turbo / acceleration pick included), input images as sent. `config` is the pool's
    local_backend.EngineConfig, `timeout` the route's time."""
    try:
        tier = request_tier(req, config)
    except InvalidParamsError as e:
        raise InvalidRequest(str(e), param=e.param) from None
    # The input files go on as they are (params_to_wire takes encoded bytes as well as Pillow images): the
    # replica decodes them, so the proxy never spends CPU on it. GenerationParams names only the images.
    params = to_params(req, images=[im.data for im in req.images],  # type: ignore[misc]
                       mask=req.mask.data if req.mask is not None else None,  # type: ignore[arg-type]
                       on_partial=_Partials() if partials else None, tier=tier)
    # The queue drops a job that waits past the route's time (the router cancels it at the request's).
    params.deadline = time.monotonic() + timeout
    return params_to_wire(params)


def ray_error(exc: BaseException) -> ProxyError:
    """A Ray or Serve exception from a pool call -> the proxy's error (retryable unless said otherwise)."""
    from ray import exceptions as rex
    from ray.serve import exceptions as sex

    if isinstance(exc, sex.BackPressureError):
        return RateLimited("every replica of the Ray pool is busy and its request queue is full", retry_after=1.0)
    if isinstance(exc, rex.TaskCancelledError):  # RequestCancelledError too
        return UpstreamTimeout("the Ray pool cancelled the request")
    if isinstance(exc, rex.RayActorError):  # ActorDiedError, ActorUnavailableError
        return UpstreamError("a replica of the Ray pool died or became unreachable while it had the request")
    if isinstance(exc, (sex.DeploymentUnavailableError, sex.ReplicaUnavailableError)):
        return UpstreamUnavailable("the Ray pool has no replica that can take the request now", retry_after=1.0)
    if isinstance(exc, rex.RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        return UpstreamError(f"a replica of the Ray pool failed: {type(cause).__name__}")
    return UpstreamError(f"the Ray pool call failed: {type(exc).__name__}")


def reply_error(reply: dict) -> ProxyError:
    """A replica's error reply (local_backend.ray_wire.error_reply) -> the proxy's error."""
    error = reply.get("error") or {}
    kind, message = error.get("type"), str(error.get("message") or "unknown error")
    if kind == "queue_full":
        return RateLimited(f"the Ray pool's engine queue is full: {message}", retry_after=error.get("retry_after"))
    if kind == "invalid_params":
        param = error.get("param")
        return InvalidRequest(message, param=param if isinstance(param, str) else None)
    if kind in ("cancelled", "deadline"):
        return UpstreamTimeout(f"the pool's job was stopped: {message}")
    return UpstreamError(f"the pool's engine failed: {message}")


def unb64(value: str | bytes) -> bytes:
    return base64.b64decode(value, validate=True) if isinstance(value, str) else value


def images_from_reply(reply: dict, req: ImageRequest, revised: str | None = None) -> list[GeneratedImage]:
    """A replica's reply -> the request's images (its error reply -> the proxy's error)."""
    if not isinstance(reply, dict):
        raise UpstreamError("the Ray pool answered something that is not a reply")
    if not reply.get("ok"):
        error = reply_error(reply)
        error.param = client_param(req, error.param)
        raise error
    try:
        datas = [unb64(d) for d in reply["images"]]
        seeds = list(reply.get("seeds") or [None] * len(datas))
    except (KeyError, TypeError, binascii.Error):
        raise UpstreamError("the Ray pool's reply has no readable images") from None
    if len(datas) != req.n or len(seeds) != len(datas):
        raise UpstreamError(f"the Ray pool returned {len(datas)} of {req.n} images")
    rewritten = reply.get("revised_prompt")  # the replica's prompt_enhancement, if it rewrote
    revised = rewritten if isinstance(rewritten, str) else revised
    gpu = reply.get("gpu_seconds")  # the replica's accelerator time, split over the images
    share = gpu / len(datas) if isinstance(gpu, int | float) and not isinstance(gpu, bool) and datas else None
    return [GeneratedImage(data=data, mime="image/png", width=req.width, height=req.height, seed=seed,
                           revised_prompt=revised, gpu_seconds=share)
            for data, seed in zip(datas, seeds, strict=True)]


def reencode(data: bytes, fmt: str, compression: int | None) -> bytes:
    """A partial image's PNG (as the replica sends it) -> the request's output format."""
    import io

    from PIL import Image


    image = Image.open(io.BytesIO(data))
    image.load()
    return encode_image(image, fmt, compression)


def http_error(status: int, headers: Mapping[str, str]) -> ProxyError:
    """The HTTP ingress's status when it answered no reply (Serve itself, not a replica) -> the proxy's error."""
    retry_after = retry_after_from_headers(headers)
    if status == 429:
        return RateLimited("the Ray pool's HTTP ingress is rate limiting", retry_after=retry_after or 1.0)
    if status in (502, 503, 504):  # Serve: no replica yet, back pressure, timeouts
        return UpstreamUnavailable(f"the Ray pool's HTTP ingress answered {status}", retry_after=retry_after or 1.0)
    if status == 404:
        return UpstreamError("the Ray pool's HTTP ingress has no such application (check route_prefix)")
    return UpstreamError(f"the Ray pool's HTTP ingress answered {status}")
