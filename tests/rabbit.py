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

from tests.waiting import poll_until

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
BROKER_SH = REPO_ROOT / "services" / "rabbitmq" / "broker.sh"

START_TIMEOUT = 180.0  # broker.sh itself gives up after 120 s
PORT_TIMEOUT = 60.0
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


class RabbitNode:
    """One private RabbitMQ node: ``RabbitNode(dir).start()``, then connect to ``node.url``."""

    def __init__(
        self, base_dir: pathlib.Path, *, name: str | None = None, extra_conf: str = ""
    ) -> None:
        self.base_dir = pathlib.Path(base_dir).resolve()
        if name is None:
            name = f"aioqueue-test-{os.getpid()}-{secrets.token_hex(3)}"
        self.name = name if "@" in name else f"{name}@localhost"
        self.extra_conf = extra_conf
        self.port = free_port()
        self.dist_port = free_port(exclude=frozenset({self.port}))
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
        pid = self._read_pid() or self.pid
        if pid is None:
            raise RuntimeError(f"{self!r}: no pid known; is it running?")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not poll_until(lambda: _pid_gone(pid), timeout=30):
            raise RuntimeError(f"{self!r}: pid {pid} survived SIGKILL for 30 s")
        self.pid = None
        self.start()

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

    def close_all_connections(self) -> None:
        self.ctl("close_all_connections", "--global", "closed by the aioqueue tests")

    def queue_stats(self, vhost: str = "/") -> dict[str, dict[str, int]]:
        """``{queue: {"messages", "messages_ready", "messages_unacknowledged", "consumers"}}``."""
        fields = ("messages", "messages_ready", "messages_unacknowledged", "consumers")
        out = self.ctl("-q", "list_queues", "-p", vhost, "name", *fields, "--formatter", "json")
        rows: list[dict[str, object]] = json.loads(out) if out.strip() else []
        # A queue that is down reports "" instead of numbers: counted as 0.
        return {str(row["name"]): {f: _as_int(row.get(f)) for f in fields} for row in rows}

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
