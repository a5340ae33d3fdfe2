"""A real local Redis Cluster for tests: N `redis-server` processes on free loopback ports, joined with
`redis-cli --cluster create`, stopped by PID afterwards.

Each node runs in its own directory with `save ""` and `appendonly no`: a killed node loses what it held unless the
test calls `save(i)` first (the node then reloads `dump.rdb` from its directory at restart). Every node has
`cluster-require-full-coverage no` (unless asked otherwise), so while one master is down the other masters keep
serving their slots (Redis's default `yes` makes the whole cluster answer CLUSTERDOWN once a master is marked FAIL:
with 0 replicas a production cluster needs the same setting, or replicas, to keep serving while a node is lost).

Optionally TLS (`tls=TLSFiles.create(dir)`): plain ports off, TLS on the node and the cluster bus, client
certificates required. `requires_redis` skips a test with a reason when redis-server is not installed
(`make system-deps` / CI always install it).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")

requires_redis = pytest.mark.skipif(
    REDIS_SERVER is None or REDIS_CLI is None,
    reason="redis-server/redis-cli not installed (apt-get install redis-server; `make system-deps` does it)",
)

HOST = "127.0.0.1"
_BUS_OFFSET = 10000  # Redis Cluster's bus listens on port + 10000


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports(count: int, taken: set[int] | None = None) -> list[int]:
    """`count` loopback ports that are free together with their cluster-bus ports (port + 10000)."""
    taken = set(taken or ())
    ports: list[int] = []
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port + _BUS_OFFSET > 65535 or port in taken or port + _BUS_OFFSET in taken:
            continue
        if _port_free(port + _BUS_OFFSET):
            ports.append(port)
            taken.update((port, port + _BUS_OFFSET))
            if len(ports) == count:
                return ports
    raise RuntimeError(f"could not find {count} free port pairs (port, port+{_BUS_OFFSET}) on {HOST}")


@contextlib.contextmanager
def local_redis_server(directory: os.PathLike, timeout: float = 15.0):
    """One standalone redis-server (no cluster, no persistence) on a free loopback port; yields the port and stops
    the server afterwards."""
    port = free_ports(1)[0]
    proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                             "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        with contextlib.closing(redis.Redis(host=HOST, port=port, socket_connect_timeout=1.0)) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {port} exited with {proc.returncode}")
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@dataclasses.dataclass
class TLSFiles:
    """A self-signed CA, a server certificate for `server_name` and a client certificate, made with openssl."""

    ca: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path
    client_cert: pathlib.Path
    client_key: pathlib.Path
    server_name: str

    @classmethod
    def create(cls, directory: pathlib.Path, server_name: str = "redis.localhost") -> "TLSFiles":
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("openssl is not installed: cannot make test certificates")
        d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)

        def run(*args: str) -> None:
            subprocess.run([openssl, *args], cwd=d, check=True, capture_output=True)

        key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]  # EC: key generation is instant
        run("req", "-x509", *key, "-nodes", "-days", "2", "-subj", "/CN=hps-test-ca",
            "-keyout", "ca.key", "-out", "ca.crt")
        (d / "server.ext").write_text(f"subjectAltName=DNS:{server_name}\n")
        for who, subj in (("server", f"/CN={server_name}"), ("client", "/CN=hps-test-client")):
            run("req", *key, "-nodes", "-subj", subj, "-keyout", f"{who}.key", "-out", f"{who}.csr")
            extra = ["-extfile", "server.ext"] if who == "server" else []
            run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-out", f"{who}.crt", *extra)
        return cls(ca=d / "ca.crt", server_cert=d / "server.crt", server_key=d / "server.key",
                   client_cert=d / "client.crt", client_key=d / "client.key", server_name=server_name)


class LocalRedisCluster:
    """N masters, 0 replicas, on 127.0.0.1. Use as a context manager or call start()/stop().

    Example:
        >>> with LocalRedisCluster(tmp_path) as rc:
        ...     tier = RedisClusterTier(rc.addresses)
    """

    def __init__(self, base_dir: os.PathLike, num_nodes: int = 3, *, tls: TLSFiles | None = None,
                 node_timeout_ms: int = 1000, require_full_coverage: bool = False) -> None:
        if REDIS_SERVER is None or REDIS_CLI is None:
            pytest.skip("redis-server/redis-cli not installed")
        self.base_dir = pathlib.Path(base_dir)
        self.num_nodes = num_nodes
        self.tls = tls
        self.node_timeout_ms = node_timeout_ms
        self.require_full_coverage = require_full_coverage
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen | None] = []
        # ACL users live in memory only (no aclfile): re-applied to a node when it restarts.
        self._acl_users: dict[str, tuple[str, tuple[str, ...]]] = {}

    # ------------------------------------------------------------------ lifecycle

    @property
    def addresses(self) -> list[str]:
        """["127.0.0.1:port", ...] in node order."""
        return [f"{HOST}:{p}" for p in self.ports]

    def node_dir(self, i: int) -> pathlib.Path:
        return self.base_dir / f"node{i}"

    def _server_args(self, i: int) -> list[str]:
        port = self.ports[i]
        args = [
            REDIS_SERVER,
            "--bind", HOST,
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-require-full-coverage", "yes" if self.require_full_coverage else "no",
            "--dir", str(self.node_dir(i)),
            "--dbfilename", "dump.rdb",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.node_dir(i) / "redis.log"),
            "--protected-mode", "no",
        ]
        if self.tls is None:
            args += ["--port", str(port)]
        else:
            t = self.tls
            args += [
                "--port", "0", "--tls-port", str(port), "--tls-cluster", "yes", "--tls-replication", "yes",
                "--tls-cert-file", str(t.server_cert), "--tls-key-file", str(t.server_key),
                "--tls-ca-cert-file", str(t.ca), "--tls-auth-clients", "yes",
            ]
        return args

    def _spawn(self, i: int) -> subprocess.Popen:
        self.node_dir(i).mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(self._server_args(i), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)

    def admin(self, i: int, **kw) -> redis.Redis:
        """A plain client (default user, no password) to node i, for setup and inspection."""
        kw.setdefault("socket_timeout", 5.0)
        kw.setdefault("socket_connect_timeout", 5.0)
        if self.tls is not None:
            kw.update(ssl=True, ssl_ca_certs=str(self.tls.ca), ssl_certfile=str(self.tls.client_cert),
                      ssl_keyfile=str(self.tls.client_key), ssl_check_hostname=False)
        return redis.Redis(host=HOST, port=self.ports[i], **kw)

    def _wait_ping(self, i: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            proc = self.procs[i]
            if proc is not None and proc.poll() is not None:
                log = self.node_dir(i) / "redis.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(
                    f"redis-server node {i} (port {self.ports[i]}) exited with {proc.returncode}:\n{tail}"
                )
            try:
                with contextlib.closing(self.admin(i, socket_timeout=1.0, socket_connect_timeout=1.0)) as c:
                    if c.ping():
                        return
            except redis.RedisError as exc:
                last = exc
            time.sleep(0.05)
        raise RuntimeError(f"redis-server node {i} (port {self.ports[i]}) did not answer PING: {last}")

    def wait_cluster_ok(self, timeout: float = 30.0, nodes: list[int] | None = None) -> None:
        """Until every node (or `nodes`) reports cluster_state:ok and knows all masters as connected."""
        nodes = list(range(self.num_nodes)) if nodes is None else nodes
        deadline = time.monotonic() + timeout
        state = {}
        while time.monotonic() < deadline:
            ok = True
            for i in nodes:
                try:
                    with contextlib.closing(self.admin(i, socket_timeout=1.0)) as c:
                        info = c.cluster("INFO")
                        masters = [n for n in c.cluster("NODES").values()
                                   if "master" in n["flags"] and n["connected"] and "fail" not in n["flags"]]
                except redis.RedisError as exc:
                    state[i] = repr(exc)
                    ok = False
                    continue
                state[i] = (info.get("cluster_state"), len(masters))
                if info.get("cluster_state") != "ok" or len(masters) < self.num_nodes - 1:
                    ok = False
            if ok:
                return
            time.sleep(0.1)
        raise RuntimeError(f"cluster not ok after {timeout} s: {state}")

    def start(self) -> "LocalRedisCluster":
        self.base_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)  # servers never outlive the test process, even when a teardown is skipped
        for attempt in range(3):
            self.ports = free_ports(self.num_nodes)
            self.procs = [self._spawn(i) for i in range(self.num_nodes)]
            try:
                for i in range(self.num_nodes):
                    self._wait_ping(i)
                break
            except RuntimeError:
                self.stop()  # a port was taken between the probe and the start: try other ports
                for i in range(self.num_nodes):
                    shutil.rmtree(self.node_dir(i), ignore_errors=True)
                if attempt == 2:
                    raise
        cmd = [REDIS_CLI]
        if self.tls is not None:
            cmd += ["--tls", "--cacert", str(self.tls.ca), "--cert", str(self.tls.client_cert),
                    "--key", str(self.tls.client_key)]
        cmd += ["--cluster", "create", *self.addresses, "--cluster-replicas", "0", "--cluster-yes"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if out.returncode != 0 or "[OK] All 16384 slots covered" not in out.stdout:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        self.wait_cluster_ok()
        return self

    def stop(self) -> None:
        """Stop every server this object started, by PID (SIGTERM, then SIGKILL after 5 s)."""
        for proc in self.procs:
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a paused node cannot act on SIGTERM
                os.kill(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)

    def __enter__(self) -> "LocalRedisCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ faults

    def pid(self, i: int) -> int:
        proc = self.procs[i]
        if proc is None or proc.poll() is not None:
            raise RuntimeError(f"node {i} is not running")
        return proc.pid

    def kill(self, i: int) -> None:
        """SIGKILL node i (no shutdown save) and wait for it to be gone."""
        proc = self.procs[i]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def restart(self, i: int, wait: bool = True) -> None:
        """Start node i again on its port and directory (its nodes.conf keeps its identity and slots), re-create
        the ACL users made by `acl_setuser`, and (wait=True) wait until the cluster is ok again."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            raise RuntimeError(f"node {i} is still running (pid {proc.pid})")
        self.procs[i] = self._spawn(i)
        self._wait_ping(i)
        for user, (password, rules) in self._acl_users.items():
            self._setuser(i, user, password, rules)
        if wait:
            self.wait_cluster_ok()

    def pause(self, i: int) -> None:
        """SIGSTOP node i: it accepts TCP connections (kernel backlog) but never answers — a hung node."""
        os.kill(self.pid(i), signal.SIGSTOP)

    def resume(self, i: int) -> None:
        os.kill(self.pid(i), signal.SIGCONT)

    def revive(self) -> None:
        """Every node up again - a killed node restarted, a paused one resumed - and the cluster serving all slots
        (what a test that broke nodes leaves behind for the next one)."""
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                self.restart(i, wait=False)
            else:
                with contextlib.suppress(ProcessLookupError):
                    self.resume(i)
        self.wait_cluster_ok()

    def save(self, i: int, timeout: float = 60.0) -> None:
        """Persist node i (BGSAVE, waited for), so a restart reloads what it holds (dump.rdb in its directory).

        BGSAVE rather than SAVE: SAVE blocks the node for the whole write, which lookups would see as a slow node.
        """
        with contextlib.closing(self.admin(i)) as c:
            before = c.info("persistence")["rdb_saves"]
            c.bgsave()
            deadline = time.monotonic() + timeout
            while True:
                info = c.info("persistence")
                done = not info["rdb_bgsave_in_progress"] and info["rdb_saves"] > before
                if done or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            if not done or info["rdb_last_bgsave_status"] != "ok":
                raise RuntimeError(f"BGSAVE on node {i} did not complete: {info}")

    # ------------------------------------------------------------------ helpers

    def acl_setuser(self, user: str, password: str, rules: tuple[str, ...] = ("~*", "&*", "+@all")) -> None:
        """Create/replace an ACL user on every node (ACLs are per node in Redis Cluster); kept across restarts."""
        self._acl_users[user] = (password, tuple(rules))
        for i in range(self.num_nodes):
            self._setuser(i, user, password, rules)

    def _setuser(self, i: int, user: str, password: str, rules: tuple[str, ...]) -> None:
        with contextlib.closing(self.admin(i)) as c:
            c.execute_command("ACL", "SETUSER", user, "reset", "on", f">{password}", *rules)

    def flushall(self) -> None:
        for i in range(self.num_nodes):
            with contextlib.closing(self.admin(i)) as c:
                c.flushall()

    def node_index_of_slot(self, slot: int) -> int:
        """Index of the node serving `slot` (as the first running node sees it)."""
        alive = [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]
        with contextlib.closing(self.admin(alive[0])) as c:
            for start, end, primary, *_replicas in c.cluster("SLOTS"):
                if int(start) <= slot <= int(end):
                    return self.ports.index(int(primary[1]))
        raise KeyError(f"slot {slot} is not served")

    def dbsize(self, i: int) -> int:
        with contextlib.closing(self.admin(i)) as c:
            return int(c.dbsize())
