"""`qwen-image-proxy plan --model NAME [--gpu-memory 24GiB] [--json]`: the memory plan of a model's local
routes, made before any weight is read (local_backend.memory and local_backend.placement): each
component's size, each placement's estimated GPU peak and whether it fits, and the one `offload: auto`
picks. NAME is a model of the config (its `diffusers` routes are planned), or else a model the engine
can load (a Hugging Face repo id or a pipeline folder) with the engine's defaults."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import NoReturn

from local_backend import EngineConfig, EngineError
from local_backend.edit import EDIT_PIPELINES
from local_backend.loading import declared_pipeline
from local_backend.memory import KNOWN_MODELS, Estimate, estimate
from local_backend.offload import text_encoder_device
from local_backend.placement import Plan, cpu_memory, parse_bytes, plan, table
from local_backend.single_file import gguf_file

from .config import Config


def _routes(config: Config, providers: dict, name: str) -> tuple[list[tuple[str, EngineConfig]], list[str]]:
    """(route name, EngineConfig) of each local route of `name`, and "route <name>: <why>" for each local
    route whose options are invalid (nothing to plan there)."""
    if name not in config.models:
        bare = EngineConfig(model=name, device="cuda")
        # An edit model (its model_index.json here, or a published Qwen-Image-Edit repo) is planned as it
        # loads, with task: edit and so its reference image; as task: generate its plan left that out.
        if declared_pipeline(bare) in EDIT_PIPELINES or (name in KNOWN_MODELS and "-Edit" in name):
            bare.task = "edit"
        return [(name, bare)], []
    found, invalid = [], []
    for route in config.models[name].routes:
        provider = providers.get(route.provider)
        if provider is None or provider.kind != "diffusers":
            continue
        engine_config = getattr(provider, "config", None)
        if engine_config is not None:
            found.append((route.provider, engine_config))
        else:
            invalid.append(f"route {route.provider}: {provider.unavailable_reason}")
    return found, invalid


def _budget(args: argparse.Namespace) -> int | None:
    if args.gpu_memory:
        return parse_bytes(args.gpu_memory)
    import torch

    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    return None


def _as_planned(config: Config, model: str, engine_config: EngineConfig) -> EngineConfig:
    """The engine config a route is planned with. A `device: cpu` route: capped at the largest image its
    model's size table lets a request ask for. Nothing is planned when a CPU route loads, so the engine's
    own limit (2656x2656 by default) only made the shipped tiny model's plan say 20 GiB for ~1 GiB used.
    Any other (a GPU route, a model named by repo id): as it is, the engine's max_pixels, as its load plans."""
    if (engine_config.device or "cuda").split(":")[0] != "cpu" or model not in config.models:
        return engine_config
    return replace(engine_config, max_pixels=min(engine_config.max_pixels, config.size_table(model).pixel_limit))


def _on_cpu(e: Estimate) -> dict:
    """The JSON of a route on the CPU: no GPU and no placement; the RAM it needs instead."""
    return {"gpu_memory": None, "pick": None, "smallest_gpu": None, "rows": [], "ram": cpu_memory(e)}


def run_plan(args: argparse.Namespace, config: Config, providers: dict,
             fail: Callable[[str], NoReturn]) -> None:
    try:
        budget = _budget(args)
    except ValueError as err:  # not `e`: that name is each route's estimate below
        fail(f"--gpu-memory: {err}")
    routes, invalid = _routes(config, providers, args.model)
    # A local route with invalid options was skipped in silence: with no other, the model was said to
    # have "no local (kind: diffusers) route to plan", and not why.
    if not routes and invalid:
        fail(f"model {args.model}: cannot plan " + "; ".join(invalid))
    if not routes:
        fail(f"model {args.model} has no local (kind: diffusers) route to plan")
    for line in invalid:
        print(f"warning: {line} (not planned)", file=sys.stderr)
    reports: list[tuple[str, Estimate, Plan | None]] = []
    for route, engine_config in routes:
        # Planned for the size the engine itself plans for when it loads (its own max_pixels): capped by
        # the model's size table here, the plan printed a pick the load did not make.
        try:
            path = None
            if engine_config.transformer:
                try:
                    path = gguf_file(engine_config.transformer, True)
                except EngineError:
                    path = None  # not here: its size comes from its type's name
            e = estimate(_as_planned(config, args.model, engine_config), gguf_path=path)
        except EngineError as err:
            fail(f"{route}: {err}")
        if e.device == "cpu":  # device: cpu: its real dtype and RAM, no GPU placement
            reports.append((route, e, None))
            continue
        cap = budget
        if engine_config.gpu_memory is not None and cap is not None:
            cap = min(cap, parse_bytes(engine_config.gpu_memory))
        result = plan(e, cap, text_encoder_device(engine_config))
        reports.append((route, e, result))
    if args.json:
        out = [{"route": route, "model": e.model, "family": e.family, "size": list(e.size), "batch": e.batch,
                "references": e.references,
                "components": {c.name: {"params": c.params, "bytes": c.bytes, "precision": c.precision}
                               for c in e.components.values()},
                "activations": e.activations, "device": e.device,
                **(planned.as_dict() if planned else _on_cpu(e))} for route, e, planned in reports]
        json.dump({"model": args.model, "routes": out}, sys.stdout, indent=2)
        print()
        return
    for i, (route, e, planned) in enumerate(reports):
        if i:
            print()
        print(f"route {route}: {table(e, planned)}")
