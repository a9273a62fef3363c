"""Helpers for the Ray pool tests: a local cluster with a two-replica pool, replica stats, killing one."""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass

APP = "qip-test"
ROUTE = "/qip-test"
# The pool the tests run: the tiny model, two CPU replicas on this 2-core machine. Serve sends a replica at
# most 2 * max_batch = 4 requests (the default) and holds 4 more in front of the pool; past that, 429.
ENGINE = {"model": "tiny", "device": "cpu", "default_steps": 2, "max_batch": 2, "max_queue": 3,
          # with the text encoder, on when a request asks (the models.yaml form)
          "prompt_enhancement": {"with": "text_encoder", "max_new_tokens": 8},
          # a block cache level for `acceleration: high`, set for the tiny model's 2 blocks; `regular` keeps
          # its default of 8 computed blocks, which leaves the tiny model none to cache: a replica warning
          "cache": {"high": {"Fn_compute_blocks": 1, "residual_diff_threshold": 1.0, "max_warmup_steps": 1}},
          # a speed tier without LoRAs (1 step, no CFG), for OpenAI's quality: low
          "tiers": {"fast": {"steps": 1, "cfg_scale": 1.0}}, "quality_tiers": {"low": "fast"}}
POOL = {"engine": ENGINE, "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}, "max_queued_requests": 4}
EDIT_POOL = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}


@dataclass
class Pool:
    http_url: str
    handle: object


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pool() -> Pool:
    """ray.init on this machine, Serve with HTTP on a free loopback port, the pool deployed and running."""
    import ray
    from ray import serve

    from local_backend.ray_app import build_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    handle = serve.run(build_app(POOL), name=APP, route_prefix=ROUTE)
    return Pool(http_url=f"http://127.0.0.1:{port}", handle=handle)


def stop_pool() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


async def pool_stats(app: str = APP) -> dict[str, dict]:
    """Every running replica's stats, from the pool's stats actor (reported each second)."""
    from local_backend.ray_app import stats_actor

    return await stats_actor(app).snapshot.remote()


async def wait_pool(predicate, timeout: float = 30.0) -> dict[str, dict]:
    """The pool's stats once predicate(stats) holds (a pool just started has no stats actor yet: wait)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            stats = await pool_stats()
        except ValueError:  # ray: no actor of that name yet (the first replica creates it)
            stats = {}
        if predicate(stats):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"pool condition not reached in time: {stats}")
        await asyncio.sleep(0.2)


def replica_actor_names(app: str = APP) -> list[tuple[str, str]]:
    import ray

    return [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#")]


def kill_replica(name: str, namespace: str) -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
