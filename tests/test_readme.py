"""What the README and the docs pages say stays true.

Every `python scripts/...` line of a command block names a script that exists and every training command
composes. Every command block is run, top to bottom per page as a reader would, with a small trained
checkpoint in place of `<file.ckpt>`-like placeholders; a block that cannot run in seconds (it trains for
long, needs your run folders, a server, a GPU or the network) carries an HTML comment
`<!-- docs-test: skip (why) -->` on the line above and is counted here as one skipped test with its
reason. Links from the README resolve, and the results page is exactly what the report command writes
from its committed runs.json.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

from conftest import compose_config, require_extra

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SKIP_MARKER = re.compile(r"<!-- docs-test: skip \((?P<reason>[^)]+(?:\([^)]*\)[^)]*)*)\) -->")
# A path with a placeholder that ends in .ckpt: the test's checkpoint (its calibrated copy where named).
CKPT_PLACEHOLDER = re.compile(
    r"(?:[^\s=\"'<]|<[^>\n]*>)*(?:<[^>\n]*\.ckpt>|<[^>\n]*>(?:[^\s=\"'<]|<[^>\n]*>)*\.ckpt)"
)
RESULTS = ROOT / "docs" / "results"


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    language: str
    text: str
    skip_reason: str | None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def read_blocks(page: Path) -> list[Block]:
    """The bash and python blocks of a page, each with the reason it is not run, if marked."""
    text = page.read_text()
    blocks = []
    for match in re.finditer(r"^```(bash|python)\n(.*?)^```", text, flags=re.S | re.M):
        before = text[: match.start()].rstrip("\n").splitlines()
        marker = SKIP_MARKER.search(before[-1]) if before else None
        line = text[: match.start()].count("\n") + 1
        reason = marker.group("reason") if marker else None
        blocks.append(Block(page, line, match.group(1), match.group(2), reason))
    return blocks


BLOCKS = [block for page in PAGES for block in read_blocks(page)]
COMMANDS = [
    line.split(" #")[0].strip()
    for block in BLOCKS
    if block.language == "bash"
    # A command continued with a trailing backslash is one command.
    for line in block.text.replace("\\\n", " ").splitlines()
    if line.strip().startswith("python scripts/")
]
TRAIN_COMMANDS = sorted({c for c in COMMANDS if c.startswith("python scripts/train.py")})
RUN_PAGES = sorted({b.page for b in BLOCKS if b.skip_reason is None}, key=PAGES.index)


def test_the_pages_hold_commands_and_say_how_to_test():
    assert TRAIN_COMMANDS and RUN_PAGES
    readme = (ROOT / "README.md").read_text()
    assert 'pytest -m "not slow"' in readme and "\npytest " in readme


@pytest.mark.parametrize("command", sorted(set(COMMANDS)))
def test_every_script_the_pages_run_exists(command):
    assert (ROOT / shlex.split(command)[1]).is_file()


def first_of_sweep(override: str) -> str:
    """`key=a,b,c` of a multirun as its first job has it: `key=a` (lists in brackets stay whole)."""
    key, _, value = override.partition("=")
    if "," in value and not value.startswith(("[", "'[", '"[')):
        value = value.split(",")[0]
    return f"{key}={value}" if _ else override


# Config choices that only an extra's Hydra plugin provides: where the extra is missing, the command is
# skipped with its name (require_extra), as a user without it would be told to install it.
EXTRA_OF_CHOICE = {"hparams_search=": ("hydra_plugins.hydra_optuna_sweeper", "sweep")}


@pytest.mark.parametrize("command", TRAIN_COMMANDS)
def test_every_train_command_composes(command, tmp_path):
    words = shlex.split(command)[2:]
    for prefix, (module, extra) in EXTRA_OF_CHOICE.items():
        if any(w.startswith(prefix) for w in words):
            require_extra(module, extra)
    options = {"-m", "--multirun", "--cfg", "job", "--resolve"}
    overrides = [first_of_sweep(w) for w in words if w not in options and not w.startswith("hydra")]
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


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.skip_reason], ids=lambda b: b.name)
def test_blocks_not_run_say_why(block):
    """Counted in the summary as skipped, with the page's reason; a marker without one would not match."""
    pytest.skip(f"{block.name}: {block.skip_reason}")


def test_every_marker_stands_above_a_block():
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("<!-- docs-test"):
                assert SKIP_MARKER.fullmatch(line.strip()), f"{page}:{i + 1}: <!-- docs-test: skip (why) -->"
                assert lines[i + 1].startswith(("```bash", "```python")), f"{page}:{i + 1}: no block below"


@pytest.fixture
def reader_dir(trained_run: Path, tmp_path: Path) -> Path:
    """A folder to run the pages' commands in, as a user's clone: scripts/, conf/ and examples/ of the
    project, and a trained checkpoint at run/checkpoints/epoch_000.ckpt; outputs stay in it."""
    for name in ("scripts", "conf", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    best = next((trained_run / "checkpoints").glob("epoch_*.ckpt"))
    shutil.copy(best, checkpoints / "epoch_000.ckpt")
    return tmp_path


def runnable(block: Block, checkpoint: Path) -> str:
    """The block's text with the checkpoint in place of its placeholders; any other placeholder fails."""
    calibrated = checkpoint.with_name(f"{checkpoint.stem}.calibrated.ckpt")

    def checkpoint_for(match: re.Match) -> str:
        return str(calibrated if "calibrated" in match.group(0) else checkpoint)

    text = CKPT_PLACEHOLDER.sub(checkpoint_for, block.text)
    leftover = re.search(r"<[a-z][^>]*>", text)
    assert leftover is None, (
        f"{block.name}: {leftover.group(0)} is no placeholder the test can fill: mark the block "
        "<!-- docs-test: skip (why) --> or give a real path"
    )
    return text


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_block_of_the_page_runs(page, reader_dir, real_data_dir):
    env = os.environ | {"PROJECT_ROOT": str(reader_dir), "DATA_DIR": str(real_data_dir)}
    checkpoint = reader_dir / "run" / "checkpoints" / "epoch_000.ckpt"
    for block in (b for b in read_blocks(page) if b.skip_reason is None):
        text = runnable(block, checkpoint)
        if "scripts/export.py" in text or "onnxruntime" in text:
            require_extra("onnxruntime", "export")
        if block.language == "python":
            commands = [[sys.executable, "-c", text]]
        else:
            lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
            commands = [["bash", "-c", line] for line in lines]
        for command in commands:
            result = subprocess.run(
                command, cwd=reader_dir, env=env, capture_output=True, text=True, timeout=300
            )
            assert result.returncode == 0, f"{block.name}: {command[-1]}\n{result.stderr[-3000:]}"


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, as MkDocs (and GitHub, for these headings) make them."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {slugify(m.group(1).strip(), "-") for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_readme_links_resolve():
    readme = ROOT / "README.md"
    links = re.findall(r"\]\(([^)\s]+)\)", re.sub(r"^```.*?^```", "", readme.read_text(), flags=re.S | re.M))
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert any(link.startswith("docs/") for link in local)
    for link in local:
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else readme
        assert target.is_file(), f"README links to {link}: no such file"
        if anchor:
            assert anchor in anchors(target), f"README links to {link}: no such heading in {path or 'README'}"


def test_ci_runs_the_readme_test_command_and_builds_the_docs():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    readme = (ROOT / "README.md").read_text()
    test_block = readme.split("**Test**", 1)[1]
    commands = re.search(r"```bash\n(.*?)```", test_block, flags=re.S).group(1).splitlines()
    ci_pytest = [line for line in ci_lines if line.startswith("pytest")]
    # CI runs the README's command; --durations only adds the list of the slowest tests to its output.
    assert ci_pytest and ci_pytest[0].split(" --durations")[0] in [c.split("#")[0].strip() for c in commands]
    assert any(line.startswith("mkdocs build --strict") for line in ci_lines)


@pytest.mark.slow  # draws every figure of the page again: 20 s on 2 cores
def test_results_page_is_what_the_report_writes_from_runs_json(tmp_path):
    """Numbers on the results page come only from the report command: from the committed runs.json it
    writes the same page; without a runs.json the page is the placeholder, which holds no number."""
    page = (RESULTS / "index.md").read_text()
    runs_file = RESULTS / "runs.json"
    if not runs_file.is_file():
        prose = re.sub(r"```.*?```|`[^`]*`", "", page, flags=re.S)
        assert not re.search(r"\d", prose) and "python scripts/report.py" in page
        return
    from mnist_adder.reporting.results_page import build_results

    again, _ = build_results([runs_file], tmp_path)
    assert again.read_text() == page, "docs/results/index.md differs from what runs.json gives: regenerate it"
    for figure in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page):
        assert (RESULTS / figure).is_file() and (tmp_path / figure).is_file(), figure
