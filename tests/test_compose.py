"""docker-compose.yml and docker-compose.cluster.yml, checked statically (no Docker engine here):
they parse, every command and health check they run exists in this repository, and their users get
a broker URL that works (in the cluster variant: one naming all three nodes)."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from aioqueue import App
from aioqueue.cli import dlq as admin
from aioqueue.cli.common import load_app
from services.web.service import create_app

ROOT = Path(__file__).resolve().parent.parent


COMPOSE_FILES = ("docker-compose.yml", "docker-compose.cluster.yml")
CLUSTER_FILE = "docker-compose.cluster.yml"
CLUSTER_NODES = ("rabbitmq1", "rabbitmq2", "rabbitmq3")


def compose(name: str = "docker-compose.yml") -> dict[str, Any]:
    data = yaml.safe_load((ROOT / name).read_text())
    assert isinstance(data, dict)
    return data


def test_rabbitmq_is_4x_with_management_and_a_healthcheck() -> None:
    rabbit = compose()["services"]["rabbitmq"]
    image = rabbit["image"]
    assert image.startswith("rabbitmq:4") and "management" in image
    assert "rabbitmq-diagnostics" in " ".join(rabbit["healthcheck"]["test"])
    assert "5672:5672" in rabbit["ports"]


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_every_python_command_names_a_runnable_module_and_a_real_app(name: str) -> None:
    services = compose(name)["services"]
    commands = [s["command"] for s in services.values() if "command" in s]
    assert commands, "no service runs a command"
    for command in commands:
        assert command[:2] == ["python", "-m"], command
        module = command[2]
        assert importlib.util.find_spec(f"{module}.__main__") or importlib.util.find_spec(module)
        app_specs = [arg for arg in command[3:] if ":" in arg and not arg.startswith("-")]
        for spec in app_specs:
            assert isinstance(load_app(spec), App)


def test_workers_wait_for_a_healthy_broker_and_use_the_env_url() -> None:
    for name, service in compose()["services"].items():
        if name == "rabbitmq" or "command" not in service:
            continue
        assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
        assert service["environment"]["AIOQUEUE_BROKER_URL"].startswith("amqp://")
        assert service.get("build") == "." or "image" in service


def test_dockerfile_installs_the_project() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "pip install" in text and "FROM python:3.11" in text


AIOQUEUE_SERVICES = ("worker", "scheduler", "web")


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_every_service_has_a_health_check(file: str) -> None:
    for name, service in compose(file)["services"].items():
        check = service.get("healthcheck", {}).get("test")
        assert check and check[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"
        assert not service["healthcheck"].get("disable"), name


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_the_aioqueue_health_checks_are_commands_that_parse(file: str) -> None:
    services = compose(file)["services"]
    for name in ("worker", "scheduler"):
        check = services[name]["healthcheck"]["test"]
        # `aioqueue status ...`: the console script the image installs, with valid options
        assert check[1] == "aioqueue", check
        args = admin.parser().parse_args(check[2:])
        assert args.command == "status" and args.interval == 0
        assert isinstance(load_app(args.app), App)
    assert (
        admin.parser().parse_args(services["worker"]["healthcheck"]["test"][2:]).min_consumers >= 1
    )
    assert (
        admin.parser()
        .parse_args(services["scheduler"]["healthcheck"]["test"][2:])
        .require_scheduler
    )


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_the_web_health_check_asks_a_route_the_service_has(file: str) -> None:
    web = compose(file)["services"]["web"]
    _, python, flag, code = web["healthcheck"]["test"]
    assert (python, flag) == ("python", "-c")
    compile(code, "healthcheck", "exec")
    (url,) = re.findall(r"'(http://[^']+)'", code)
    port = web["command"][web["command"].index("--port") + 1]
    assert url == f"http://127.0.0.1:{port}/health"
    routes = {r.resource.canonical for r in create_app(App("x")).router.routes() if r.resource}
    assert "/health" in routes


def test_the_stack_and_the_readme_give_the_brokers_own_url() -> None:
    # Given the broker's user in the compose file (guest cannot log in through Docker's ports)
    services = compose()["services"]
    env = services["rabbitmq"]["environment"]
    user, password = env["RABBITMQ_DEFAULT_USER"], env["RABBITMQ_DEFAULT_PASS"]
    # Then every aioqueue service is given a URL with that user, to the broker's service
    for name in AIOQUEUE_SERVICES:
        url = urlsplit(services[name]["environment"]["AIOQUEUE_BROKER_URL"])
        assert (url.scheme, url.username, url.password) == ("amqp", user, password), name
        assert (url.hostname, url.port) == ("rabbitmq", 5672), name
    # and the README tells a user of the stack the URL to use from the host
    host_url = f"amqp://{user}:{password}@localhost:5672/"
    assert "5672:5672" in services["rabbitmq"]["ports"]
    assert f"export AIOQUEUE_BROKER_URL={host_url}" in (ROOT / "README.md").read_text()


# --- docker-compose.cluster.yml -------------------------------------------------------------


def test_the_cluster_is_three_nodes_of_the_single_broker_image() -> None:
    services = compose(CLUSTER_FILE)["services"]
    image = compose()["services"]["rabbitmq"]["image"]
    nodes = {name: s for name, s in services.items() if "rabbitmq" in s.get("image", "")}
    assert sorted(nodes) == list(CLUSTER_NODES)
    ports = []
    for name, node in nodes.items():
        assert node["image"] == image, name
        assert node["hostname"] == name  # the node is rabbit@<hostname>, as the config names it
        assert "rabbitmq-diagnostics" in " ".join(node["healthcheck"]["test"]), name
        assert any(v.endswith(":/var/lib/rabbitmq") for v in node["volumes"]), name
        ports += [p for p in node["ports"] if p.endswith(":5672")]
    assert ports == ["5672:5672", "5673:5672", "5674:5672"]


def test_the_nodes_share_a_cookie_without_the_deprecated_variable() -> None:
    services = compose(CLUSTER_FILE)["services"]
    cookies = set()
    for name in CLUSTER_NODES:
        env = services[name]["environment"]
        assert "RABBITMQ_ERLANG_COOKIE" not in env, name
        # the node and the CLI tools in its container (health check) get the same cookie
        server = shlex.split(env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"])
        cli = shlex.split(env["RABBITMQ_CTL_ERL_ARGS"])
        cookie = server[server.index("-setcookie") + 1]
        assert cli[cli.index("-setcookie") + 1] == cookie, name
        cookies.add(cookie)
    assert len(cookies) == 1


def test_the_nodes_join_by_classic_peer_discovery_from_a_mounted_config() -> None:
    services = compose(CLUSTER_FILE)["services"]
    for name in CLUSTER_NODES:
        mounts = dict(v.split(":")[:2] for v in services[name]["volumes"] if v.startswith("./"))
        source = "./services/rabbitmq/cluster/rabbitmq.conf"
        target = mounts[source]
        assert target.startswith("/etc/rabbitmq/conf.d/") and target.endswith(".conf"), name
        config = (ROOT / source).read_text()
        # and the dead-letter re-send timeout of docs/deploying.md, "Delays on a cluster"
        advanced = "./services/rabbitmq/cluster/advanced.config"
        assert mounts[advanced] == "/etc/rabbitmq/advanced.config", name
        assert (
            "{dead_letter_worker_publisher_confirm_timeout, 10000}" in (ROOT / advanced).read_text()
        )
    settings = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition("=") for line in config.splitlines())
        if key.strip() and not key.strip().startswith("#")
    )
    assert settings["cluster_formation.peer_discovery_backend"] == "classic_config"
    listed = {v for k, v in settings.items() if k.startswith("cluster_formation.classic_config.")}
    assert listed == {f"rabbit@{services[name]['hostname']}" for name in CLUSTER_NODES}
    # aioqueue declares its queues' type itself: the cluster sets no default
    assert not any("default_queue_type" in key for key in settings)


def test_every_aioqueue_service_is_given_all_three_nodes() -> None:
    services = compose(CLUSTER_FILE)["services"]
    env = services["rabbitmq1"]["environment"]
    user, password = env["RABBITMQ_DEFAULT_USER"], env["RABBITMQ_DEFAULT_PASS"]
    assert (user, password) == ("aioqueue", "aioqueue")  # as in docker-compose.yml
    for name in AIOQUEUE_SERVICES:
        service = services[name]
        environment = service["environment"]
        assert set(environment) == {"AIOQUEUE_BROKER_URL"}, name  # no queue type, just the URLs
        urls = [urlsplit(url) for url in environment["AIOQUEUE_BROKER_URL"].split(",")]
        assert [(u.hostname, u.port) for u in urls] == [(n, 5672) for n in CLUSTER_NODES], name
        for url in urls:
            assert (url.scheme, url.username, url.password, url.path) == (
                "amqp",
                user,
                password,
                "/",
            ), name
        assert {n: d["condition"] for n, d in service["depends_on"].items()} == dict.fromkeys(
            CLUSTER_NODES, "service_healthy"
        ), name
        assert service.get("build") == "." or "image" in service


def test_the_cluster_file_says_how_it_is_checked_and_used() -> None:
    text = (ROOT / CLUSTER_FILE).read_text()
    header = text[: text.index("\nx-")]
    assert "docker compose -f docker-compose.cluster.yml up -d" in header
    assert "no Docker engine" in header
    host_urls = ",".join(f"amqp://aioqueue:aioqueue@localhost:{p}/" for p in (5672, 5673, 5674))
    assert f"export AIOQUEUE_BROKER_URL={host_urls}" in header
