"""The README's commands stay true: its train commands compose, its scripts exist, CI runs its tests."""

import re
import shlex
from pathlib import Path

import pytest

from conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
COMMANDS = [
    line.split("#")[0].strip()
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    for line in block.splitlines()
    if line.strip().startswith("python scripts/")
]
TRAIN_RUNS = [c for c in COMMANDS if c.startswith("python scripts/train.py") and " -m " not in f"{c} "]


def test_readme_lists_commands():
    assert TRAIN_RUNS and "pytest" in README


@pytest.mark.parametrize("command", COMMANDS)
def test_every_script_the_readme_runs_exists(command):
    assert (ROOT / shlex.split(command)[1]).is_file()


@pytest.mark.parametrize("command", TRAIN_RUNS)
def test_every_train_command_in_the_readme_composes(command, tmp_path):
    overrides = [o for o in shlex.split(command)[2:] if not o.startswith("hydra.")]
    cfg = compose_config(overrides, tmp_path)
    assert cfg.model._target_ and cfg.trainer._target_


def test_ci_runs_the_test_command_the_development_page_gives():
    # docs/development.md's "Tests" section gives the commands; CI runs the one for everything.
    tests_section = (
        (ROOT / "docs" / "development.md").read_text().split("## Tests", 1)[1].split("\n## ", 1)[0]
    )
    documented = [
        line.split("#")[0].strip()
        for block in re.findall(r"```bash\n(.*?)```", tests_section, flags=re.S)
        for line in block.splitlines()
    ]
    ci_pytest = [
        line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("pytest")
    ]
    assert ci_pytest and ci_pytest[0] in documented
    assert 'pytest -m "not slow"' in documented
