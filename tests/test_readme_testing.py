"""The README's "Testing your code without a broker" examples pass as written in a new project.

The project is what the README tells a user to make: the examples as test files, and the pytest
configuration the README shows; run with this environment's pytest (the package and its
``testing`` extra installed), outside this repository's own pytest configuration.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.conftest import ROOT

SECTION = "## Testing your code without a broker"


def readme_blocks(language: str) -> list[str]:
    """The ``language`` code blocks of the README's testing section, in order."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    section = readme[start : end if end != -1 else None]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.DOTALL)


def write_project(root: Path, config: str) -> int:
    """The README's examples as test files under ``root``; returns how many tests they hold."""
    (root / "pyproject.toml").write_text(config)
    tests = 0
    for i, code in enumerate(readme_blocks("python")):
        (root / f"test_readme_{i}.py").write_text(code)
        tests += len(re.findall(r"^async def test_|^def test_", code, flags=re.MULTILINE))
    return tests


def pytest_in(root: Path, *options: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHONPATH"))}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_testing_extra_brings_pytest_and_pytest_asyncio() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] for r in extras["testing"]}
    assert names == {"pytest", "pytest-asyncio"}
    assert 'pip install "aioqueue-rabbit[testing]"' in "".join(readme_blocks("bash"))


def test_the_readme_testing_examples_pass_as_written(tmp_path: Path) -> None:
    # Given a new project with the README's examples and the configuration it shows
    (config,) = readme_blocks("toml")
    expected = write_project(tmp_path, config)
    assert expected >= 4
    # When its tests run (warnings as errors: the configuration leaves none)
    result = pytest_in(tmp_path, "-W", "error")
    # Then every one of them passes
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"{expected} passed" in result.stdout, output


def test_without_the_configuration_pytest_cannot_run_them(tmp_path: Path) -> None:
    # Given the same project without the README's configuration (the trip it had)
    write_project(tmp_path, "[project]\nname = 'shop'\nversion = '0'\n")
    # Then pytest fails them, saying why: the README's instruction is needed
    result = pytest_in(tmp_path)
    assert result.returncode != 0
    assert "async def functions are not natively supported" in result.stdout + result.stderr
