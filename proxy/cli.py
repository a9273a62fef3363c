"""`qwen-image-proxy serve | generate | models | check-config`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from .config import Config, ConfigError, load_config

DEFAULT_CONFIG = os.environ.get("QWEN_IMAGE_PROXY_CONFIG", "models.yaml")


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as e:
        sys.exit(f"error: {e}")


def cmd_serve(args: argparse.Namespace) -> None:
    from aiohttp import web

    from .app import build_app

    config = _load(args.config)
    logging.basicConfig(level=(args.log_level or config.server.log_level).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = args.host or config.server.host, args.port or config.server.port
    # handler_cancellation: a client that hangs up cancels its request, and with it a local GPU job.
    web.run_app(build_app(config), host=host, port=port, handler_cancellation=True,
                print=lambda *_: logging.getLogger("proxy").info("serving on http://%s:%s", host, port))


def cmd_models(args: argparse.Namespace) -> None:
    config = _load(args.config)
    from .app import Gateway

    gateway = Gateway(config)
    for name in config.models:
        routes = gateway.router.routes[name]
        table = config.size_table(name)
        print(f"{name}  (default {table.default[0]}x{table.default[1]})")
        for route in routes:
            reason = route.provider.preflight()
            state = "usable" if reason is None else f"unavailable: {reason}"
            print(f"  -> {route.name} [{route.provider.kind}] {state}")


def cmd_check_config(args: argparse.Namespace) -> None:
    config = _load(args.config)
    from .app import Gateway

    try:
        gateway = Gateway(config)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    problems = 0
    for name in config.models:
        routes = gateway.router.routes[name]
        reasons = [(route.name, route.provider.preflight()) for route in routes]
        if all(reason is not None for _, reason in reasons):
            problems += 1
            detail = "; ".join(f"route '{r}': {why}" for r, why in reasons)
            print(f"warning: model {name} has no usable route: {detail}")
    print(f"{args.config}: {len(config.providers)} providers, {len(config.models)} models, "
          f"{problems} without a usable route")
    sys.exit(1 if args.strict and problems else 0)


def cmd_generate(args: argparse.Namespace) -> None:
    from .generate_cli import run_generate

    asyncio.run(run_generate(args, _load(args.config)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-image-proxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", default=DEFAULT_CONFIG, help="models.yaml path (default: %(default)s)")
        return p

    serve = with_config(sub.add_parser("serve", help="run the HTTP proxy"))
    serve.add_argument("--host", help="default: server.host from the config")
    serve.add_argument("--port", type=int, help="default: server.port from the config")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)

    models = with_config(sub.add_parser("models", help="list models, their routes and whether they are usable"))
    models.set_defaults(func=cmd_models)

    check = with_config(sub.add_parser("check-config", help="validate the config file"))
    check.add_argument("--strict", action="store_true", help="exit 1 when a model has no usable route")
    check.set_defaults(func=cmd_check_config)

    gen = with_config(sub.add_parser("generate", help="make an image with the local engine, without the server"))
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="out.png", help="output file; the extension picks the format")
    gen.add_argument("--model", default="qwen-image-tiny")
    gen.add_argument("--size", default=None, help="WxH or W:H")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--cfg-scale", type=float)
    gen.add_argument("--negative-prompt")
    gen.add_argument("-n", type=int, default=1)
    gen.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
