"""The job record and its pure converters: the public job object, the stored request, webhook payloads."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pybase64 as base64

from ..request import MAX_N, ImageRequest, InputImage, LoraRef

QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "queued", "in_progress", "completed", "failed", "cancelled"
STATUSES = (QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)
ACTIVE = (QUEUED, IN_PROGRESS)
TERMINAL = (COMPLETED, FAILED, CANCELLED)
EVENTS = {COMPLETED: "image.job.completed", FAILED: "image.job.failed", CANCELLED: "image.job.cancelled"}
# Provider kinds that only spend this machine's (or this cluster's) GPU: a job interrupted on one of them
# runs again; on any other route an interrupted call may have been charged by the vendor.
RERUN_SAFE_KINDS = frozenset({"placeholder", "diffusers", "ray"})
_PRIVATE_REQUEST_FIELDS = ("images", "mask", "first_index", "stream", "partial_images")


def new_job_id() -> str:
    return "imgjob_" + secrets.token_hex(12)


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(12)


@dataclass
class Delivery:
    """One webhook message: the same id (and body) on every attempt, its attempts and where it stands."""

    id: str
    event: str
    url: str
    body: str
    created_at: float
    state: str = "pending"  # pending | delivered | failed | gone (410)
    next_attempt_at: float | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "event": self.event, "state": self.state,
                "next_attempt_at": _int(self.next_attempt_at) if self.state == "pending" else None,
                "attempts": self.attempts}


@dataclass
class Job:
    id: str
    owner: str  # whose job it is: the hash of the client's bearer key (see idempotency.client_scope)
    key_name: str | None  # the configured key's name, for its limits and webhook
    model: str
    kind: str  # generation | edit
    request: dict[str, Any]  # the normalized fields, for the public object
    status: str = QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    progress: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    base_url: str = ""
    runs: int = 0  # times a proxy started it
    rerun_safe: bool = True
    cancel_requested: bool = False
    has_result: bool = False
    webhook_url: str | None = None
    deliveries: list[Delivery] = field(default_factory=list)
    route: str | None = None
    # The key's budget hold taken at submit (proxy/usage/service.py), until the job's run takes it over.
    budget_hold: dict[str, Any] | None = None
    no_cache: bool = False  # submitted with Cache-Control: no-cache (the seeded cache is not read)
    # W3C traceparents: the submitting request's span, and the job's own run (its webhook spans link to it).
    traceparent: str | None = None
    run_traceparent: str | None = None

    def to_doc(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_doc(cls, text: str | bytes) -> Job:
        data = json.loads(text)
        data["deliveries"] = [Delivery(**d) for d in data.get("deliveries") or []]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def next_delivery_at(self) -> float | None:
        due = [d.next_attempt_at for d in self.deliveries if d.state == "pending" and d.next_attempt_at]
        return min(due) if due else None

    def public(self, result: Any = None) -> dict[str, Any]:
        """The job object clients see (`result`: the stored answer, parsed, when it is to be shown)."""
        return {
            "id": self.id, "object": "image.job", "status": self.status, "created_at": int(self.created_at),
            "started_at": _int(self.started_at), "completed_at": _int(self.finished_at), "model": self.model,
            "kind": self.kind, "request": self.request, "progress": self.progress, "result": result,
            "error": self.error,
            "webhook": ({"url": self.webhook_url, "deliveries": [d.public() for d in self.deliveries]}
                        if self.webhook_url else None),
        }


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def public_request(req: ImageRequest) -> dict[str, Any]:
    """The request's normalized fields as a job shows them: no image bytes (their count and sizes instead)."""
    out = {f.name: getattr(req, f.name) for f in fields(req) if f.name not in _PRIVATE_REQUEST_FIELDS}
    out["loras"] = [lora.model_dump(mode="json") for lora in req.loras]
    if req.images:
        out["images"] = [{"width": i.width, "height": i.height, "format": i.format} for i in req.images]
    if req.mask is not None:
        out["mask"] = {"width": req.mask.width, "height": req.mask.height, "format": req.mask.format}
    return out


# ---- the stored request (to run the job, again after a restart) ---------------------------------------


def _image_out(img: InputImage) -> dict[str, Any]:
    return {"data": base64.b64encode(img.data).decode("ascii"), "format": img.format, "width": img.width,
            "height": img.height}


def _image_in(data: dict[str, Any]) -> InputImage:
    return InputImage(base64.b64decode(data["data"]), data["format"], data["width"], data["height"])


def request_to_bytes(req: ImageRequest) -> bytes:
    out: dict[str, Any] = {}
    for f in fields(req):
        value = getattr(req, f.name)
        if f.name == "images":
            value = [_image_out(i) for i in value]
        elif f.name == "mask":
            value = None if value is None else _image_out(value)
        elif f.name == "loras":
            value = [lora.model_dump(mode="json") for lora in value]
        out[f.name] = value
    return json.dumps(out, separators=(",", ":")).encode()


def request_from_bytes(raw: bytes) -> ImageRequest:
    data = json.loads(raw)
    known = {f.name for f in fields(ImageRequest)}
    data = {k: v for k, v in data.items() if k in known}
    data["images"] = tuple(_image_in(i) for i in data.get("images") or ())
    data["mask"] = None if data.get("mask") is None else _image_in(data["mask"])
    data["loras"] = tuple(LoraRef(**lora) for lora in data.get("loras") or ())
    if not 1 <= data.get("n", 1) <= MAX_N:
        raise ValueError("stored request has a bad n")
    return ImageRequest(**data)


# ---- webhook payloads ----------------------------------------------------------------------------------


def strip_b64(result: dict | None) -> dict | None:
    """A result without image bytes (webhook payloads stay small: a URL, or a GET of the job, gets them)."""
    if result is None:
        return None
    data = [{k: v for k, v in item.items() if k != "b64_json"} for item in result.get("data") or ()]
    return {**result, "data": data}


def webhook_body(job: Job, event: str, result: dict | None, now: float) -> str:
    """The message body of an event (Standard Webhooks' recommended shape: type, timestamp, data)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    data = job.public(strip_b64(result))
    data.pop("webhook", None)
    return json.dumps({"type": event, "timestamp": stamp, "data": data}, separators=(",", ":"))
