"""The `diffusers` kind: an in-process Qwen-Image pipeline (local_backend) behind the proxy.

torch and diffusers are imported only when a config uses this kind.

The pure converters (engine_config, request_tier, to_params, decode_inputs, encode_all,
weights_problem) live in local_convert.py; LocalProvider is the thin async I/O around the engine:
loading, warnings, the queue, generating, the chat rewrite. PartialSender stays here: it hands
previews to an encoding thread and emits them onto the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import aiohttp

from local_backend import (
    Engine,
    EngineConfig,
    EngineError,
    GenerationParams,
    InvalidParamsError,
    JobCancelledError,
    QueueFullError,
)
from local_backend.accel_options import static_problems, static_warnings
from local_backend.loading import gguf_problem
from local_backend.loras import LoraManager  # no torch: resolves request LoRAs to files
from local_backend.planning import MAX_N  # no torch: the engine's limit on n per job

from ..config import RouteConfig
from ..errors import InvalidRequest, RateLimited, UpstreamError, UpstreamTimeout
from ..media.output import MIME, encode_image
from ..media.partials import PartialImage, threadsafe_emitter
from ..media.progress import step_reporter
from ..request import ImageRequest
from ..telemetry import tracing
from ..telemetry.metrics import Metrics
from . import enhance
from .base import Capabilities, GeneratedImage, Provider, ProviderContext, started
from .local_convert import (
    advertised_accelerations,
    advertised_tiers,
    client_param,
    decode_inputs,
    encode_all,
    engine_config,
    generates,
    model_abilities,
    request_tier,
    to_params,
    weights_problem,
)

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

log = logging.getLogger(__name__)


class PartialSender:
    """The engine's on_partial for one request: encodes each preview in the request's format and emits
    it (`emit` is proxy.media.partials.threadsafe_emitter()'s function).

    With an `encoder` (a one-thread executor), the encoding runs there, in order, instead of on the
    engine's worker thread: a 1024x1024 PNG takes 50-250 ms to encode, time the denoising loop would
    otherwise lose. `wait()` returns once every preview handed over so far has been emitted.
    """

    def __init__(self, req: ImageRequest, emit: Callable[[PartialImage], None],
                 encoder: ThreadPoolExecutor | None = None) -> None:
        self.req, self.emit, self.encoder = req, emit, encoder
        self.format = req.output_format or "png"
        self._last: Future[None] | None = None  # the last encoding handed to the encoder

    def __call__(self, index: int, partial_index: int, image: PILImage) -> None:
        if self.encoder is None:
            self._send(index, partial_index, image)
        else:
            self._last = self.encoder.submit(self._send, index, partial_index, image)

    def _send(self, index: int, partial_index: int, image: PILImage) -> None:
        try:
            data = encode_image(image, self.format, self.req.output_compression)
        except Exception:  # a preview that cannot be encoded is skipped, never the image
            log.exception("could not encode a partial image")
            return
        self.emit(PartialImage(image_index=self.req.first_index + index, partial_index=partial_index,
                               data=data, format=self.format))

    async def wait(self) -> None:
        if self._last is not None:  # one thread, in order: the last one done means all are
            await asyncio.wait([asyncio.wrap_future(self._last)])


class LocalProvider(Provider):
    kind = "diffusers"
    # The options this kind reads in models.yaml: local_backend.EngineConfig's fields plus timeout and
    # load_in_background. Any other key is a config error (proxy.config.kinds.options_model).
    options_schema = {
        "model": str,
        "task": ("generate", "edit"),
        "preview": ("latent", "vae"),
        "tiers": dict[str, dict] | None,
        "quality_tiers": dict[str, str] | None,
        "device": str | None,
        "dtype": (None, "bfloat16", "float16", "float32"),
        "offload": ("none", "model", "sequential", "group", "auto"),  # auto: local_backend.placement picks
        "text_encoder": dict | None,  # {device: cpu | cuda, quantization: int8 | nf4 | int8wo}
        "gpu_memory": str | int | None,  # cap on what offload: auto plans with ("24GiB")
        "quantization": (None, "int8", "nf4", "fp4", "int8wo", "float8wo"),
        "transformer": str | None,  # a GGUF transformer file (local_backend.single_file)
        "compile": bool | dict,  # local_backend.accel: true or {warm_sizes, mode, dynamic, fullgraph, backend}
        "attention_backend": str | None,
        "cache": bool | dict | None,  # cache-dit levels: true or {regular: {...}, high: {...}, default}
        "quantization_skip": list[str] | None,
        "max_batch": (int, {"ge": 1}),
        "max_queue": (int, {"ge": 1}),
        "max_pixels": (int, {"ge": 1}),
        "default_steps": (int, {"ge": 1}),
        "default_cfg_scale": float,
        "scheduler": dict,
        "loras": dict[str, str | dict] | None,
        "base_loras": list[str | dict] | None,
        "lora_dirs": list[str] | None,
        "lora_url_hosts": list[str] | None,
        "lora_cache_dir": str | None,
        "lora_max_bytes": (int, {"ge": 1}),
        "lora_cache_size": (int, {"ge": 1}),
        "local_files_only": bool | None,
        "timeout": (float, {"gt": 0}),
        "load_in_background": bool,
        "prompt_enhancement": dict | None,  # proxy.providers.enhance: {with: text_encoder | chat, ...}
    }

    def __init__(self, name: str, options: dict[str, Any], missing_vars: list[str] | None = None) -> None:
        super().__init__(name, options, missing_vars)
        self.engine: Engine | None = None
        self._encoder: ThreadPoolExecutor | None = None  # the thread that encodes partial images (made on first use)
        self._state: str | None = "not started"  # why it cannot serve (None: it can), unless loading
        self._load_task: asyncio.Task | None = None
        self._stage = ""  # while loading: what the load is doing now
        self._load_started = 0.0
        self.metrics: Metrics | None = None
        self.config: EngineConfig | None
        self._config_problem: str | None = None
        try:
            self.config = engine_config(options)
        except ImportError as e:
            self.config = None
            self._state = _not_installed(e)
        except (TypeError, ValueError) as e:
            self.config = None
            self._state = f"invalid options: {e}"
            self._config_problem = self._state
        # All of n in one engine job: the engine splits it into calls of max_batch images itself, and a
        # job takes one queue slot. Split by the router instead, each part took a slot, and one request
        # of n > max_queue + 1 (at max_batch 1) was refused with 429 on an idle server.
        per_call = _engine_max_n() if self.config else 1
        edits, masks = model_abilities(self.config) if self.config else (False, False)
        self.capabilities = Capabilities(
            max_images_per_call=per_call, output_formats=frozenset(MIME), output_compression=True,
            edits=edits, masks=masks, generates=generates(self.config) if self.config else True,
        )
        # The speed tiers ([{name, steps, cfg_scale}], base first), when there are more than base, and the
        # block cache's levels (fal's acceleration), when one is configured (local_backend.accel).
        self.tiers: list[dict] | None = advertised_tiers(self.config)
        self.accelerations: list[str] | None = advertised_accelerations(self.config)
        self._static_warnings: list[str] | None = None  # what accel.static_warnings found (None: not yet)
        # prompt_enhancement with: chat is done here, before the engine (proxy.providers.enhance); with:
        # text_encoder by the engine itself (in self.config).
        self.chat_enhancer: enhance.ChatEnhancer | None = None
        self._http: aiohttp.ClientSession | None = None
        self._lora_files: LoraManager | None = None
        if self.config is not None:
            chat = enhance.parse_options(options.get("prompt_enhancement"))  # checked by engine_config
            if chat is not None and chat.with_ == "chat":
                self.chat_enhancer = enhance.ChatEnhancer(chat, name, self.config.task)

    def describe(self) -> dict:
        info = super().describe()
        if self.engine is not None and self.engine.placement:  # /ready: where the model went, and why
            info["placement"] = self.engine.placement
        return info

    @property
    def unavailable_reason(self) -> str | None:
        return self.loading_stage or self._state

    @property
    def config_problem(self) -> str | None:
        return self._config_problem

    @property
    def qualities(self) -> frozenset[str]:
        return frozenset(self.config.quality_tiers) if self.config is not None else frozenset()

    @property
    def warnings(self) -> list[str]:
        """Speed options this route serves without, each with the reason: known ahead (a package not
        installed, a backend this device cannot run) until the model is loaded, then what the load found."""
        if self.engine is not None:
            return self.engine.warnings
        if self.config is None:
            return []
        if self._static_warnings is None:  # not started (check-config): found here, once
            self._static_warnings = static_warnings(self.config, self._device())
        return self._static_warnings

    def lora_file(self, path: str) -> str | None:
        if self.config is None:
            return None
        if self._lora_files is None:  # its own resolver: the engine's may not exist yet (loading)
            self._lora_files = LoraManager(self.config)
        return self._lora_files.local_file(path)

    def serve_sizes(self, sizes: list[tuple[int, int]]) -> None:
        """The sizes of the models this route serves: what `compile: {warm_sizes: table}` warms."""
        spec = self.config.compile if self.config is not None else None
        if self.config is not None and isinstance(spec, dict) and spec.get("warm_sizes") == "table" and sizes:
            self.config.compile = {**spec, "warm_sizes": [list(size) for size in sizes]}

    @property
    def _engine_config(self) -> EngineConfig:
        """The engine's options; used only once they parsed (start() and preflight() stop before, without)."""
        if self.config is None:
            raise UpstreamError(f"the local model is not ready ({self._state})")
        return self.config

    def _device(self) -> str:
        import torch

        return self._engine_config.device or ("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def loading_stage(self) -> str | None:
        """While the model loads: e.g. "loading the model: moving the pipeline to cuda (41 s so far)"."""
        if self._load_task is None or self._load_task.done() or self.engine is not None:
            return None  # not started, loaded, or failed (a failed load is unavailable, not loading)
        stage = f": {self._stage}" if self._stage else ""
        return f"loading the model{stage} ({time.monotonic() - self._load_started:.0f} s so far)"

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to `timeout` s for a load in progress. A waiter that gives up never stops the load."""
        task = self._load_task
        if task is not None and not task.done() and timeout > 0:
            # asyncio.wait neither cancels the task on timeout nor when this waiter is cancelled.
            await asyncio.wait([task], timeout=timeout)
        return self.unavailable_reason is None

    @property
    def default_timeout(self) -> float:
        return float(self.options.get("timeout", 1800))

    @property
    def queue_depth(self) -> int:
        return self.engine.queue_depth if self.engine else 0

    def _precheck(self) -> str | None:
        """Why loading would fail before trying: no GPU where one is asked for, weights not on disk."""
        try:
            import torch

            config = self._engine_config
            device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
            if device.startswith("cuda") and not torch.cuda.is_available():
                return "no CUDA GPU on this machine"

            self._static_warnings = static_warnings(config, device)  # off the event loop: imports diffusers
            problems = static_problems(config, device)
        except ImportError as e:  # a proxy-only install (pip install .): the route is unusable, said so
            return _not_installed(e)
        if problems:
            return problems[0]
        return weights_problem(config) or gguf_problem(config)

    def preflight(self) -> str | None:
        if self.config is None:
            return self._state
        return self._precheck()

    async def start(self, ctx: ProviderContext) -> None:
        if self.config is None:
            log.warning("provider %s unavailable: %s", self.name, self._state)
            return
        self.metrics = ctx.extras.get("metrics")
        self._http = ctx.http
        if reason := await asyncio.to_thread(self._precheck):
            self._state = reason
            log.warning("provider %s unavailable: %s", self.name, reason)
            return
        self._state, self._stage = "loading the model", ""
        self._load_started = time.monotonic()
        self._load_task = asyncio.create_task(self._load())
        # A big model loads in the background while the server answers; a small one can be waited for.
        if not self.options.get("load_in_background", True):
            await self._load_task

    async def _load(self) -> None:
        def progress(stage: str) -> None:  # from the loading thread
            self._stage = stage
            log.info("provider %s: %s", self.name, stage)

        config = self._engine_config
        engine = None
        # A thread of its own, not the default executor's: a load waits for the other providers' loads
        # (local_backend.exclusive), and providers waiting there took every thread requests need.
        loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-load")
        loop = asyncio.get_running_loop()
        try:
            engine = Engine(config)
            seconds = await loop.run_in_executor(loader, engine.load, progress)
            progress("starting the engine")
            await loop.run_in_executor(loader, engine.start)
        except asyncio.CancelledError:  # closed while loading: a load still running drops its pipeline
            if engine is not None:
                engine.close()
            self._state = "closed"
            raise
        except Exception as e:  # any failure leaves the route unusable with the reason shown
            self._state = f"failed to load {config.model}: {type(e).__name__}: {e}"
            log.error("provider %s: %s", self.name, self._state)
            return
        finally:
            loader.shutdown(wait=False)
        self.engine = engine
        self._state = None
        log.info("provider %s: %s loaded in %.1f s", self.name, config.model, seconds)

    async def close(self) -> None:
        if self._load_task and not self._load_task.done():
            self._load_task.cancel()
            await asyncio.wait([self._load_task])  # it closes its half-made engine
        if self.engine:
            await asyncio.to_thread(self.engine.close)
            self.engine = None
        if self._encoder is not None:
            self._encoder.shutdown(wait=False)
            self._encoder = None

    def _on_step(self, step: int, total: int) -> None:
        if self.metrics:
            self.metrics.local_steps.labels(provider=self.name).inc()

    async def generate(self, req: ImageRequest, route: RouteConfig) -> list[GeneratedImage]:
        if self.engine is None:
            raise UpstreamError(f"the local model is not ready ({self._state})")
        emit = threadsafe_emitter() if req.partial_images else None  # on the loop: it binds the loop
        sender = None
        if emit is not None:
            if self._encoder is None:
                self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}-partials")
            sender = PartialSender(req, emit, self._encoder)
        images, mask = await asyncio.to_thread(decode_inputs, req) if req.images or req.mask else ([], None)
        report = step_reporter()  # a background job's progress

        def on_step(step: int, total: int) -> None:
            self._on_step(step, total)
            if report is not None:
                report(step, total)

        try:
            tier = request_tier(req, self._engine_config)
            params = to_params(req, on_step, images, mask, sender, tier)
            params.trace = tracing.engine_hook()  # None untraced: the engine's stages as spans
            revised = await self._chat_rewrite(req, params)
            result = await self.engine.generate(params)
        except QueueFullError as e:
            raise RateLimited(str(e), retry_after=e.retry_after) from None
        except InvalidParamsError as e:
            raise InvalidRequest(str(e), param=client_param(req, e.param)) from None
        except JobCancelledError as e:
            raise UpstreamTimeout(f"the local job was stopped: {e}") from None
        except EngineError as e:
            raise UpstreamError(f"the local engine failed: {e}") from None
        if self.metrics:
            self.metrics.local_queue_wait.labels(provider=self.name).observe(result.queued_seconds)
        if sender is not None:  # every preview before the final images
            await sender.wait()
        fmt = req.output_format or "png"
        with tracing.span("engine.encode", {"qip.format": fmt, "qip.images": len(result.images)}):
            datas = await asyncio.to_thread(encode_all, result.images, fmt, req.output_compression)
        return [
            GeneratedImage(data=data, mime=MIME[fmt], width=im.width, height=im.height, seed=seed,
                           revised_prompt=result.revised_prompt or revised,
                           compression_applied=True, gpu_seconds=result.gpu_seconds / len(datas))
            for data, im, seed in zip(datas, result.images, result.seeds, strict=True)
        ]

    async def _chat_rewrite(self, req: ImageRequest, params: GenerationParams) -> str | None:
        """With prompt_enhancement `with: chat`: the rewritten prompt (already put into params), or None."""
        if self.chat_enhancer is None:
            return None
        params.prompt_enhancement = False  # the engine has no rewriter of its own here
        if not self.chat_enhancer.enabled(enhance.requested(req.prompt_enhancement)):
            return None
        revised = await self.chat_enhancer.rewrite(started(self._http), req.prompt)
        if revised is not None:
            params.prompt = revised
        return revised


def _not_installed(e: ImportError) -> str:
    return f"the local backend is not installed ({e.name}); install with pip install '.[local]'"


def _engine_max_n() -> int:
    return MAX_N
