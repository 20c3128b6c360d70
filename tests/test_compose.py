"""docker-compose.yml parses, and every command it runs exists in this repository."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import yaml

from aioqueue import App
from aioqueue.cli import load_app

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
