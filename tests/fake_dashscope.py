"""A fake Alibaba Model Studio / DashScope that speaks its documented wire format (qwen-image family).

- POST /api/v1/services/aigc/text2image/image-synthesis (async): needs `X-DashScope-Async: enable`
  (without it: 403 AccessDenied "current user api does not support synchronous calls", as the real API
  answers); body {model, input{prompt, negative_prompt?}, parameters{size "W*H", n, seed,
  negative_prompt, prompt_extend, watermark}} -> {"output": {"task_status": "PENDING", "task_id"}, "request_id"}.
- GET /api/v1/tasks/{task_id}: PENDING for `pending_polls` polls, RUNNING for `running_polls`, then
  SUCCEEDED with output.results[{orig_prompt, actual_prompt, url}] (or FAILED with output.code/message,
  CANCELED, ...); an unknown task id is UNKNOWN, as DashScope answers for expired tasks.
- POST /api/v1/tasks/{task_id}/cancel: cancels a PENDING task; any other: 400 UnsupportedOperation.
- POST /api/v1/services/aigc/multimodal-generation/generation (sync): input.messages[0].content
  [{"text": prompt}] -> output.choices[0].message.content[{"image": url}], usage{width, height, image_count}.
- Edits, on the sync endpoint with an edit model (qwen-image-edit: 1 image, n = 1; -plus / -max: 1 to 3
  images, n 1..6, optional size "W*H" 512..2048 a side): content [{"image": URL or data URI}, ...,
  {"text": prompt}] (exactly one text). Data URIs are decoded and kept (`edit_images`); one that does not
  decode, a wrong count or a text-to-image model given images is 400 InvalidParameter. Without size the
  output has the last image's aspect ratio at about `edit_pixels` pixels (the vendor: about 1024*1024).
- Result images: real PNGs of the requested "W*H" (the vendor's fixed sizes) whose colour comes from the
  seed (seed + i for image i), served by the fake itself under /oss/... with OSS-like signed query strings.
- Auth: `Authorization: Bearer <key>`, else 401 InvalidApiKey. Errors are {"code", "message", "request_id"}.
- Checks like the real service: known model, size in `allowed_sizes`, prompt <= 800 and negative_prompt
  <= 500 characters, n <= max_n, seed in 0..2147483647, booleans where booleans belong.

Knobs: fail_call(...) (the submit or the sync call answers an error, optionally as HTTP 200),
fail_task(...) (tasks end FAILED / CANCELED / UNKNOWN with a code), fail_poll(...), hold (tasks stay
PENDING until cancelled), pending_polls / running_polls. Every request is recorded.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict
from PIL import Image

from .fake_base import Received, ServedFake
from .fake_openai_upstream import make_image

PREFIX = "/api/v1"
SYNC_PATH = f"{PREFIX}/services/aigc/multimodal-generation/generation"
ASYNC_PATH = f"{PREFIX}/services/aigc/text2image/image-synthesis"
VENDOR_SIZES = ("1664*928", "1328*1328", "928*1664", "1472*1140", "1140*1472", "1472*1104", "1104*1472")
ASYNC_MODELS = ("qwen-image", "qwen-image-plus")
SYNC_MODELS = ("qwen-image", "qwen-image-plus", "qwen-image-max")
# Edit model -> (most input images, most n, whether it takes parameters.size).
EDIT_MODELS = {"qwen-image-edit": (1, 1, False), "qwen-image-edit-plus": (3, 6, True),
               "qwen-image-edit-max": (3, 6, True)}


def read_image(value: str) -> tuple[bytes, tuple[int, int]] | None:
    """A data URI's bytes and image size; None when it does not decode."""
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


@dataclass
class Failure:
    status: int
    code: str
    message: str
    times: int | None = None  # None: every time
    retry_after: str | None = None

    def take(self) -> bool:
        if self.times is None:
            return True
        if self.times > 0:
            self.times -= 1
            return True
        return False


@dataclass
class Task:
    task_id: str
    body: dict
    status: str = "PENDING"
    polls: int = 0
    output_code: str | None = None
    output_message: str | None = None
    results: list[dict] = field(default_factory=list)


@dataclass
class FakeDashScope(ServedFake):
    api_key: str = "ds-key"
    allowed_sizes: tuple[str, ...] = VENDOR_SIZES
    max_n: int = 1
    pending_polls: int = 1
    running_polls: int = 1
    # Tasks stay PENDING until cancelled.
    hold: bool = False
    # False: result URLs point at files the fake does not have (an expired OSS link: 404).
    serve_files: bool = True

    # Pixels of an edit's output without size (the vendor makes about 1024*1024).
    edit_pixels: int = 64 * 64

    requests: list[Received] = field(default_factory=list)
    # Each edit call's input images (data URIs decoded; URLs kept as text), in order.
    edit_images: list[list[bytes | str]] = field(default_factory=list)
    tasks: dict[str, Task] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    call_failure: Failure | None = None
    task_failure: Failure | None = None
    final_status: str = "FAILED"  # how a task_failure ends: FAILED, CANCELED, UNKNOWN
    poll_failure: Failure | None = None
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    # ---- set-up -----------------------------------------------------------------------------------

    def fail_call(self, status: int, code: str, message: str, *, times: int | None = None,
                  retry_after: str | None = None) -> None:
        """The async submit or the sync call answers {"code","message"} with this HTTP status (200 too)."""
        self.call_failure = Failure(status, code, message, times, retry_after)

    def fail_task(self, code: str, message: str, *, final_status: str = "FAILED", times: int | None = None) -> None:
        self.task_failure = Failure(0, code, message, times)
        self.final_status = final_status

    def fail_poll(self, status: int, code: str, message: str, *, times: int | None = None) -> None:
        self.poll_failure = Failure(status, code, message, times)

    @property
    def base_url(self) -> str:
        return f"{self.url}{PREFIX}"

    # ---- what tests read --------------------------------------------------------------------------

    def calls(self, method: str, path_start: str) -> list[Received]:
        return [r for r in self.requests if r.method == method and r.path.startswith(path_start)]

    @property
    def submits(self) -> list[Received]:
        return self.calls("POST", ASYNC_PATH)

    @property
    def sync_calls(self) -> list[Received]:
        return self.calls("POST", SYNC_PATH)

    @property
    def polls(self) -> list[Received]:
        return self.calls("GET", f"{PREFIX}/tasks/")

    @property
    def cancels(self) -> list[Received]:
        return [r for r in self.calls("POST", f"{PREFIX}/tasks/") if r.path.endswith("/cancel")]

    @property
    def downloads(self) -> list[Received]:
        return self.calls("GET", "/oss/")

    # ---- the app ----------------------------------------------------------------------------------

    @staticmethod
    def error(status: int, code: str, message: str, headers: dict | None = None) -> web.Response:
        return web.json_response({"code": code, "message": message, "request_id": str(uuid.uuid4())},
                                 status=status, headers=headers)

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.requests.append(Received(request.method, request.path, CIMultiDict(request.headers), body))
        path, method = request.path, request.method
        if path.startswith("/oss/") and method == "GET":
            data = self.files.get(path[len("/oss/"):])
            if data is None:
                return web.Response(status=404, text="<Error><Code>NoSuchKey</Code></Error>",
                                    content_type="application/xml")
            return web.Response(body=data, content_type="image/png")
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self.error(401, "InvalidApiKey", "Invalid API-key provided.")
        asynchronous = request.headers.get("X-DashScope-Async", "").lower() == "enable"
        if path == ASYNC_PATH and method == "POST":
            if not asynchronous:
                return self.error(403, "AccessDenied", "current user api does not support synchronous calls")
            return await self.submit(request, body)
        if path == SYNC_PATH and method == "POST":
            if asynchronous:
                return self.error(403, "AccessDenied", "current user api does not support asynchronous calls")
            return await self.sync(request, body)
        if path.startswith(f"{PREFIX}/tasks/"):
            rest = path[len(f"{PREFIX}/tasks/"):]
            if method == "GET" and "/" not in rest:
                return await self.poll(request, rest)
            if method == "POST" and rest.endswith("/cancel"):
                return self.cancel(rest[: -len("/cancel")])
        return self.error(404, "NotFound", f"{method} {path} is not a DashScope API")

    def _failed_call(self) -> web.Response | None:
        f = self.call_failure
        if f is not None and f.take():
            return self.error(f.status, f.code, f.message,
                              {"Retry-After": f.retry_after} if f.retry_after is not None else None)
        return None

    def _check_edit(self, body: dict, content: list) -> tuple[web.Response | None, list, tuple[int, int] | None]:
        """An edit's checks: (an InvalidParameter answer or None, the images read, the output size)."""
        model = body.get("model")
        parts = [c for c in content if isinstance(c, dict) and "image" in c]
        texts = [c for c in content if isinstance(c, dict) and "text" in c]
        if model not in EDIT_MODELS:
            if parts:
                return self.error(400, "InvalidParameter", f"Model {model} does not support image input."), [], None
            return None, [], None
        most_images, most_n, takes_size = EDIT_MODELS[model]
        if len(texts) != 1:
            return self.error(400, "InvalidParameter", "The content must have exactly one text."), [], None
        if not 1 <= len(parts) <= most_images:
            return self.error(400, "InvalidParameter",
                              f"The number of input images should be in [1, {most_images}]."), [], None
        images, sizes = [], []
        for part in parts:
            value = part["image"]
            if isinstance(value, str) and value.startswith(("http://", "https://")):
                images.append(value)
                sizes.append((1024, 1024))
                continue
            read = read_image(value) if isinstance(value, str) else None
            if read is None:
                return self.error(400, "InvalidParameter", "The image is not a valid URL or base64 data."), [], None
            images.append(read[0])
            sizes.append(read[1])
        params = body.get("parameters") or {}
        n = params.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= most_n:
            return self.error(400, "InvalidParameter", f"n should be in [1, {most_n}]"), [], None
        size = params.get("size")
        if size is not None and takes_size:
            try:
                w, h = (int(v) for v in size.split("*"))
            except (AttributeError, ValueError):
                w = h = 0
            if not (512 <= w <= 2048 and 512 <= h <= 2048):
                return self.error(400, "InvalidParameter", "size should be width*height in [512, 2048]."), [], None
            return None, images, (w, h)
        # The last image's aspect ratio at about edit_pixels.
        lw, lh = sizes[-1]
        w = max(1, round(math.sqrt(self.edit_pixels * lw / lh)))
        return None, images, (w, max(1, round(self.edit_pixels / w)))

    def _check(self, body: Any, prompt: Any, models: tuple[str, ...]) -> web.Response | None:
        """The real service's checks on a request body: an InvalidParameter answer, or None."""
        if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
            return self.error(400, "InvalidParameter", "input is required")
        if body.get("model") not in models:
            return self.error(400, "InvalidParameter", "Model not exist.")
        if not isinstance(prompt, str) or not 1 <= len(prompt) <= 800:
            return self.error(400, "InvalidParameter", "Range of input length should be [1, 800]")
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            return self.error(400, "InvalidParameter", "parameters must be an object")
        negative = params.get("negative_prompt", body["input"].get("negative_prompt"))
        if negative is not None and (not isinstance(negative, str) or len(negative) > 500):
            return self.error(400, "InvalidParameter", "Range of negative_prompt length should be [0, 500]")
        if body.get("model") not in EDIT_MODELS and params.get("size", "1328*1328") not in self.allowed_sizes:
            return self.error(400, "InvalidParameter", "The size is not match the allowed size "
                                                       f"{list(self.allowed_sizes)}")
        n = params.get("n", 1)
        if body.get("model") in EDIT_MODELS:
            pass  # checked by _check_edit
        elif not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.max_n:
            return self.error(400, "InvalidParameter", f"n should be in [1, {self.max_n}]")
        seed = params.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= 2**31 - 1):
            return self.error(400, "InvalidParameter", "seed should be in [0, 2147483647]")
        for key in ("prompt_extend", "watermark"):
            if key in params and not isinstance(params[key], bool):
                return self.error(400, "InvalidParameter", f"{key} should be a boolean")
        return None

    def _images(self, request: web.Request, body: dict, prompt: str,
                size: tuple[int, int] | None = None) -> list[tuple[str, str]]:
        """(url, actual_prompt) per image; the PNG files are stored for /oss/ downloads."""
        params = body.get("parameters") or {}
        width, height = size or (int(v) for v in params.get("size", "1328*1328").split("*"))
        seed = params.get("seed")
        actual = f"{prompt}, rewritten by the fake" if params.get("prompt_extend", True) else prompt
        out = []
        for i in range(params.get("n", 1)):
            name = f"{uuid.uuid4().hex}.png"
            if self.serve_files:
                self.files[name] = make_image(width, height, None if seed is None else seed + i)
            url = f"{request.url.origin()}/oss/{name}?Expires=1700086400&OSSAccessKeyId=LTAI-fake&Signature=abc%3D"
            out.append((url, actual))
        return out

    async def submit(self, request: web.Request, body: Any) -> web.Response:
        failed = self._failed_call()
        if failed is not None:
            return failed
        prompt = body.get("input", {}).get("prompt") if isinstance(body, dict) and isinstance(
            body.get("input"), dict) else None
        refused = self._check(body, prompt, ASYNC_MODELS)
        if refused is not None:
            return refused
        task = Task(str(uuid.uuid4()), body)
        self.tasks[task.task_id] = task
        return web.json_response({"output": {"task_status": "PENDING", "task_id": task.task_id},
                                  "request_id": str(uuid.uuid4())})

    async def poll(self, request: web.Request, task_id: str) -> web.Response:
        f = self.poll_failure
        if f is not None and f.take():
            return self.error(f.status, f.code, f.message)
        task = self.tasks.get(task_id)
        if task is None:
            return web.json_response({"request_id": str(uuid.uuid4()),
                                      "output": {"task_id": task_id, "task_status": "UNKNOWN"}})
        task.polls += 1
        if task.status in ("PENDING", "RUNNING") and not self.hold:
            if task.polls > self.pending_polls + self.running_polls:
                await self._finish(request, task)
            elif task.polls > self.pending_polls:
                task.status = "RUNNING"
        output: dict[str, Any] = {"task_id": task_id, "task_status": task.status,
                                  "submit_time": "2025-01-01 00:00:00.000"}
        usage = None
        if task.status == "SUCCEEDED":
            output["results"] = task.results
            output["task_metrics"] = {"TOTAL": len(task.results), "SUCCEEDED": len(task.results), "FAILED": 0}
            usage = {"image_count": len(task.results)}
        elif task.output_code:
            output.update(code=task.output_code, message=task.output_message)
        payload = {"request_id": str(uuid.uuid4()), "output": output}
        if usage:
            payload["usage"] = usage
        return web.json_response(payload)

    async def _finish(self, request: web.Request, task: Task) -> None:
        f = self.task_failure
        if f is not None and f.take():
            task.status = self.final_status
            task.output_code, task.output_message = f.code, f.message
            return
        prompt = task.body["input"]["prompt"]
        images = await asyncio.to_thread(self._images, request, task.body, prompt)
        task.results = [{"orig_prompt": prompt, "actual_prompt": actual, "url": url} for url, actual in images]
        task.status = "SUCCEEDED"

    def cancel(self, task_id: str) -> web.Response:
        task = self.tasks.get(task_id)
        if task is None or task.status != "PENDING":
            return self.error(400, "UnsupportedOperation",
                              "Failed to cancel the task, please confirm if the task is in PENDING status.")
        task.status = "CANCELED"
        self.cancelled.set()
        return web.json_response({"request_id": str(uuid.uuid4())})

    async def sync(self, request: web.Request, body: Any) -> web.Response:
        failed = self._failed_call()
        if failed is not None:
            return failed
        prompt, content = None, []
        try:
            content = body["input"]["messages"][0]["content"]
            prompt = next(part["text"] for part in content if "text" in part)
        except (KeyError, IndexError, TypeError, StopIteration):
            pass
        refused = self._check(body, prompt, SYNC_MODELS + tuple(EDIT_MODELS))
        if refused is not None:
            return refused
        refused, inputs, size = await asyncio.to_thread(self._check_edit, body, content if isinstance(content, list)
                                                        else [])
        if refused is not None:
            return refused
        if body.get("model") in EDIT_MODELS:
            self.edit_images.append(inputs)
        images = await asyncio.to_thread(self._images, request, body, prompt, size)
        width, height = size or (int(v) for v in (body.get("parameters") or {}).get("size", "1328*1328").split("*"))
        return web.json_response({
            "output": {"choices": [{"finish_reason": "stop", "message": {
                "role": "assistant", "content": [{"image": url} for url, _ in images]}}]},
            "usage": {"width": width, "height": height, "image_count": len(images)},
            "request_id": str(uuid.uuid4()),
        })
