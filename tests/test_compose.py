"""docker-compose.yml, checked statically (no Docker engine here): it parses, every command and
health check it runs exists in this repository, and its users get a broker URL that works."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from aioqueue import App
from aioqueue.cli import dlq as admin
from aioqueue.cli.common import load_app
from services.web.service import create_app

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_rabbitmq_is_4x_with_management_and_a_healthcheck() -> None:
    rabbit = compose()["services"]["rabbitmq"]
    image = rabbit["image"]
    assert image.startswith("rabbitmq:4") and "management" in image
    assert "rabbitmq-diagnostics" in " ".join(rabbit["healthcheck"]["test"])
    assert "5672:5672" in rabbit["ports"]


def test_every_python_command_names_a_runnable_module_and_a_real_app() -> None:
    services = compose()["services"]
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


def test_every_service_has_a_health_check() -> None:
    for name, service in compose()["services"].items():
        check = service.get("healthcheck", {}).get("test")
        assert check and check[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"
        assert not service["healthcheck"].get("disable"), name


def test_the_aioqueue_health_checks_are_commands_that_parse() -> None:
    services = compose()["services"]
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


def test_the_web_health_check_asks_a_route_the_service_has() -> None:
    web = compose()["services"]["web"]
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
