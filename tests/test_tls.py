"""``amqps://`` with verification on by default, against a node of this module's own.

The test makes its own CA (and a second, unrelated one) with the ``openssl`` command, a server
certificate for 127.0.0.1 and a client certificate; the node requires a client certificate
(``verify_peer`` + ``fail_if_no_peer_cert``).
"""

from __future__ import annotations

import logging
import shutil
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aioqueue import App, BrokerConnectionError, Settings
from tests.conftest import running_worker
from tests.rabbit import RabbitNode, free_port
from tests.test_reconnect import connection_of

PASSWORD = "tls-s3cret-pw"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN=aioqueue test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _make_leaf(d: Path, name: str, usage: str) -> None:
    (d / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    _openssl(
        "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
        "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
        cwd=d,
    )  # fmt: skip


def make_certs(d: Path) -> Certs:
    d.mkdir(parents=True, exist_ok=True)
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_leaf(d, "server", "serverAuth")
    _make_leaf(d, "client", "clientAuth")
    return Certs(
        ca=d / "ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        other_ca=d / "other-ca.pem",
    )


@dataclass(frozen=True)
class TlsNode:
    node: RabbitNode
    certs: Certs
    port: int

    def url(self, *, ca: Path | None = None, client_cert: bool = True) -> str:
        query = [f"cafile={ca or self.certs.ca}"]
        if client_cert:
            query += [f"certfile={self.certs.client_cert}", f"keyfile={self.certs.client_key}"]
        return f"amqps://tls:{PASSWORD}@127.0.0.1:{self.port}/?{'&'.join(query)}"


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsNode]:
    base = tmp_path_factory.mktemp("rabbit-tls")
    certs = make_certs(base / "certs")
    node = RabbitNode(base / "node")
    port = free_port(exclude=frozenset({node.port, node.dist_port}))
    node.extra_conf = (
        f"listeners.ssl.default = {port}\n"
        f"ssl_options.cacertfile = {certs.ca}\n"
        f"ssl_options.certfile = {certs.server_cert}\n"
        f"ssl_options.keyfile = {certs.server_key}\n"
        "ssl_options.verify = verify_peer\n"
        "ssl_options.fail_if_no_peer_cert = true\n"
    )
    node.start()
    try:
        node.ctl("add_user", "tls", PASSWORD)
        node.ctl("set_permissions", "-p", "/", "tls", ".*", ".*", ".*")
        yield TlsNode(node, certs, port)
    finally:
        node.stop()


async def test_round_trip_over_amqps_with_verification_on(tls_node: TlsNode) -> None:
    # Given an amqps:// URL naming the CA and the client certificate
    app = App("tls", broker_url=tls_node.url(), default_queue=f"tls.{uuid.uuid4().hex[:8]}")

    @app.task(name="tls.add")
    async def add(x: int, y: int) -> int:
        return x + y

    # When a task goes through a worker over TLS
    async with app, running_worker(app):
        # Then the result comes back, over a verified connection
        assert await (await add.submit(2, 3)).result(timeout=30) == 5
        assert connection_of(app).transport.connection.ssl_certs.verify is True


async def test_an_ssl_context_in_settings_is_used(tls_node: TlsNode) -> None:
    # Given a verifying SSLContext of the user's own and a URL without TLS options
    context = ssl.create_default_context(cafile=str(tls_node.certs.ca))
    context.load_cert_chain(str(tls_node.certs.client_cert), str(tls_node.certs.client_key))
    url = f"amqps://tls:{PASSWORD}@127.0.0.1:{tls_node.port}/"
    queue = f"tls.{uuid.uuid4().hex[:8]}"
    app = App("tls", broker_url=url, default_queue=queue, settings=Settings(ssl_context=context))

    @app.task(name="tls.echo")
    async def echo(x: str) -> str:
        return x

    # When a task goes through a worker, Then it comes back
    async with app, running_worker(app):
        assert await (await echo.submit("hi")).result(timeout=30) == "hi"


async def test_a_server_certificate_from_another_ca_is_refused_clearly(
    tls_node: TlsNode, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a URL trusting a CA that did not sign the broker's certificate
    caplog.set_level(logging.DEBUG)
    app = App(
        "tls",
        broker_url=tls_node.url(ca=tls_node.certs.other_ca),
        settings=Settings(connect_timeout=5),
    )
    # When connecting, Then a clear BrokerConnectionError says why, without the password
    with pytest.raises(BrokerConnectionError) as info:
        await app.connect()
    message = str(info.value)
    assert "CERTIFICATE_VERIFY_FAILED" in message or "certificate verify failed" in message
    assert f"tls:****@127.0.0.1:{tls_node.port}" in message
    for text in (message, repr(info.value), caplog.text, repr(app)):
        assert PASSWORD not in text


async def test_a_client_without_a_certificate_is_refused(
    tls_node: TlsNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    app = App(
        "tls", broker_url=tls_node.url(client_cert=False), settings=Settings(connect_timeout=3)
    )
    with pytest.raises(BrokerConnectionError) as info:
        await app.connect()
    for text in (str(info.value), caplog.text):
        assert PASSWORD not in text


async def test_plain_amqp_still_works_on_the_tls_node(tls_node: TlsNode) -> None:
    async with App("tls", broker_url=tls_node.node.url) as app:
        assert app.broker.connected
