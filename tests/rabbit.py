"""A private RabbitMQ node for the tests, driven through ``services/rabbitmq/broker.sh``.

The node has its own name, ports and data directory, so it runs next to any broker already on
the machine, and the tests may restart or kill it. Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import random
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable

from tests.waiting import poll_until

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
BROKER_SH = REPO_ROOT / "services" / "rabbitmq" / "broker.sh"

START_TIMEOUT = 180.0  # broker.sh itself gives up after 120 s
PORT_TIMEOUT = 60.0
KILL_TIMEOUT = 30.0  # a VM to exit after SIGKILL, then epmd to forget its name
CLUSTER_TIMEOUT = 120.0  # a node to be running in its cluster; a node to stop being quorum critical
EPMD_PORT = int(os.environ.get("ERL_EPMD_PORT", "4369"))
# rabbitmqctl's exit code when it cannot reach the node (EX_UNAVAILABLE)
_CTL_UNAVAILABLE = 69
# Ports other RabbitMQ nodes on the machine (system, demo, management, CLI) may want later.
_RESERVED_PORTS = frozenset({4369, 5671, 5672, 15672, 15692, 25672, 25699, *range(35672, 35683)})


def _ephemeral_port_range() -> tuple[int, int]:
    try:
        low, high = pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _port_is_free(port: int) -> bool:
    """True if nothing listens on ``port``; checked the way the broker binds it (all IPv4)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port(exclude: frozenset[int] = frozenset()) -> int:
    """A currently free TCP port.

    Picked below the kernel's ephemeral range, so that while the node is down (``restart``,
    ``kill``) no outgoing connection is given its port and the node can bind it again. Falls
    back to letting the kernel choose (port 0 on 127.0.0.1).
    """
    low = min(_ephemeral_port_range()[0], 32768)
    for _ in range(200):
        port = random.randrange(10000, low)
        if port not in _RESERVED_PORTS and port not in exclude and _port_is_free(port):
            return port
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in exclude:
            return port


def _tail(path: pathlib.Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _pid_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]


def _as_int(value: object) -> int:
    return value if isinstance(value, int) else 0


_STAT_FIELDS = ("messages", "messages_ready", "messages_unacknowledged", "consumers")


def _parse_queue_stats(out: str) -> dict[str, dict[str, int]]:
    rows: list[dict[str, object]] = json.loads(out) if out.strip() else []
    # A queue that is down reports "" instead of numbers: counted as 0.
    return {str(row["name"]): {f: _as_int(row.get(f)) for f in _STAT_FIELDS} for row in rows}


def epmd_names(timeout: float = 5.0) -> set[str] | None:
    """The short node names epmd knows (its NAMES request), or None if epmd does not answer."""
    try:
        with socket.create_connection(("127.0.0.1", EPMD_PORT), timeout=timeout) as sock:
            sock.sendall(b"\x00\x01n")  # NAMES_REQ: length 1, request 110
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except OSError:
        return None
    # 4 bytes (epmd's port), then lines "name <short name> at port <port>"
    lines = data[4:].decode(errors="replace").splitlines()
    return {line.split()[1] for line in lines if line.startswith("name ")}


class RabbitNode:
    """One private RabbitMQ node: ``RabbitNode(dir).start()``, then connect to ``node.url``."""

    def __init__(
        self,
        base_dir: pathlib.Path,
        *,
        name: str | None = None,
        extra_conf: str = "",
        port: int | None = None,
        dist_port: int | None = None,
    ) -> None:
        self.base_dir = pathlib.Path(base_dir).resolve()
        if name is None:
            name = f"aioqueue-test-{os.getpid()}-{secrets.token_hex(3)}"
        self.name = name if "@" in name else f"{name}@localhost"
        self.extra_conf = extra_conf
        self.port = port if port is not None else free_port()
        self.dist_port = (
            dist_port if dist_port is not None else free_port(exclude=frozenset({self.port}))
        )
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.pid: int | None = None

    def __repr__(self) -> str:
        return f"RabbitNode({self.name!r}, port={self.port}, dir={str(self.base_dir)!r})"

    @property
    def log_file(self) -> pathlib.Path:
        return self.base_dir / "log" / f"{self.name}.log"

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the node (keeping data from a previous run in ``base_dir``); wait until up."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        args = [str(self.base_dir), self.name, str(self.port), str(self.dist_port)]
        if self.extra_conf:
            extra = self.base_dir / "extra.conf"
            extra.write_text(self.extra_conf)
            args.append(str(extra))
        try:
            result = self._broker("start-node", *args, timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            self._broker("stop-node", self.name, timeout=60)
            raise RuntimeError(
                f"{self!r} did not start within {START_TIMEOUT:.0f}s\n"
                f"{self._output(exc.stderr)}\n{_tail(self.log_file)}"
            ) from None
        if result.returncode != 0:
            message = f"starting {self!r} failed (broker.sh exit {result.returncode}):\n"
            message += result.stderr
            if str(self.log_file) not in result.stderr:  # broker.sh did not show the log
                message += f"\n{_tail(self.log_file)}"
            raise RuntimeError(message)
        self.pid = self._read_pid()
        self._wait_for_port()

    def stop(self) -> None:
        """Stop the node gracefully (its Erlang VM is gone afterwards); no error if down."""
        result = self._broker("stop-node", self.name, timeout=90)
        if result.returncode != 0:
            raise RuntimeError(f"stopping {self!r} failed:\n{result.stderr}")
        self.pid = None

    def stop_app(self) -> None:
        """Stop the RabbitMQ application; the Erlang VM keeps running (clients are cut off)."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        """Start the application again and wait until the AMQP port accepts connections."""
        self.ctl("start_app", timeout=PORT_TIMEOUT + 60)
        self._wait_for_port()

    def restart(self) -> None:
        self.stop_app()
        self.start_app()

    def kill(self) -> None:
        """``kill -9`` the node's Erlang VM, then start it again on the same ports and data."""
        self.kill_vm()
        self.start()

    def kill_vm(self) -> None:
        """``kill -9`` the node's Erlang VM and wait until it is gone: its process exited (a
        zombie its parent has not reaped yet counts as gone), its pid file removed, and its
        name free in epmd, so that it can be started again at once."""
        pid = self._read_pid() or self.pid
        if pid is None:
            raise RuntimeError(f"{self!r}: no pid known; is it running?")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not poll_until(lambda: _pid_gone(pid), timeout=KILL_TIMEOUT):
            raise RuntimeError(f"{self!r}: pid {pid} survived SIGKILL for {KILL_TIMEOUT:.0f} s")
        self.pid = None
        (self.base_dir / "rabbitmq.pid").unlink(missing_ok=True)
        if not poll_until(lambda: not self.epmd_registered(), timeout=KILL_TIMEOUT, interval=0.1):
            raise RuntimeError(f"{self!r}: epmd still lists the killed node after {KILL_TIMEOUT}s")

    def epmd_registered(self) -> bool:
        """True while epmd lists this node's name (its Erlang distribution is up)."""
        return self.name.split("@", 1)[0] in (epmd_names() or set())

    # -- rabbitmqctl ---------------------------------------------------------------------

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """``rabbitmqctl -n <node> *args``; returns stdout, raises RuntimeError on failure."""
        try:
            result = self._broker("ctl", self.name, *args, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} timed out after {timeout}s on {self!r}:\n"
                f"{self._output(exc.stderr)}"
            ) from None
        if result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} failed on {self!r} (exit {result.returncode}):\n"
                f"{result.stderr}{result.stdout}"
            )
        return result.stdout

    def diagnostics(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``rabbitmq-diagnostics -n <node> *args``; the caller reads the exit code (checks
        fail with a non-zero one)."""
        return self._broker("diag", self.name, *args, timeout=timeout)

    def close_all_connections(self) -> None:
        self.ctl("close_all_connections", "--global", "closed by the aioqueue tests")

    def queue_stats(self, vhost: str = "/") -> dict[str, dict[str, int]]:
        """``{queue: {"messages", "messages_ready", "messages_unacknowledged", "consumers"}}``."""
        out = self.ctl(
            "-q", "list_queues", "-p", vhost, "name", *_STAT_FIELDS, "--formatter", "json"
        )
        return _parse_queue_stats(out)

    def add_vhost(self, vhost: str) -> None:
        self.ctl("add_vhost", vhost)
        self.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")

    def delete_vhost(self, vhost: str) -> None:
        self.ctl("delete_vhost", vhost)

    # -- helpers -------------------------------------------------------------------------

    def _broker(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BROKER_SH), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    @staticmethod
    def _output(data: str | bytes | None) -> str:
        if isinstance(data, bytes):
            return data.decode(errors="replace")
        return data or ""

    def _read_pid(self) -> int | None:
        try:
            return int((self.base_dir / "rabbitmq.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _wait_for_port(self, timeout: float = PORT_TIMEOUT) -> None:
        def accepting() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False

        if not poll_until(accepting, timeout=timeout, interval=0.1):
            raise RuntimeError(
                f"{self!r}: AMQP port {self.port} not accepting connections after "
                f"{timeout:.0f}s\n{_tail(self.log_file)}"
            )


class RabbitCluster:
    """Private RabbitMQ nodes joined in one cluster: ``RabbitCluster(dir).start()``, then connect
    to ``cluster.url`` (every node's URL, comma-separated) or one of ``cluster.urls``.

    Node ``i`` is ``nodes[i]``: its own name, ports and data under ``base_dir/node<i>``. Every
    method waits for its outcome under a deadline (a node running in the cluster, not just up).
    """

    def __init__(self, base_dir: pathlib.Path, size: int = 3) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.base_dir = pathlib.Path(base_dir).resolve()
        prefix = f"aioqueue-test-{os.getpid()}-{secrets.token_hex(3)}"
        taken: set[int] = set()
        self.nodes: list[RabbitNode] = []
        for i in range(size):
            port = free_port(exclude=frozenset(taken))
            taken.add(port)
            dist_port = free_port(exclude=frozenset(taken))
            taken.add(dist_port)
            node = RabbitNode(
                self.base_dir / f"node{i}", name=f"{prefix}-{i}", port=port, dist_port=dist_port
            )
            self.nodes.append(node)
        self.urls: list[str] = [node.url for node in self.nodes]
        self.url: str = ",".join(self.urls)
        self._up: set[int] = set()  # nodes whose VM this object started and did not stop
        self._launched: set[int] = set()  # every node it ever started (stop() stops them)

    def __repr__(self) -> str:
        return f"RabbitCluster({[node.name for node in self.nodes]!r})"

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Boot every node in parallel, join ``nodes[1:]`` to ``nodes[0]``, wait until all run
        in one cluster. On failure the nodes are stopped again and the error raised."""
        try:
            self._in_parallel(self._boot, range(len(self.nodes)))
            seed = self.nodes[0].name
            for node in self.nodes[1:]:
                result = node._broker("join-cluster", node.name, seed, timeout=START_TIMEOUT)
                if result.returncode != 0:
                    raise RuntimeError(f"{node!r} could not join {seed}:\n{result.stderr}")
            self._wait_running(set(range(len(self.nodes))), "all nodes running in the cluster")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every node this object started (no error for nodes already down)."""
        self._in_parallel(self._halt, sorted(self._launched))
        self._launched.clear()

    def kill(self, i: int, *, restart: bool = True) -> None:
        """``kill -9`` node ``i``'s Erlang VM; with ``restart``, start it again on the same ports
        and data and wait until it runs in the cluster again."""
        self._up.discard(i)  # it is no node to ask from now on, whatever happens below
        self.nodes[i].kill_vm()
        if restart:
            self.start_node(i)

    def start_node(self, i: int) -> None:
        """Start node ``i`` again (killed or stopped); wait until it runs in the cluster."""
        self._boot(i)
        self._wait_running({i}, f"node {i} running in the cluster again")

    def stop_node(self, i: int) -> None:
        """Stop node ``i`` gracefully (its Erlang VM is gone afterwards)."""
        self._halt(i)

    def rolling_restart(self, on_restarted: Callable[[int], None] | None = None) -> None:
        """Restart every node in turn, as an operator upgrading the cluster would: wait until
        stopping it loses no quorum queue its majority, stop it, start it, wait until it runs in
        the cluster; then ``on_restarted(i)``."""
        for i, node in enumerate(self.nodes):
            self._wait_not_quorum_critical(node)
            self.stop_node(i)
            self.start_node(i)
            if on_restarted is not None:
                on_restarted(i)

    # -- questions -----------------------------------------------------------------------

    def running(self) -> list[int]:
        """Indexes of the nodes running in the cluster, as a live node sees it."""
        out = self.ctl("-q", "cluster_status", "--formatter", "json")
        names = set(json.loads(out).get("running_nodes", []))
        return [i for i, node in enumerate(self.nodes) if node.name in names]

    def node_of_port(self, port: int) -> int:
        """Index of the node whose AMQP port is ``port``."""
        for i, node in enumerate(self.nodes):
            if node.port == port:
                return i
        raise KeyError(f"no node of {self!r} listens on AMQP port {port}")

    def connection_nodes(self, name_contains: str) -> list[int]:
        """Indexes (sorted, distinct) of the nodes holding client connections whose
        ``connection_name`` contains ``name_contains``. ``list_connections`` does not name the
        node, so each connection is placed by the server port it came in on."""
        out = self.ctl("-q", "list_connections", "client_properties", "port", "--formatter", "json")
        rows: list[dict[str, object]] = json.loads(out) if out.strip() else []
        found: set[int] = set()
        for row in rows:
            name = _connection_name(row.get("client_properties"))
            if name is not None and name_contains in name:
                found.add(self.node_of_port(_as_int(row.get("port"))))
        return sorted(found)

    def leader_of(self, queue: str, vhost: str = "/") -> int:
        """Index of the node leading quorum queue ``queue`` (waits out a leader election)."""
        leader: list[int] = []

        def elected() -> bool:
            out = self.ctl(
                "-q", "list_queues", "-p", vhost, "name", "type", "leader", "--formatter", "json"
            )
            rows: list[dict[str, object]] = json.loads(out) if out.strip() else []
            for row in rows:
                if row.get("name") != queue:
                    continue
                if row.get("type") != "quorum":
                    raise RuntimeError(f"queue {queue!r} is {row.get('type')}, not quorum")
                names = [node.name for node in self.nodes]
                if row.get("leader") in names and names.index(str(row["leader"])) in self._up:
                    leader[:] = [names.index(str(row["leader"]))]
                    return True
            return False

        if not poll_until(elected, timeout=PORT_TIMEOUT, interval=0.2):
            raise RuntimeError(f"quorum queue {queue!r} in {vhost!r} has no leader on {self!r}")
        return leader[0]

    def move_leader(self, queue: str, i: int, vhost: str = "/") -> None:
        """Make node ``i`` the leader of quorum queue ``queue`` (Ra's leadership transfer) and
        wait until the cluster reports it so."""
        target = self.nodes[i].name

        def moved() -> bool:
            if self.leader_of(queue, vhost) == i:
                return True
            # the queue record names the Ra cluster and (its view of) the leader's node
            self.ctl(
                "eval",
                f'{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"{vhost}">>, queue, '
                f'<<"{queue}">>)), {{Name, _}} = amqqueue:get_pid(Q), '
                f"{{ok, _, Leader}} = ra:members({{Name, '{target}'}}), "
                f"ra:transfer_leadership(Leader, {{Name, '{target}'}}).",
            )
            return False

        if not poll_until(moved, timeout=PORT_TIMEOUT, interval=0.5):
            raise RuntimeError(f"quorum queue {queue!r}: leadership did not move to {target}")

    def queue_stats(self, vhost: str = "/") -> dict[str, dict[str, int]]:
        """Like `RabbitNode.queue_stats`, asked on a running node."""
        out = self.ctl(
            "-q", "list_queues", "-p", vhost, "name", *_STAT_FIELDS, "--formatter", "json"
        )
        return _parse_queue_stats(out)

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """``rabbitmqctl`` on the first running node (the next one if it cannot be reached)."""
        errors: list[str] = []
        for i in sorted(self._up):
            node = self.nodes[i]
            try:
                result = node._broker("ctl", node.name, *args, timeout=timeout)
            except subprocess.TimeoutExpired:
                errors.append(f"{node!r}: timed out after {timeout}s")
                continue
            if result.returncode == 0:
                return result.stdout
            if result.returncode != _CTL_UNAVAILABLE:
                raise RuntimeError(
                    f"rabbitmqctl {' '.join(args)} failed on {node!r} "
                    f"(exit {result.returncode}):\n{result.stderr}{result.stdout}"
                )
            errors.append(f"{node!r}: unreachable")
        raise RuntimeError(
            f"rabbitmqctl {' '.join(args)}: no running node of {self!r} answered: {errors}"
        )

    # -- helpers -------------------------------------------------------------------------

    def _boot(self, i: int) -> None:
        self._launched.add(i)
        self.nodes[i].start()
        self._up.add(i)

    def _halt(self, i: int) -> None:
        self._up.discard(i)
        self.nodes[i].stop()

    def _wait_running(self, wanted: set[int], what: str) -> None:
        def there() -> bool:
            try:
                return wanted <= set(self.running())
            except RuntimeError:  # no node answers for a moment
                return False

        if not poll_until(there, timeout=CLUSTER_TIMEOUT, interval=0.2):
            raise RuntimeError(f"{self!r}: no {what} after {CLUSTER_TIMEOUT:.0f}s")

    def _wait_not_quorum_critical(self, node: RabbitNode) -> None:
        last: list[str] = []

        def safe() -> bool:
            result = node.diagnostics("-q", "check_if_node_is_quorum_critical", timeout=60)
            last[:] = [result.stdout + result.stderr]
            return result.returncode == 0

        if not poll_until(safe, timeout=CLUSTER_TIMEOUT, interval=0.5):
            raise RuntimeError(
                f"{node!r} still quorum critical after {CLUSTER_TIMEOUT:.0f}s:\n{last[0]}"
            )

    @staticmethod
    def _in_parallel(action: Callable[[int], None], indexes: range | list[int]) -> None:
        """``action(i)`` for every index, each in a thread; raises the first error."""
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                action(i)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in indexes]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + START_TIMEOUT + 30
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            raise RuntimeError("a node did not start or stop in time")
        if errors:
            raise errors[0]


def _connection_name(client_properties: object) -> str | None:
    """``connection_name`` from rabbitmqctl's JSON client properties: ``[[key, type, value]]``."""
    if isinstance(client_properties, dict):
        value = client_properties.get("connection_name")
        return value if isinstance(value, str) else None
    if isinstance(client_properties, list):
        for entry in client_properties:
            if isinstance(entry, list) and len(entry) == 3 and entry[0] == "connection_name":
                return str(entry[2])
    return None
