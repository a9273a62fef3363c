"""`qwen-image-proxy generate`: the local engine from the command line, without the server."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from local_backend import Engine, EngineError
from local_backend.edit import UNIFIED_PIPELINES
from local_backend.loading import declared_pipeline

from .config import Config
from .errors import ProxyError
from .media.output import encode_image
from .media.sizing import resolve_size
from .providers.local_convert import engine_config, to_params
from .request import build_request, parse_body

_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp", ".gif": "gif", ".avif": "avif"}


def _local_options(config: Config, model: str) -> dict:
    if model not in config.models:
        sys.exit(f"error: unknown model '{model}'; models: {', '.join(config.models)}")
    for route in config.models[model].routes:
        provider = config.providers[route.provider]
        if provider.kind == "diffusers":
            return provider.options
    sys.exit(f"error: model '{model}' has no local (diffusers) route")


def _output_paths(output: str, n: int) -> list[Path]:
    path = Path(output)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def _check_writable(paths: list[Path]) -> None:
    """Exit now, not after the model loaded and the images are made, when they could not be written."""
    for path in paths:
        folder = path.parent
        if path.is_dir():
            sys.exit(f"error: cannot write {path}: it is a folder")
        if not folder.is_dir():
            sys.exit(f"error: cannot write {path}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            sys.exit(f"error: cannot write {path}: permission denied")


async def run_generate(args: argparse.Namespace, config: Config) -> None:
    from tqdm import tqdm



    fmt = _FORMATS.get(Path(args.output).suffix.lower())
    if fmt is None:
        sys.exit(f"error: cannot tell the image format from '{args.output}'; use .png, .jpg, .webp, .gif or .avif")
    options = _local_options(config, args.model)  # before config.size_table(), which raises KeyError
    fields = {"prompt": args.prompt, "n": args.n, "size": args.size, "seed": args.seed,
              "num_inference_steps": args.steps, "cfg_scale": args.cfg_scale,
              "negative_prompt": args.negative_prompt,
              "loras": [_lora(text) for text in args.lora] or None}
    try:
        body = parse_body({k: v for k, v in fields.items() if v is not None})
        width, height = resolve_size(config.size_table(args.model), body.size, body.aspect_ratio, body.resolution)
        req = build_request(body, args.model, width, height)
    except ProxyError as e:
        sys.exit(f"error: {e.message}")
    paths = _output_paths(args.output, req.n)
    _check_writable(paths)

    try:
        engine_options = engine_config(options)
    except (TypeError, ValueError) as e:
        sys.exit(f"error: {e}")
    # An edit model makes nothing from text alone: say so before a load of minutes, not after it with
    # "give 1 to 3 input images", which this command has no way to give.
    if engine_options.task == "edit" and declared_pipeline(engine_options) not in UNIFIED_PIPELINES:
        sys.exit(f"error: model '{args.model}' edits images and cannot generate from a prompt alone; "
                 "send it input images through the server's /v1/images/edits")
    started = time.monotonic()
    try:
        engine = Engine(engine_options)
        engine.load(lambda stage: print(f"loading: {stage}", file=sys.stderr))
    except (EngineError, TypeError, ValueError) as e:  # a bad option, or a model that does not load
        sys.exit(f"error: {e}")
    print(f"loaded in {time.monotonic() - started:.1f} s", file=sys.stderr)
    engine.start()
    bar = tqdm(unit="step", desc="denoising", file=sys.stderr)

    # n above max_batch runs as several pipeline calls, each reporting its own steps.
    calls = -(-req.n // max(1, engine.config.max_batch))

    def on_step(step: int, total: int) -> None:
        bar.total = total * calls
        bar.update(1)

    try:
        result = await engine.generate(to_params(req, on_step))
    except EngineError as e:
        sys.exit(f"error: {e}")
    finally:
        bar.close()
        engine.close()
    # Every file first, then the lines: a reader that stops early (`| head -1`) loses no image.
    for path, image in zip(paths, result.images, strict=True):
        try:
            path.write_bytes(encode_image(image, fmt, None))
        except OSError as e:
            sys.exit(f"error: cannot write {path}: {e.strerror or e}")
    for path, image, seed in zip(paths, result.images, result.seeds, strict=True):
        print(f"{path}  {image.width}x{image.height}  seed {seed}")


def _lora(text: str) -> dict:
    # PATH[:SCALE]; a URL's own colon stays in the path.
    path, sep, scale = text.rpartition(":")
    if sep and path and not scale.startswith("//"):
        try:
            return {"path": path, "scale": float(scale)}
        except ValueError:
            pass
    return {"path": text, "scale": 1.0}
