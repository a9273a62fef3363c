"""A fake Replicate HTTP API for the replicate provider's tests, speaking its documented wire format.

- POST /v1/models/{owner}/{name}/predictions (official models) and POST /v1/predictions (a `version`):
  `Authorization: Bearer <token>` (401 problem JSON otherwise), body `{"input": {...}}` checked against
  qwen/qwen-image's input schema (422 problem JSON with `invalid_fields`; unlike the real service,
  unknown input fields are refused too, so a leaked field fails a test), 201 with the prediction.
  `Prefer: wait` / `Prefer: wait=N` holds the answer: a prediction set to finish at once answers
  `succeeded`, else it answers `starting` after holding up to `hold` seconds.
- GET /v1/predictions/{id}: the prediction; `polls_before_done` GETs answer `processing`, the next one
  the outcome (`succeeded` with `output` as an array of URLs, or `failed` with `error`); None: it runs
  until cancelled. `logs` say "Using seed: N" (N random when the input has none).
- POST /v1/predictions/{id}/cancel: a running prediction becomes `canceled`.
- Edit models: qwen/qwen-image-edit-plus (`image`: a list of URIs) and qwen/qwen-image-edit (`image`: one
  URI), with their own schema (prompt, image, aspect_ratio incl. match_input_image, go_fast, seed,
  output_format, output_quality, disable_safety_checker). Data URIs are decoded and kept
  (`Prediction.images`, `edit_images`); one that does not decode is a 422 naming input.image. With
  match_input_image the output has the first input's size.
- GET /files/<name>: the images (real PNG / JPEG / WebP of the vendor's fixed size for the aspect ratio,
  coloured by the seed), without auth, as Replicate's file CDN serves them.
- Errors are RFC 7807 problem JSON `{type, title, status, detail, instance}`; 429 carries Retry-After.

Knobs: polls_before_done, hold, outcome, error, log_seed, output_as_string, foreign_urls, sizes,
fail_create(...), fail_poll(...). Every request is recorded (`requests`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict
from PIL import Image

from .fake_base import Received, ServedFake
from .fake_openai_upstream import seed_colour

ASPECT_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3")
# The vendor's own pixels per ratio: small, and never one of SMALL_SIZES, so the proxy must crop/resize.
RATIO_SIZES = {"1:1": (72, 72), "16:9": (128, 72), "9:16": (72, 128), "4:3": (96, 72), "3:4": (72, 96),
               "3:2": (108, 72), "2:3": (72, 108)}
PIL_FORMAT = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}
MIME = {"webp": "image/webp", "jpg": "image/jpeg", "png": "image/png"}


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# qwen/qwen-image's input schema: name -> (check, description of what is allowed).
INPUT_SCHEMA: dict[str, tuple[Any, str]] = {
    "prompt": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "aspect_ratio": (lambda v: v in ASPECT_RATIOS, f"one of {', '.join(ASPECT_RATIOS)}"),
    "image_size": (lambda v: v in ("optimize_for_quality", "optimize_for_speed"),
                   "one of optimize_for_quality, optimize_for_speed"),
    "go_fast": (lambda v: isinstance(v, bool), "a boolean"),
    "num_inference_steps": (lambda v: _is_int(v) and 1 <= v <= 50, "an integer from 1 to 50"),
    "guidance": (lambda v: _is_number(v) and 0 <= v <= 10, "a number from 0 to 10"),
    "seed": (_is_int, "an integer"),
    "output_format": (lambda v: v in ("webp", "jpg", "png"), "one of webp, jpg, png"),
    "output_quality": (lambda v: _is_int(v) and 0 <= v <= 100, "an integer from 0 to 100"),
    "negative_prompt": (lambda v: isinstance(v, str), "a string"),
    "enhance_prompt": (lambda v: isinstance(v, bool), "a boolean"),
    "lora_weights": (lambda v: isinstance(v, str), "a string"),
    "lora_scale": (_is_number, "a number"),
    "extra_lora_weights": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "extra_lora_scale": (lambda v: isinstance(v, list) and all(_is_number(x) for x in v), "a list of numbers"),
    "disable_safety_checker": (lambda v: isinstance(v, bool), "a boolean"),
    "replicate_weights": (lambda v: isinstance(v, str), "a string"),
    "image": (lambda v: isinstance(v, str), "a URI"),
    "strength": (lambda v: _is_number(v) and 0 <= v <= 1, "a number from 0 to 1"),
}

def _is_uri(v: Any) -> bool:
    return isinstance(v, str) and (v.startswith(("http://", "https://")) or v.startswith("data:"))


def _common_edit(image_check: tuple[Any, str]) -> dict[str, tuple[Any, str]]:
    ratios = (MATCH_INPUT, *ASPECT_RATIOS)
    return {
        "prompt": INPUT_SCHEMA["prompt"],
        "image": image_check,
        "aspect_ratio": (lambda v: v in ratios, f"one of {', '.join(ratios)}"),
        "go_fast": INPUT_SCHEMA["go_fast"],
        "seed": INPUT_SCHEMA["seed"],
        "output_format": INPUT_SCHEMA["output_format"],
        "output_quality": INPUT_SCHEMA["output_quality"],
        "disable_safety_checker": INPUT_SCHEMA["disable_safety_checker"],
    }


MATCH_INPUT = "match_input_image"
# Each model's input schema.
SCHEMAS: dict[str, dict[str, tuple[Any, str]]] = {
    "qwen/qwen-image": INPUT_SCHEMA,
    "someone/qwen-image-lora": INPUT_SCHEMA,
    "qwen/qwen-image-edit-plus": _common_edit(
        (lambda v: isinstance(v, list) and len(v) > 0 and all(_is_uri(x) for x in v), "a non-empty list of URIs")),
    "qwen/qwen-image-edit": _common_edit((_is_uri, "a URI")),
}
EDIT_MODELS = ("qwen/qwen-image-edit-plus", "qwen/qwen-image-edit")


def read_data_uri(value: str) -> tuple[bytes, tuple[int, int]] | None:
    """A data URI's bytes and the image's size; None when it is not a decodable image."""
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


_CREATE = re.compile(r"/v1/models/([^/]+)/([^/]+)/predictions")
_PREDICTION = re.compile(r"/v1/predictions/([^/]+)")
_CANCEL = re.compile(r"/v1/predictions/([^/]+)/cancel")


@dataclass
class Failure:
    status: int
    body: dict
    headers: dict[str, str] = field(default_factory=dict)
    times: int | None = None  # None: every call


@dataclass
class Prediction:
    id: str
    model: str
    version: str
    input: dict
    status: str = "starting"
    output: Any = None
    error: str | None = None
    logs: str = ""
    polls_left: int | None = 0
    steps_done: int = 0
    created_at: str = ""
    started_at: str | None = None
    completed_at: str | None = None
    # An edit's input images (data URIs decoded; URLs kept as text) and the first one's size.
    images: list[bytes | str] = field(default_factory=list)
    input_size: tuple[int, int] | None = None


def problem(status: int, title: str, detail: str, headers: dict | None = None, **extra) -> web.Response:
    body = {"type": f"https://replicate.com/docs/reference/http#{status}", "title": title, "status": status,
            "detail": detail, "instance": f"/v1/errors/{uuid.uuid4().hex[:8]}", **extra}
    return web.Response(text=json.dumps(body), status=status, content_type="application/problem+json",
                        headers=headers)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


@dataclass
class FakeReplicate(ServedFake):
    api_key: str = "r8_fake_token_0123456789abcdef"
    models: tuple[str, ...] = ("qwen/qwen-image", *EDIT_MODELS)
    # version id -> owner/name, for POST /v1/predictions {"version": ...}.
    versions: dict[str, str] = field(default_factory=lambda: {"5a6b7c8d9e": "someone/qwen-image-lora"})
    # GETs that still answer `processing` before the outcome; None: runs until cancelled.
    polls_before_done: int | None = 0
    # Seconds a Prefer: wait create call holds an unfinished prediction (at most the asked wait).
    hold: float = 0.0
    outcome: str = "succeeded"
    error: str = "CUDA out of memory"
    log_seed: bool = True
    # Denoising steps a prediction's logs count with a tqdm bar, one more each poll (None: no bar).
    progress_steps: int | None = None
    output_as_string: bool = False
    # urls.get / urls.cancel on another origin (the provider must not send its token there).
    foreign_urls: bool = False
    sizes: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(RATIO_SIZES))

    requests: list[Received] = field(default_factory=list)
    predictions: dict[str, Prediction] = field(default_factory=dict)
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    create_failures: list[Failure] = field(default_factory=list)
    poll_failures: list[Failure] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    polled: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    # ---- set-up -----------------------------------------------------------------------------------

    def fail_create(self, status: int, detail: str, *, title: str = "Error", headers: dict | None = None,
                    times: int | None = None, **extra) -> None:
        body = {"title": title, "detail": detail, **extra}
        self.create_failures.append(Failure(status, body, dict(headers or {}), times))

    def fail_poll(self, status: int, detail: str, *, times: int | None = 1) -> None:
        self.poll_failures.append(Failure(status, {"title": "Error", "detail": detail}, {}, times))

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    # ---- what tests read --------------------------------------------------------------------------

    @property
    def creates(self) -> list[Received]:
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/predictions")]

    @property
    def inputs(self) -> list[dict]:
        return [r.json.get("input") for r in self.creates if isinstance(r.json, dict)]

    @property
    def edit_images(self) -> list[list[bytes | str]]:
        """Each accepted edit's input images, in order of creation."""
        return [p.images for p in self.predictions.values() if p.model in EDIT_MODELS]

    @property
    def polls(self) -> list[Received]:
        return [r for r in self.requests if r.method == "GET" and r.path.startswith("/v1/predictions/")]

    @property
    def cancels(self) -> list[Received]:
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/cancel")]

    # ---- the app ----------------------------------------------------------------------------------

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.requests.append(Received(request.method, request.path, CIMultiDict(request.headers), body))
        path, method = request.path, request.method
        if method == "GET" and path.startswith("/files/"):
            found = self.files.get(path[len("/files/"):])
            if found is None:
                return problem(404, "Not found", "The requested resource could not be found.")
            return web.Response(body=found[0], content_type=found[1])
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return problem(401, "Unauthenticated", "You did not pass a valid authentication token")
        if method == "POST" and (m := _CREATE.fullmatch(path)):
            return await self.create(request, body, f"{m.group(1)}/{m.group(2)}", None)
        if method == "POST" and path == "/v1/predictions":
            version = body.get("version") if isinstance(body, dict) else None
            if version not in self.versions:
                return problem(422, "Invalid version or not permitted",
                               "The specified version does not exist (or perhaps you don't have permission to use it?)")
            return await self.create(request, body, self.versions[version], version)
        if method == "POST" and (m := _CANCEL.fullmatch(path)):
            return self.cancel(m.group(1))
        if method == "GET" and (m := _PREDICTION.fullmatch(path)):
            return self.get(request, m.group(1))
        return problem(404, "Not found", "The requested resource could not be found.")

    @staticmethod
    def _take(failures: list[Failure]) -> Failure | None:
        for f in failures:
            if f.times is None or f.times > 0:
                if f.times is not None:
                    f.times -= 1
                return f
        return None

    async def create(self, request: web.Request, body: Any, model: str, version: str | None) -> web.Response:
        failure = self._take(self.create_failures)
        if failure is not None:
            return problem(failure.status, headers=failure.headers, **failure.body)
        if version is None and model not in self.models:
            return problem(404, "Not found", "The requested resource could not be found.")
        if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
            return problem(422, "Input validation failed", "- input: input is required",
                           invalid_fields=[{"type": "required", "field": "input", "description": "input is required"}])
        invalid = self.validate(body["input"], model)
        images: list[bytes | str] = []
        input_size = None
        if not invalid and model in EDIT_MODELS:
            given = body["input"]["image"]
            for value in given if isinstance(given, list) else [given]:
                if value.startswith("data:"):
                    read = read_data_uri(value)
                    if read is None:
                        invalid = [{"type": "invalid", "field": "input.image",
                                    "description": "image: could not read the file from the data URI"}]
                        break
                    images.append(read[0])
                    input_size = input_size or read[1]
                else:
                    images.append(value)
        if invalid:
            detail = "\n".join(f"- {f['field']}: {f['description']}" for f in invalid)
            return problem(422, "Input validation failed", detail, invalid_fields=invalid)

        p = Prediction(id=uuid.uuid4().hex[:20], model=model, version=version or "hidden", input=body["input"],
                       polls_left=self.polls_before_done, created_at=_now(), images=images, input_size=input_size)
        self.predictions[p.id] = p
        wait = self.prefer_wait(request.headers.get("Prefer"))
        if wait is not None:
            if p.polls_left == 0:
                await self.finish(p)
            else:
                await asyncio.sleep(min(self.hold, wait))
        return web.json_response(self.view(request, p), status=201)

    @staticmethod
    def prefer_wait(header: str | None) -> float | None:
        if not header:
            return None
        m = re.fullmatch(r"\s*wait(?:\s*=\s*(\d+))?\s*", header)
        if not m:
            return None
        return float(m.group(1)) if m.group(1) else 60.0

    @staticmethod
    def validate(inp: dict, model: str = "qwen/qwen-image") -> list[dict]:
        schema = SCHEMAS.get(model, INPUT_SCHEMA)
        invalid = []
        required = ("prompt", "image") if model in EDIT_MODELS else ("prompt",)
        for name in required:
            if name not in inp:
                invalid.append({"type": "required", "field": f"input.{name}", "description": f"{name} is required"})
        for name, value in inp.items():
            rule = schema.get(name)
            if rule is None:
                invalid.append({"type": "additional_property_not_allowed", "field": f"input.{name}",
                                "description": f"Additional property {name} is not allowed"})
            elif not rule[0](value):
                invalid.append({"type": "invalid", "field": f"input.{name}",
                                "description": f"{name} must be {rule[1]}"})
        return invalid

    def get(self, request: web.Request, pid: str) -> web.Response:
        self.polled.set()
        failure = self._take(self.poll_failures)
        if failure is not None:
            return problem(failure.status, headers=failure.headers, **failure.body)
        p = self.predictions.get(pid)
        if p is None:
            return problem(404, "Not found", "The requested resource could not be found.")
        if p.status in ("starting", "processing"):
            if p.polls_left is None or p.polls_left > 0:
                if p.polls_left is not None:
                    p.polls_left -= 1
                p.status = "processing"
                p.started_at = p.started_at or _now()
                p.logs += "processing...\n"
                if self.progress_steps:  # a cog model's diffusers pipeline: tqdm's bar, redrawn with \r
                    p.steps_done = min(p.steps_done + 1, self.progress_steps)
                    part = p.steps_done / self.progress_steps
                    p.logs += (f"{int(part * 100):3d}%|{'#' * int(part * 10):<10}| {p.steps_done}/"
                               f"{self.progress_steps} [00:01<00:02,  4.95it/s]\r")
            else:
                return self._finished_view(request, p)
        return web.json_response(self.view(request, p))

    def _finished_view(self, request: web.Request, p: Prediction) -> web.Response:
        # Encoding is quick at these sizes: done inline so the answer shows the end state.
        self._finish_sync(p)
        return web.json_response(self.view(request, p))

    def cancel(self, pid: str) -> web.Response:
        p = self.predictions.get(pid)
        if p is None:
            return problem(404, "Not found", "The requested resource could not be found.")
        if p.status in ("starting", "processing"):
            p.status = "canceled"
            p.completed_at = _now()
        self.cancelled.set()
        return web.json_response({"id": p.id, "status": p.status})

    async def finish(self, p: Prediction) -> None:
        await asyncio.to_thread(self._finish_sync, p)

    def _finish_sync(self, p: Prediction) -> None:
        seed = p.input.get("seed")
        if seed is None:
            seed = random.randrange(2**31)
        if self.log_seed:
            p.logs += f"Using seed: {seed}\n"
        p.started_at = p.started_at or _now()
        p.completed_at = _now()
        if self.outcome != "succeeded":
            p.status, p.error = self.outcome, (self.error if self.outcome == "failed" else None)
            p.logs += f"Traceback (most recent call last):\n  ...\nRuntimeError: {self.error}\n"
            return
        fmt = p.input.get("output_format", "webp")
        ratio = p.input.get("aspect_ratio", MATCH_INPUT if p.model in EDIT_MODELS else "16:9")
        if ratio == MATCH_INPUT:
            width, height = p.input_size or self.sizes["1:1"]
        else:
            width, height = self.sizes[ratio]
        im = Image.new("RGB", (width, height), seed_colour(seed))
        out = io.BytesIO()
        kwargs = {"quality": p.input.get("output_quality", 80)} if fmt in ("jpg", "webp") else {}
        im.save(out, format=PIL_FORMAT[fmt], **kwargs)
        name = f"{uuid.uuid4().hex}.{fmt}"
        self.files[name] = (out.getvalue(), MIME[fmt])
        p.status = "succeeded"
        p.logs += "100%|##########| 30/30\n"
        p.output = f"{self.url}/files/{name}" if self.output_as_string else [f"{self.url}/files/{name}"]

    def view(self, request: web.Request, p: Prediction) -> dict:
        base = "https://api.replicate.example" if self.foreign_urls else str(request.url.origin())
        return {
            "id": p.id, "model": p.model, "version": p.version, "input": p.input, "output": p.output,
            "error": p.error, "logs": p.logs, "status": p.status, "data_removed": False,
            "created_at": p.created_at, "started_at": p.started_at, "completed_at": p.completed_at,
            "metrics": {"predict_time": 0.01} if p.completed_at else {},
            "urls": {"get": f"{base}/v1/predictions/{p.id}", "cancel": f"{base}/v1/predictions/{p.id}/cancel",
                     "web": f"https://replicate.com/p/{p.id}"},
        }
