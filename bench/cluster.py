"""A private 3-node RabbitMQ cluster for the cluster run (``services/rabbitmq/broker.sh``).

``broker.sh start-cluster DIR BASE_PORT`` names its nodes ``aioqueue-cluster-1..3@localhost``
whatever the directory, and keeps a node of that name that is already running (from
``make cluster``, say) even if it listens elsewhere: so the bench refuses to start while epmd
knows one of those names, and picks a base port whose three AMQP ports and three distribution
ports (+20000) are all free.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from .machine import listener_pid
from .procs import ROOT, BenchError
from .suite import progress

__all__ = ["NODES", "cluster"]

BROKER_SH = ROOT / "services" / "rabbitmq" / "broker.sh"
NODES = 3
NODE_NAMES = tuple(f"aioqueue-cluster-{i}" for i in range(1, NODES + 1))
FIRST_PORT = 16000
DIST_OFFSET = 20000  # broker.sh: distribution port = AMQP port + 20000
START_TIMEOUT = 600.0
STOP_TIMEOUT = 300.0


def _port_free(port: int) -> bool:
    for host in ("0.0.0.0", "127.0.0.1"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def free_base_port(start: int = FIRST_PORT, step: int = 10, tries: int = 100) -> int:
    """The first base port from ``start`` (in ``step``s) with its 3 + 3 ports free."""
    for base in range(start, start + step * tries, step):
        ports = [base + i for i in range(NODES)]
        if all(_port_free(p) and _port_free(p + DIST_OFFSET) for p in ports):
            return base
    raise BenchError(f"no free ports for a cluster from {start} upward")


def epmd_names() -> set[str]:
    """The node names epmd knows on this machine (empty if epmd does not run)."""
    try:
        with socket.create_connection(("127.0.0.1", 4369), timeout=5) as sock:
            sock.sendall(b"\x00\x01n")  # NAMES_REQ
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except OSError:
        return set()
    # 4 bytes of epmd's port, then "name NAME at port PORT\n" lines
    return {line.split()[1] for line in data[4:].decode(errors="replace").splitlines() if line}


def _stop(directory: Path) -> None:
    done = subprocess.run(
        [str(BROKER_SH), "stop-cluster", str(directory)],
        stdin=subprocess.DEVNULL,
        timeout=STOP_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"broker.sh stop-cluster {directory} exited {done.returncode}")


@contextlib.contextmanager
def cluster() -> Iterator[tuple[list[str], tuple[int, ...]]]:
    """([URL of node 1, 2, 3], their pids) of a private 3-node cluster for the block."""
    taken = sorted(set(NODE_NAMES) & epmd_names())
    if taken:
        raise BenchError(
            f"node(s) {', '.join(taken)} already run on this machine (make cluster?): "
            "broker.sh start-cluster would reuse them; stop them first (make stop-cluster)"
        )
    base = free_base_port()
    directory = Path(tempfile.mkdtemp(prefix="aioqueue-bench-cluster-"))
    ports = f"AMQP ports {base}..{base + NODES - 1}"
    progress(f"starting a {NODES}-node RabbitMQ cluster in {directory} ({ports}) ...")
    try:
        try:
            done = subprocess.run(
                [str(BROKER_SH), "start-cluster", str(directory), str(base)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                timeout=START_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"the cluster did not start within {START_TIMEOUT:g}s") from None
        lines = done.stdout.decode(errors="replace").strip().splitlines()
        if done.returncode != 0 or not lines:
            raise BenchError(f"broker.sh start-cluster exited {done.returncode}")
        urls = lines[-1].split(",")
        if len(urls) != NODES:
            raise BenchError(f"broker.sh start-cluster printed {lines[-1]!r}, not {NODES} URLs")
        pids = tuple(pid for url in urls if (pid := listener_pid(urlsplit(url).port or 5672)))
        yield urls, pids
    finally:
        progress("stopping the cluster ...")
        try:
            _stop(directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
