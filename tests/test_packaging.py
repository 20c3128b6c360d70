"""What pyproject.toml promises a user who installs the package: its name, pins and extras."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = "aioqueue-rabbit"  # "aioqueue" on PyPI is an unrelated project


def project() -> dict[str, Any]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    table = data["project"]
    assert isinstance(table, dict)
    return table


def requirement(name: str, requirements: list[str]) -> str:
    """The requirement string naming the distribution ``name``."""
    for req in requirements:
        if re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower() == name:
            return req
    raise AssertionError(f"{name} is not declared in {requirements}")


def test_libraries_whose_internals_we_use_are_pinned_to_their_tested_major_line() -> None:
    dependencies = project()["dependencies"]
    # Given aio-pika 10 and aiormq 7 (internals used by _wire and _publisher), pamqp 4
    for name, line in (("aio-pika", "<11"), ("aiormq", "<8"), ("pamqp", "<5")):
        # Then each requirement stops before the next major version
        assert line in requirement(name, dependencies), requirement(name, dependencies)


def imported_modules() -> set[str]:
    """Top-level names of every module that aioqueue's code imports, outside the stdlib."""
    names: set[str] = set()
    for path in (ROOT / "aioqueue").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
    return names - set(sys.stdlib_module_names) - {"aioqueue", "pytest"}


def test_every_library_imported_directly_is_declared() -> None:
    # Given every distribution that provides a module aioqueue imports
    provided_by = importlib.metadata.packages_distributions()
    imported = {dist.lower() for m in imported_modules() for dist in provided_by.get(m, [m])}
    # Then each is a dependency, or belongs to an optional extra
    table = project()
    declared = [*table["dependencies"]]
    for requirements in table["optional-dependencies"].values():
        declared.extend(requirements)
    for name in sorted(imported):
        requirement(name.replace("_", "-"), declared)


def test_the_distribution_name_is_ours_and_the_import_package_is_aioqueue() -> None:
    # Given "aioqueue" on PyPI belongs to an unrelated project
    name = project()["name"]
    assert name == DISTRIBUTION != "aioqueue"
    # Then it is the one installed here, and it ships the import package `aioqueue`
    assert importlib.metadata.distribution(DISTRIBUTION).metadata["Name"] == DISTRIBUTION
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
    assert wheel["targets"]["wheel"]["packages"] == ["aioqueue"]
    # and every install hint, in the README, the docs and the code, names the distribution
    readme = (ROOT / "README.md").read_text()
    assert f"pip install {DISTRIBUTION}" in readme
    texts = [readme, *(p.read_text() for p in (ROOT / "docs").glob("*.md"))]
    texts += [p.read_text() for p in (ROOT / "aioqueue").rglob("*.py")]
    for text in texts:
        assert not re.search(r"pip install ['\"]?aioqueue\[", text), (
            "a hint installs the wrong project"
        )
