"""`qwen-image-proxy serve | generate | models | check-config | usage`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import os
import socket
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from types import FrameType
from typing import NoReturn

import proxy
from local_backend import ray_app
from local_backend.ray_options import serve_application

from .api.gateway import Gateway
from .app import GATEWAY, build_app
from .config import Config, ConfigError, load_config
from .errors import Scrubber
from .generate_cli import run_generate
from .http.server import (
    LISTEN_BACKLOG,
    ConnectionLimits,
    all_loopback,
    log_open_files_limit,
    raise_open_files_limit,
    run,
    tune_malloc,
)
from .http.wire_errors import install_log_scrubbing
from .plan_cli import run_plan
from .providers import build_providers
from .telemetry.logs_json import use_json_logs, use_text_logs
from .telemetry.settings import settings_from
from .usage.cli import run_usage

DEFAULT_CONFIG = os.environ.get("QWEN_IMAGE_PROXY_CONFIG") or "models.yaml"  # set but empty: the default
# Seconds aiohttp waits for open connections on shutdown, after the app's own drain of in-flight
# requests (server.shutdown_grace, in its on_shutdown hook).
SHUTDOWN_TIMEOUT = 5
# More processes than this is a typo (each is a full server), not a plan.
MAX_WORKERS = 1024


def version() -> str:
    try:
        return installed_version("qwen-image-proxy")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return getattr(proxy, "__version__", "unknown")


def _fail(message: str) -> NoReturn:
    """Print each line of a problem as `error: ...` and exit 1."""
    for line in str(message).splitlines():
        print(f"error: {line}", file=sys.stderr)
    sys.exit(1)


def _load(path: str) -> Config:
    if not path.strip():  # Path("") is the current folder: "cannot read config file .: Is a directory"
        _fail("--config is empty: give the path of a models.yaml")
    try:
        return load_config(path)
    except ConfigError as e:
        _fail(str(e))


def _load_checked(path: str) -> tuple[Config, dict]:
    """What `serve` and `check-config` both accept: the config, and its providers built but not started."""
    config = _load(path)
    try:
        tracing = settings_from(config.telemetry)
    except ValueError as e:
        _fail(f"{path}: telemetry: {e}")
    if tracing is not None and importlib.util.find_spec("opentelemetry.sdk") is None:
        _fail(f"{path}: telemetry: traces go to {tracing.endpoint}, but OpenTelemetry is not installed: "
              "pip install 'qwen-image-proxy[otel]'")
    try:
        return config, build_providers(config)
    except ConfigError as e:
        _fail(f"{path}: {e}")


def _port(text: str) -> int:
    """argparse type for --port: 0 (any free port) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535)")
    return port


def _workers(text: str) -> int:
    """argparse type for --workers: 1 to MAX_WORKERS processes."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of processes") from None
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{count} is not a number of processes (1-{MAX_WORKERS})")
    return count


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen(host: str, port: int) -> list[socket.socket]:
    """Bound, listening sockets for host:port (every address the name has), or OSError naming why not.

    Done before the app starts, so a busy port fails at once, before any model begins to load.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(e.errno, e.strerror) from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, address in dict.fromkeys((i[0], i[1], i[2], i[4]) for i in infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # an address family this machine lacks (IPv6 off): skipped, as asyncio does
                continue
            sockets.append(sock)
            if os.name != "nt":  # on Windows it would let two servers share the port
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # "::" and "0.0.0.0" each get their own socket
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and sockets[0] is not sock:  # one port the system picked, on every address
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(0, "no usable address")
    return sockets


def _reason(e: OSError) -> str:
    text = e.strerror or str(e)
    return text[:1].lower() + text[1:]


def cmd_serve(args: argparse.Namespace) -> None:
    config, providers = _load_checked(args.config)
    level = args.log_level or config.server.log_level
    if config.server.log_format == "json":
        use_json_logs(level, Scrubber(config.secrets()).text)
    else:
        use_text_logs(level)
    for handler in logging.getLogger().handlers:  # every library's records too, not only aiohttp's and ours
        handler.addFilter(install_log_scrubbing(config.secrets()))
    log = logging.getLogger("proxy")
    host = config.server.host if args.host is None else args.host
    port = config.server.port if args.port is None else args.port
    try:
        sockets = listen(host, port)
    except OSError as e:
        _fail(f"cannot listen on {_where(host, port)}: {_reason(e)}")
    port = sockets[0].getsockname()[1]  # the one the system picked, for port 0
    # No keys: loopback only (the addresses bound, so names count by what they resolve to), unless the
    # operator says otherwise, and then with a warning on every start.
    open_to_network = not config.server.api_keys and not all_loopback(sockets)
    if open_to_network and not config.server.allow_unauthenticated:
        for sock in sockets:  # closed before anything is served
            sock.close()
        _fail(f"refusing to serve on {_where(host, port)} without API keys: set server.api_keys, listen on "
              "127.0.0.1, or set server.allow_unauthenticated: true")
    for where, names in config.unset_vars.items():
        log.warning("%s: %s not set, read as empty", where, ", ".join("${" + n + "}" for n in names))
    if (links := config.store.link_warning()) is not None:
        log.warning("%s", links)
    if open_to_network:
        log.warning("listening on %s without API keys (server.allow_unauthenticated): anyone who can reach "
                    "it can use it", _where(host, port))
    server = config.server
    limits = ConnectionLimits(header_timeout=server.header_timeout, body_timeout=server.body_timeout,
                              keepalive_timeout=server.keepalive_timeout)

    open_files = raise_open_files_limit()  # before the workers fork: they inherit it
    if open_files is not None:
        log_open_files_limit(*open_files)

    def serve_one(worker: str = "") -> None:
        tune_malloc()
        app = build_app(config, providers=providers)
        run(app, sockets, limits, shutdown_timeout=SHUTDOWN_TIMEOUT,
            on_ready=lambda: log.info("serving on http://%s%s", _where(host, port), worker),
            busy=lambda: app[GATEWAY].busy)

    workers = args.workers
    if workers == 1:
        serve_one()
        return
    local = [name for name, pc in config.providers.items() if pc.kind == "diffusers"]
    if local:
        for sock in sockets:
            sock.close()
        _fail(f"--workers {workers}: local (diffusers) providers cannot be shared between processes "
              f"({', '.join(local)}): each worker would load its own copy of the model. Serve them with one "
              "worker, or as a pool with kind: ray.")
    run_workers(workers, serve_one, log)


def run_workers(count: int, serve_one: Callable[[str], None], log: logging.Logger) -> None:
    """`count` processes serving the same already-bound sockets (the kernel spreads connections over
    them); SIGTERM / SIGINT go to every worker, and this returns when all have stopped."""
    import signal

    children: list[int] = []
    stopping: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    # Before the first fork: a signal while forking still reaches every worker started so far (none is
    # left serving on its own), and no more are started. Around each fork the signals wait (blocked), so
    # neither the parent's list nor the new worker's handlers are half set up when one arrives.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for i in range(count):
        if stopping:
            break
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        pid = os.fork()
        if pid == 0:  # the worker: its own event loop, app and limits (shared ones need state.redis_url)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
            try:
                serve_one(f" (worker {i + 1} of {count}, pid {os.getpid()})")
            finally:
                os._exit(0)
        children.append(pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
    failed = 0
    for pid in children:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        code = os.waitstatus_to_exitcode(status)
        # A worker stopped by the signal it was sent before it could handle it has not failed.
        failed += code != 0 and -code not in stopping
    if failed:
        log.error("%d of %d workers exited with an error", failed, count)
        sys.exit(1)


def cmd_models(args: argparse.Namespace) -> None:
    config, providers = _load_checked(args.config)
    gateway = Gateway(config, providers)
    for name in config.models:
        routes = gateway.router.routes[name]
        table = config.size_table(name)
        print(f"{name}  (sizes: {describe_size_table(config.size_table_choice(name))}; "
              f"default {table.default[0]}x{table.default[1]})")
        for route in routes:
            reason = route.provider.preflight()
            state = "usable" if reason is None else f"unavailable: {reason}"
            print(f"  -> {route.name} [{route.provider.kind}] {state}")


def describe_size_table(choice: dict) -> str:
    """'qwen-image, built in, picked by the model's family' and the like, for `models`."""
    if choice["source"] == "inline":
        return "the model's own table"
    where = "from size_tables" if choice["source"] == "size_tables" else "built in"
    how = ", picked by the model's family" if choice["picked_by"] == "family" else ""
    return f"{choice['name']}, {where}{how}"


def cmd_check_config(args: argparse.Namespace) -> None:
    """Rejects exactly what `serve` rejects (the same loading and building), without starting anything."""
    config, providers = _load_checked(args.config)
    gateway = Gateway(config, providers)
    problems = 0
    said: set[int] = set()  # providers whose reason a model's warning already printed
    for name in config.models:
        routes = gateway.router.routes[name]
        reasons = [(route.name, route.provider.preflight()) for route in routes]
        if all(reason is not None for _, reason in reasons):
            problems += 1
            said.update(id(route.provider) for route in routes)
            detail = "; ".join(f"route '{r}': {why}" for r, why in reasons)
            print(f"warning: model {name} has no usable route: {detail}")
    # A malformed option behind a usable fallback was silent (and --strict passed): the route never
    # serves, and only /ready said why.
    invalid = 0
    for pname, provider in providers.items():
        if provider.config_problem and id(provider) not in said:
            invalid += 1
            print(f"warning: provider {pname}: {provider.config_problem}")
    for where, names in config.unset_vars.items():  # e.g. `path: ${DIR}/img` would store under /img
        print(f"warning: {where}: {', '.join('${' + n + '}' for n in names)} not set, read as empty "
              "(give a default: ${NAME:-value})")
    if (links := config.store.link_warning()) is not None:
        print(f"warning: {links}")
    for pname, provider in providers.items():  # options a usable route would serve without
        for warning in provider.warnings if provider.preflight() is None else []:
            print(f"warning: provider {pname}: {warning}")
    print(f"{args.config}: {len(config.providers)} providers, {len(config.models)} models, "
          f"{problems} without a usable route")
    sys.exit(1 if args.strict and (problems or invalid) else 0)


def cmd_generate(args: argparse.Namespace) -> None:
    asyncio.run(run_generate(args, _load(args.config)))


def cmd_plan(args: argparse.Namespace) -> None:
    config, providers = _load_checked(args.config)
    run_plan(args, config, providers, _fail)


def cmd_ray_serve(args: argparse.Namespace) -> None:
    """Deploy the pool of every `kind: ray` provider to a running Ray cluster (or print its Serve config)."""
    config, providers = _load_checked(args.config)
    pools = {name: p for name, p in providers.items() if p.kind == "ray"}
    wanted = args.provider or list(pools)
    missing = [name for name in wanted if name not in pools]
    if missing:
        _fail(f"{args.config}: no provider of kind ray named {', '.join(missing)} (kind ray: {', '.join(pools) or 'none'})")
    if not pools:
        _fail(f"{args.config} has no provider of kind: ray")
    chosen = [pools[name] for name in wanted]
    apps = [serve_application(p.app_name, p.pool_options, p.route_prefix) for p in chosen]
    if args.print_config:  # a Serve config file: `serve deploy`, or KubeRay's serveConfigV2
        import yaml

        http = {"host": args.http_host, "port": args.http_port}
        print(yaml.safe_dump({"http_options": http, "applications": apps}, sort_keys=False), end="")
        return
    try:
        import ray
        from ray import serve
    except ImportError:
        _fail("ray is not installed: pip install '.[local,ray]' (on every node of the cluster too)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    address = args.address or chosen[0].address
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except Exception as e:  # no cluster there: say how to start one
        _fail(f"cannot connect to a Ray cluster at {address}: {type(e).__name__}: {e}\n"
              "start one first (`ray start --head` on this machine), or pass --address")
    serve.start(http_options={"host": args.http_host, "port": args.http_port})
    for pool, app in zip(chosen, apps, strict=True):
        print(f"deploying {app['name']} at {app['route_prefix']} ({pool.engine_config.model}); waiting for its replicas...")
        serve.run(ray_app.build_app(pool.pool_options), name=app["name"], route_prefix=app["route_prefix"])
        state = serve.status().applications[app["name"]]
        replicas = {str(k): v for d in state.deployments.values() for k, v in d.replica_states.items()}
        print(f"{app['name']}: {getattr(state.status, 'value', state.status)}, replicas {replicas}")
    print("the pools keep running after this command; `serve shutdown` (or `serve delete <app>`) removes them")


def cmd_usage(args: argparse.Namespace) -> None:
    config = _load(args.config)
    try:
        print(run_usage(config, args.since, args.group_by, args.bucket))
    except ValueError as e:
        _fail(str(e))
    except Exception as e:  # the database is not there or not reachable: say so, no traceback
        _fail(f"cannot read the usage ledger: {type(e).__name__}: {Scrubber(config.secrets()).text(str(e))}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-image-proxy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"qwen-image-proxy {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", default=DEFAULT_CONFIG, help="models.yaml path (default: %(default)s)")
        return p

    serve = with_config(sub.add_parser("serve", help="run the HTTP proxy"))
    serve.add_argument("--host", help="default: server.host from the config")
    serve.add_argument("--port", type=_port, help="default: server.port from the config (0: any free port)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--workers", type=_workers, default=1, metavar="N",
                       help="processes sharing the port (default 1); limits and idempotency are shared "
                            "between them only with state.redis_url")
    serve.set_defaults(func=cmd_serve)

    models = with_config(sub.add_parser("models", help="list models, their routes and whether they are usable"))
    models.set_defaults(func=cmd_models)

    check = with_config(sub.add_parser("check-config", help="validate the config file"))
    check.add_argument("--strict", action="store_true", help="exit 1 when a model has no usable route or a provider's options are invalid")
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

    plan = with_config(sub.add_parser("plan", help="the local engine's memory plan: what fits on which GPU"))
    plan.add_argument("--model", required=True, help="a model of the config (its local routes), or a repo id / folder")
    plan.add_argument("--gpu-memory", metavar="SIZE", help="plan for this much GPU memory (e.g. 24GiB; default: "
                      "this machine's free GPU memory, if it has a GPU)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_plan)

    ray_serve = with_config(sub.add_parser("ray-serve", help="deploy the kind: ray pools to a running Ray cluster"))
    ray_serve.add_argument("--provider", action="append", metavar="NAME", help="only this provider (repeatable)")
    ray_serve.add_argument("--address", help="the Ray cluster (default: the provider's address option, else auto)")
    ray_serve.add_argument("--http-host", default="0.0.0.0", help="Serve's HTTP ingress, when Serve is not running yet")
    ray_serve.add_argument("--http-port", type=_port, default=8001,
                           help="default: %(default)s (8000 is the proxy's); only when Serve is not running yet")
    ray_serve.add_argument("--print-config", action="store_true",
                           help="print the Serve config file (serve deploy, KubeRay) instead of deploying")
    ray_serve.set_defaults(func=cmd_ray_serve)

    usage = with_config(sub.add_parser("usage", help="print the usage ledger: requests, images, cost per day"))
    usage.add_argument("--since", default="7d", help="7d, 24h, 30m, a Unix time or a date (default: %(default)s)")
    usage.add_argument("--group-by", default="model", help="comma-separated: project_id, user_id, api_key_id, "
                       "model, size, source, route, provider (default: %(default)s)")
    usage.add_argument("--bucket", default="1d", help="1d, 1h or 1m (default: %(default)s)")
    usage.set_defaults(func=cmd_usage)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        try:
            args.func(args)
        finally:  # here, not at exit, where a closed pipe is an "Exception ignored" message (sys.exit too)
            sys.stdout.flush()
    except KeyboardInterrupt:  # Ctrl-C while starting or generating: the operator knows, no traceback
        sys.exit(130)
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        # Python would still flush stdout at exit, fail again and print "Exception ignored": point it nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)


if __name__ == "__main__":
    main()
