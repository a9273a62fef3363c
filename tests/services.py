"""Real backing services for tests: a redis-server process, a three-master Redis Cluster and moto's S3
server, each on free loopback ports, started and stopped by fixtures. Import the fixtures into a test module
to use them:

    from .services import moto_server, redis_cluster, redis_server, s3_bucket  # noqa: F401
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class RedisServer:
    """A throwaway redis-server: no persistence, loopback only. stop()/start() to test an outage,
    pause()/resume() (SIGSTOP/SIGCONT) to test a Redis that hangs."""

    def __init__(self, binary: str):
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)  # the port stays open, nothing answers

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)


def service_missing(message: str) -> None:
    """A service a test needs is not installed: a skip here, a failure in CI (.ci/run installs every
    service and sets QIP_REQUIRE_SERVICES=1)."""
    if os.environ.get("QIP_REQUIRE_SERVICES") or os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def redis_binary() -> str | None:
    return shutil.which("redis-server")


@pytest.fixture
def redis_server():
    """A started redis-server on a free port (one per test: nothing leaks between tests)."""
    binary = redis_binary()
    if binary is None:
        service_missing("redis-server is not installed (apt-get install -y redis-server)")
    server = RedisServer(binary)
    server.start()
    try:
        yield server
    finally:
        server.resume()
        server.stop()


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 < 65536:
            with contextlib.suppress(OSError), socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
                return port


class RedisCluster:
    """A throwaway Redis Cluster: three masters (no replicas, no persistence) in a temp dir on loopback,
    joined with `redis-cli --cluster create`. Its slots are spread over the three, so keys of one request
    that do not share a hash tag land on different nodes (CROSSSLOT), as on a managed cluster."""

    def __init__(self, binary: str, cli: str):
        import tempfile

        self.binary, self.cli = binary, cli
        self.root = tempfile.mkdtemp(prefix="qip-redis-cluster-")
        self.ports = [cluster_port() for _ in range(3)]
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        """Any one node: the cluster client finds the others (a plain client would meet MOVED)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def _cli(self, port: int, *args: str) -> str:
        return subprocess.run([self.cli, "-p", str(port), *args], check=True, capture_output=True, text=True,
                              timeout=30).stdout

    def start(self) -> None:
        for port in self.ports:
            self.procs.append(subprocess.Popen(
                [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--protected-mode", "no", "--dir", self.root, "--cluster-enabled", "yes",
                 "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "5000"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in self.ports:
            wait_for_port(port)
        subprocess.run([self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while not all("cluster_state:ok" in self._cli(p, "cluster", "info") for p in self.ports):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok in 30 s")
            time.sleep(0.05)

    def flush(self) -> None:
        for port in self.ports:
            self._cli(port, "flushall")

    def keys_by_node(self) -> dict[int, list[str]]:
        """Every key, by the port of the node that holds it."""
        return {p: sorted(self._cli(p, "--scan").split()) for p in self.ports}

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        self.procs = []
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster_session():
    binary, cli = redis_binary(), shutil.which("redis-cli")
    if binary is None or cli is None:
        service_missing("redis-server and redis-cli are not installed (apt-get install -y redis-server)")
    cluster = RedisCluster(binary, cli)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster(redis_cluster_session):
    """A started three-master Redis Cluster on free ports, emptied for each test (it takes seconds to form,
    so the session shares one)."""
    redis_cluster_session.flush()
    return redis_cluster_session


class MotoServer:
    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=S3_KEY_ID, aws_secret_access_key=S3_SECRET)


S3_KEY_ID = "AKIATESTPROXY0000001"
S3_SECRET = "test-secret-key-for-moto-0000000000000000"


@pytest.fixture(scope="session")
def moto_server():
    """moto's standalone S3 server in a thread, on a free port, for the whole session."""
    server = MotoServer()
    server.server.start()
    wait_for_port(server.port)
    try:
        yield server
    finally:
        server.server.stop()


@pytest.fixture
def s3_bucket(moto_server) -> str:
    """A new, empty bucket on the moto server."""
    name = f"qip-{uuid.uuid4().hex[:12]}"
    moto_server.client().create_bucket(Bucket=name)
    return name


class PostgresServer:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) in a temp dir on a free loopback port, trust auth.
    stop()/start() to test an outage. As root (CI containers) it runs as the `postgres` user: the server
    refuses to run as root."""

    def __init__(self, bindir: str):
        import tempfile

        self.bindir = bindir
        self.port = free_port()
        self.root = tempfile.mkdtemp(prefix="qip-pg-")
        self.data = os.path.join(self.root, "data")
        self.user_prefix: list[str] = []
        if os.geteuid() == 0:
            import pwd

            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.user_prefix = [shutil.which("runuser") or "runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.user_prefix, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=120)

    def init(self) -> None:
        self._run(os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", "postgres", "-A", "trust",
                  "--no-sync", "-E", "UTF8")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-o", options, "-w", "-t", "60",
                  "-l", os.path.join(self.root, "log"), "start")
        wait_for_port(self.port)

    def stop(self) -> None:
        """An abrupt stop (immediate: no clean shutdown), as a crash would be."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def postgres_bindir() -> str | None:
    """Where initdb and pg_ctl are: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    import glob

    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return os.path.dirname(os.path.realpath(found))
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(bindir, "initdb")):
            return bindir
    return None


@pytest.fixture
def postgres_server():
    """A started PostgreSQL server on a free port (one per test)."""
    bindir = postgres_bindir()
    if bindir is None:
        service_missing("PostgreSQL is not installed (apt-get install -y postgresql)")
    server = PostgresServer(bindir)
    server.init()
    server.start()
    try:
        yield server
    finally:
        server.remove()
