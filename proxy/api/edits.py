"""POST /v1/images/edits: multipart as the openai SDK sends it (image / image[] / mask files), or JSON
with images[].image_url; inputs checked, the size following the first image unless one is asked."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import TYPE_CHECKING

from aiohttp import web

from ..errors import InvalidRequest
from ..http.body import read_body
from ..jobs.ask import BACKGROUND, mark_background
from ..media.inputs import InputReader, json_image_refs
from ..media.output import check_output_request
from ..media.sizing import check_work, resolve_size
from ..request import ImageRequest, build_request, parse_body
from ..telemetry import tracing
from . import generations, jobs, stream
from .context import BODY

if TYPE_CHECKING:
    from .gateway import Gateway

IMAGE_FIELDS = ("image", "image[]")
# Input images may be larger than what the model makes (a phone photo is 12 MP).
MIN_INPUT_PIXELS = 4096 * 4096


def edit_models(gw: Gateway) -> list[str]:
    return [name for name, cfg in gw.config.models.items() if cfg.max_input_images > 0]


async def parse_edit(gw: Gateway, request: web.Request) -> ImageRequest:
    body = await read_body(request, files=True)
    if body.raw is not None:
        request[BODY] = body.raw
    fields = dict(body.fields)
    mark_background(request, fields)
    refs, mask_ref = json_image_refs(fields)
    editing = edit_models(gw)
    default = gw.default_model if gw.default_model in editing else next(iter(editing), None)
    model = generations.served_model(gw, request, fields.get("model"), default, editing, "Edit models here")
    limit = gw.config.models[model].max_input_images
    if limit == 0:
        raise InvalidRequest(f"The model '{model}' does not edit images. Edit models here: "
                             f"{', '.join(editing) or 'none'}.", param="model")
    uploads = [f for f in body.files if f.field in IMAGE_FIELDS]
    masks = [f for f in body.files if f.field == "mask"]
    if uploads and refs:
        raise InvalidRequest("Send the images as files or as images[].image_url, not both.", param="images")
    count = len(uploads) or len(refs)
    if count == 0:
        if any(name in fields for name in IMAGE_FIELDS):  # sent, but as text (a JSON string, a form text field)
            raise InvalidRequest("Invalid 'image': send the image as a file (multipart 'image' or 'image[]'), or "
                                 "in JSON as images: [{\"image_url\": \"data:image/png;base64,...\"}].",
                                 param="image")
        raise InvalidRequest("Missing required parameter: 'image'.", param="image")
    if count > limit:
        raise InvalidRequest(f"Invalid 'image': the model '{model}' takes at most {limit} image(s), "
                             f"got {count}.", param="image")
    if len(masks) > 1 or (masks and mask_ref):
        raise InvalidRequest("Invalid 'mask': send one mask.", param="mask")

    parsed = parse_body(fields)
    table = gw.size_tables[model]
    reader = InputReader(gw.fetcher, gw.input_fetch_policy, max(table.pixel_limit, MIN_INPUT_PIXELS),
                         int(gw.config.server.max_body_mb * 1024 * 1024))
    param = "image" if len(uploads) == 1 or len(refs) == 1 else None
    jobs = [reader.from_upload(param or f"image[{i}]", u) for i, u in enumerate(uploads)]
    jobs += [reader.from_url(param or p, url) for p, url in refs]
    if masks:
        jobs.append(reader.from_upload("mask", masks[0]))
    elif mask_ref:
        jobs.append(reader.from_url(*mask_ref))
    checked = await asyncio.gather(*jobs)
    images, mask = (checked[:-1], checked[-1]) if (masks or mask_ref) else (checked, None)
    first = images[0]
    if mask is not None and (mask.width, mask.height) != (first.width, first.height):
        raise InvalidRequest(f"Invalid 'mask': it is {mask.width}x{mask.height}, the image is "
                             f"{first.width}x{first.height}; they must be the same size.", param="mask")
    # "auto" in any case, or an empty size, follows the first image (as resolve_size reads them for generations).
    size = None if parsed.size is None or parsed.size.strip().lower() in ("", "auto") else parsed.size
    aspect = parsed.aspect_ratio
    if size is None and aspect is None:
        aspect = f"{first.width}:{first.height}"  # the output follows the first image's shape
    width, height = resolve_size(table, size, aspect, parsed.resolution)
    check_work(table, width, height, parsed.n)
    req = replace(build_request(parsed, model, width, height), images=tuple(images), mask=mask)
    check_output_request(req)
    generations.check_choices(gw, req)
    return req


async def edits(gw: Gateway, request: web.Request) -> web.StreamResponse:
    with tracing.span("parse"):
        req = await parse_edit(gw, request)
    generations.traced(req)
    if BACKGROUND in request:
        if gw.policy.enabled:  # a background submit needs no concurrency slot
            await gw.policy.without_slot(request)
        return await jobs.submit(gw, request, req)
    if gw.policy.enabled:  # this call needs one
        gw.policy.needs_slot(request)
    if req.stream:
        return await stream.respond(gw, request, replace(req, response_format="b64_json"), "image_edit")
    return await generations.respond(gw, request, req)
