"""A fake fal.ai queue that speaks fal's documented wire format (fal-ai/qwen-image).

- POST /{owner}/{alias}[/{sub-path}]: `Authorization: Key <key>` (401 `{"detail": ...}` otherwise);
  answers `{request_id, status, queue_position, status_url, response_url, cancel_url}` where the URLs are
  on the fake itself, built as fal builds them (owner/alias only, without the sub-path), or on another
  host (knob `foreign_urls`).
- GET .../requests/{id}/status: one step of `statuses` per poll (IN_QUEUE with queue_position, then
  IN_PROGRESS...), then COMPLETED (with `error` and `error_type` when the request failed); `hang`
  keeps a request IN_PROGRESS for ever.
- GET .../requests/{id}: the output `{"images": [{url, content_type, file_name, file_size, width,
  height}], "seed", "timings", "has_nsfw_concepts", "prompt"}`, or the failed request's error with
  its status code; 400 "still in progress" before it completed. Images are real PNG/JPEG files of the
  requested image_size (or `fixed_size`), their colour from seed + i, served from GET /files/<name>;
  with sync_mode they come back as data URIs.
- PUT .../requests/{id}/cancel: 202 CANCELLATION_REQUESTED, or 400 ALREADY_COMPLETED.

Edit endpoints (an app id with "qwen-image-edit" in it): fal-ai/qwen-image-edit and
fal-ai/qwen-image-edit-lora need `image_url` (one URL or data URI), the others (-2511, -2509, -plus...)
`image_urls` (a non-empty list); a missing, malformed or undecodable image is a 422 naming the field.
Data URIs are decoded and kept (`Job.images`, `edit_images`); without image_size the output has the
first input's size. Edit ranges: num_inference_steps 2..50, guidance_scale 0..20, num_images 1..4.

Input is validated like fal's qwen-image (types, ranges, at most 3 LoRAs): a mistake is a 422 with
FastAPI's `{"detail": [{"loc": ["body", field], "msg", "type"}]}`, at submit (`validate_at="submit"`)
or, as the queue does it, when the request runs (COMPLETED with an error, the result answers the 422).
Every answer has x-fal-request-id. Every request is recorded. Knobs: fail_submit(...), fail_request(...),
statuses, hang, fixed_size, nsfw, revise_prompt, foreign_urls, validate_at, echo_key_in_errors.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict
from PIL import Image

from .fake_base import Received, ServedFake

MIME = {"png": "image/png", "jpeg": "image/jpeg"}
PRESETS = {"square_hd": (1024, 1024), "square": (512, 512), "portrait_4_3": (768, 1024),
           "portrait_16_9": (576, 1024), "landscape_4_3": (1024, 768), "landscape_16_9": (1024, 576)}
# The documented input fields of fal-ai/qwen-image.
INPUT_FIELDS = frozenset({
    "prompt", "image_size", "num_inference_steps", "seed", "guidance_scale", "num_images",
    "enable_safety_checker", "output_format", "negative_prompt", "acceleration", "loras", "sync_mode",
    "use_turbo",
})


SINGLE_IMAGE_APPS = ("fal-ai/qwen-image-edit", "fal-ai/qwen-image-edit-lora")


def is_edit_app(app: str) -> bool:
    return "qwen-image-edit" in app


def seed_colour(seed: int) -> tuple[int, int, int]:
    return tuple(hashlib.sha256(str(seed).encode()).digest()[:3])


def make_image(width: int, height: int, colour: tuple[int, int, int], fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format=fmt.upper(),
                                                   **({"quality": 95} if fmt == "jpeg" else {}))
    return out.getvalue()


@dataclass
class Job:
    id: str
    app: str
    input: dict
    polls: int = 0
    cancelled: bool = False
    # (status, payload) of a failed request's result; None when it succeeded.
    error: tuple[int, dict, dict] | None = None
    result: dict | None = None
    # An edit's input images: the bytes of each data URI (or the URL as text), and their sizes.
    images: list[bytes | str] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)


def _invalid(field_name: str, msg: str, type_: str) -> dict:
    return {"loc": ["body", field_name], "msg": msg, "type": type_}


def read_image(value: Any) -> tuple[bytes | str, tuple[int, int] | None] | None:
    """An image input: (the data URI's bytes, their size) or (an http(s) URL, None); None if unusable."""
    if not isinstance(value, str):
        return None
    if value.startswith(("http://", "https://")):
        return value, None
    header, sep, payload = value.partition(",")
    if not (sep and header.startswith("data:image/") and header.endswith(";base64")):
        return None
    try:
        data = base64.b64decode(payload, validate=True)
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return data, im.size
    except (ValueError, OSError):
        return None


def edit_images(app: str, body: dict) -> tuple[list[dict], list[tuple[bytes | str, tuple[int, int] | None]]]:
    """The 422 problems of an edit's image input, and the images read."""
    name = "image_url" if "/".join(app.split("/")[:2]) in SINGLE_IMAGE_APPS else "image_urls"
    if name not in body:
        return [_invalid(name, "Field required", "missing")], []
    values = [body[name]] if name == "image_url" else body[name]
    if name == "image_urls" and (not isinstance(values, list) or not values):
        return [_invalid(name, "Input should be a non-empty list of URLs", "list_type")], []
    images = []
    for i, value in enumerate(values):
        got = read_image(value)
        if got is None:
            loc = ["body", name] if name == "image_url" else ["body", name, i]
            return [{"loc": loc, "msg": "Could not load the image from the URL", "type": "image_load_error"}], []
        images.append(got)
    return [], images


def validate(body: Any, app: str = "fal-ai/qwen-image") -> list[dict]:
    """fal's 422 detail for an input the app would refuse (empty when it is fine)."""
    if not isinstance(body, dict):
        return [{"loc": ["body"], "msg": "Input should be a valid dictionary", "type": "dict_type"}]
    edit = is_edit_app(app)
    problems = edit_images(app, body)[0] if edit else []
    if not isinstance(body.get("prompt"), str):
        problems.append(_invalid("prompt", "Field required", "missing"))
    size = body.get("image_size", "square_hd" if edit else "landscape_4_3")
    if isinstance(size, dict):
        for side in ("width", "height"):
            v = size.get(side)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 14142:
                problems.append({"loc": ["body", "image_size", side], "msg": "Input should be between 1 and 14142",
                                 "type": "int_range"})
    elif size not in PRESETS:
        problems.append(_invalid("image_size", "Input should be a preset or {width, height}", "literal_error"))
    ranges = {"num_inference_steps": (2, 50, int) if edit else (2, 250, int), "num_images": (1, 4, int),
              "guidance_scale": (0, 20, float), "seed": (0, 2**63 - 1, int)}
    for name, (lo, hi, kind) in ranges.items():
        if name in body:
            v = body[name]
            if isinstance(v, bool) or not isinstance(v, int | float) or (kind is int and not isinstance(v, int)):
                problems.append(_invalid(name, f"Input should be a valid {kind.__name__}", f"{kind.__name__}_type"))
            elif not lo <= v <= hi:
                problems.append(_invalid(name, f"Input should be between {lo} and {hi}", "range"))
    if body.get("output_format", "png") not in ("jpeg", "png"):
        problems.append(_invalid("output_format", "Input should be 'jpeg' or 'png'", "literal_error"))
    if body.get("acceleration", "none") not in ("none", "regular", "high"):
        problems.append(_invalid("acceleration", "Input should be 'none', 'regular' or 'high'", "literal_error"))
    loras = body.get("loras", [])
    if not isinstance(loras, list) or len(loras) > 3 or not all(
            isinstance(x, dict) and isinstance(x.get("path"), str) for x in loras):
        problems.append(_invalid("loras", "At most 3 LoRAs of {path, scale}", "value_error"))
    return problems


@dataclass
class FakeFal(ServedFake):
    api_key: str = "fal-id-1234:fal-secret-5678"
    # What the status endpoint answers before COMPLETED, one per poll.
    statuses: tuple[str, ...] = ("IN_QUEUE", "IN_PROGRESS")
    # Never complete (for cancellation tests).
    hang: bool = False
    # Answer images of this size whatever was asked (a vendor with its own sizes: the proxy crops).
    fixed_size: tuple[int, int] | None = None
    # Flag every image NSFW and make it black, as fal's safety checker does.
    nsfw: bool = False
    # Answer this as the output's `prompt` (fal echoes the prompt it used).
    revise_prompt: str | None = None
    # Answer status/response/cancel URLs on another host (the provider must not follow them).
    foreign_urls: bool = False
    # Where input mistakes are reported: "run" (COMPLETED with an error; the result is the 422) or "submit".
    validate_at: str = "run"
    # Echo the Authorization header in the 401's detail (a careless vendor): it must not reach clients.
    echo_key_in_errors: bool = False

    requests: list[Received] = field(default_factory=list)
    jobs: dict[str, Job] = field(default_factory=dict)
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    _submit_failure: tuple[int, Any, dict, int | None] | None = None
    _request_failure: tuple[int, Any, dict, int | None] | None = None

    # ---- knobs ----------------------------------------------------------------------------------------

    def fail_submit(self, status: int, detail: Any, *, headers: dict | None = None, times: int | None = None):
        """Answer submits with this HTTP error `{"detail": detail}` (times: how many; None: all)."""
        self._submit_failure = (status, detail, headers or {}, times)

    def fail_request(self, status: int, detail: Any, *, error_type: str = "runner_server_error",
                     headers: dict | None = None, times: int | None = None):
        """Accept submits, then let the request fail when it runs: COMPLETED with `error`, and the result
        answers this HTTP error."""
        self._request_failure = (status, {"detail": detail, "error_type": error_type}, headers or {}, times)

    # ---- what tests read ------------------------------------------------------------------------------

    @property
    def submits(self) -> list[Received]:
        return [r for r in self.requests if r.method == "POST"]

    @property
    def inputs(self) -> list[dict]:
        return [r.json for r in self.submits]

    def calls(self, method: str, suffix: str = "") -> list[Received]:
        return [r for r in self.requests if r.method == method and r.path.endswith(suffix)]

    @property
    def edit_images(self) -> list[list[bytes | str]]:
        """Each accepted edit submit's input images, in submit order (data URIs decoded to bytes)."""
        return [job.images for job in self.jobs.values() if job.images]

    @property
    def status_calls(self) -> list[Received]:
        return self.calls("GET", "/status")

    @property
    def cancel_calls(self) -> list[Received]:
        return self.calls("PUT", "/cancel")

    @property
    def result_calls(self) -> list[Received]:
        return [r for r in self.calls("GET") if "/requests/" in r.path and not r.path.endswith("/status")]

    # ---- the app --------------------------------------------------------------------------------------

    def reply(self, payload: Any, status: int = 200, headers: dict | None = None) -> web.Response:
        return web.json_response(payload, status=status,
                                 headers={"x-fal-request-id": uuid.uuid4().hex, **(headers or {})})

    async def dispatch(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        self.requests.append(Received(request.method, request.path, CIMultiDict(request.headers), parsed))
        path = request.path
        if path.startswith("/files/") and request.method == "GET":
            found = self.files.get(path[len("/files/"):])
            if found is None:
                return self.reply({"detail": "Not Found"}, 404)
            return web.Response(body=found[0], content_type=found[1])
        if request.headers.get("Authorization") != f"Key {self.api_key}":
            sent = request.headers.get("Authorization", "") if self.echo_key_in_errors else ""
            return self.reply({"detail": f"Invalid Key authorization header {sent}".strip()}, 401)
        parts = [p for p in path.split("/") if p]
        if "requests" in parts:
            i = parts.index("requests")
            app, rest = "/".join(parts[:i]), parts[i + 1:]
            job = self.jobs.get(rest[0]) if rest else None
            if job is None or job.app != app:
                return self.reply({"detail": "Request not found"}, 404)
            if rest[1:] == ["status"] and request.method == "GET":
                return self.status(job, request)
            if rest[1:] == ["cancel"] and request.method == "PUT":
                return self.cancel(job)
            if rest[1:] == [] and request.method == "GET":
                return await self.result(job, request)
            return self.reply({"detail": "Method Not Allowed"}, 405)
        if request.method == "POST" and len(parts) >= 2:
            return self.submit(request, parts, parsed)
        return self.reply({"detail": "Not Found"}, 404)

    def submit(self, request: web.Request, parts: list[str], body: Any) -> web.Response:
        if self._submit_failure is not None:
            status, detail, headers, times = self._submit_failure
            if times is None or times > 0:
                if times is not None:
                    self._submit_failure = (status, detail, headers, times - 1)
                return self.reply({"detail": detail}, status, headers)
        app = "/".join(parts)
        if self.validate_at == "submit" and (problems := validate(body, app)):
            return self.reply({"detail": problems}, 422)
        job = Job(uuid.uuid4().hex, "/".join(parts[:2]), body if isinstance(body, dict) else {})
        if is_edit_app(app) and isinstance(body, dict):
            read = edit_images(app, body)[1]
            job.images = [data for data, _ in read]
            job.image_sizes = [wh for _, wh in read if wh is not None]
        if self._request_failure is not None:
            status, payload, headers, times = self._request_failure
            if times is None or times > 0:
                if times is not None:
                    self._request_failure = (status, payload, headers, times - 1)
                job.error = (status, payload, headers)
        if job.error is None and (problems := validate(body, app)):
            job.error = (422, {"detail": problems}, {})
        self.jobs[job.id] = job
        base = "http://fal-elsewhere.invalid" if self.foreign_urls else str(request.url.origin())
        urls = f"{base}/{job.app}/requests/{job.id}"
        return self.reply({"status": "IN_QUEUE", "request_id": job.id, "queue_position": 0,
                           "response_url": urls, "status_url": f"{urls}/status", "cancel_url": f"{urls}/cancel"})

    def status(self, job: Job, request: web.Request) -> web.Response:
        job.polls += 1
        urls = f"{request.url.origin()}/{job.app}/requests/{job.id}"
        common = {"request_id": job.id, "response_url": urls, "logs": None}
        if job.cancelled:
            return self.reply({**common, "status": "COMPLETED", "error": "Request was cancelled",
                               "error_type": "client_cancelled"})
        if self.hang or job.polls <= len(self.statuses):
            state = "IN_PROGRESS" if self.hang else self.statuses[job.polls - 1]
            extra = {"queue_position": 0} if state == "IN_QUEUE" else {}
            return self.reply({**common, "status": state, **extra})
        if job.error is not None:
            status, payload, _ = job.error
            message = payload["detail"] if isinstance(payload["detail"], str) else "Unprocessable Entity"
            return self.reply({**common, "status": "COMPLETED", "error": message,
                               "error_type": payload.get("error_type", "validation_error")})
        return self.reply({**common, "status": "COMPLETED", "metrics": {"inference_time": 0.01}})

    def cancel(self, job: Job) -> web.Response:
        if not self.hang and job.polls > len(self.statuses):
            return self.reply({"status": "ALREADY_COMPLETED"}, 400)
        job.cancelled = True
        self.cancelled.set()
        return self.reply({"status": "CANCELLATION_REQUESTED"}, 202)

    async def result(self, job: Job, request: web.Request) -> web.Response:
        if self.hang or job.polls <= len(self.statuses) or job.cancelled:
            return self.reply({"detail": "Request is still in progress"}, 400)
        if job.error is not None:
            status, payload, headers = job.error
            return self.reply(payload, status, headers)
        if job.result is None:
            job.result = await asyncio.to_thread(self.make_output, job.input, str(request.url.origin()),
                                                 job.image_sizes[0] if job.image_sizes else None)
        return self.reply(job.result)

    def make_output(self, body: dict, base: str, input_size: tuple[int, int] | None = None) -> dict:
        # An edit without image_size follows its (first) input image.
        size = body.get("image_size", input_size or "landscape_4_3")
        if isinstance(size, tuple):
            size = {"width": size[0], "height": size[1]}
        width, height = self.fixed_size or ((size["width"], size["height"]) if isinstance(size, dict)
                                            else PRESETS[size])
        n = body.get("num_images", 1)
        seed = body.get("seed")
        if seed is None:
            seed = random.randrange(2**31)
        fmt = body.get("output_format", "png")
        images = []
        for i in range(n):
            colour = (0, 0, 0) if self.nsfw else seed_colour(seed + i)
            data = make_image(width, height, colour, fmt)
            name = f"{uuid.uuid4().hex}.{fmt}"
            if body.get("sync_mode"):
                url = f"data:{MIME[fmt]};base64,{base64.b64encode(data).decode()}"
            else:
                self.files[name] = (data, MIME[fmt])
                url = f"{base}/files/{name}"
            images.append({"url": url, "content_type": MIME[fmt], "file_name": name, "file_size": len(data),
                           "width": width, "height": height})
        return {"images": images, "seed": seed, "timings": {"inference": 0.01},
                "has_nsfw_concepts": [self.nsfw] * n, "prompt": self.revise_prompt or body["prompt"]}
