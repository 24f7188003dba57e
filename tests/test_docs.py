"""Every code block of README.md and docs/*.md runs, so the documentation cannot drift.

The rules, per page:

- ```` ```python ```` blocks run in order in one namespace (later blocks see what earlier
  ones defined), in a fresh temporary working directory.
- A hidden ``<!-- docs-test-setup ... -->`` comment holds Python that runs just before the
  page's next block: the files or objects a block reads, which a reader has already.
- In ```` ```bash ```` blocks, every command (``\\`` continuations joined, ``&&`` chains
  split, comments dropped) that starts with ``csgd`` (or ``torchrun ... -m csgd_cli``) is
  composed through Hydra and validated as the CLI does before it starts a job, every point
  of a ``-m`` sweep, Hydra's own keys (launchers, run directories) included; nothing is
  trained and no file or data set is read. ``python scripts/x.py`` and ``scripts/x.sh``
  must exist. Anything else (pip, pytest, tensorboard) is not run.
- Blocks of any other language, or none (printed output), are text.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(
    r"<!-- docs-test-setup[^\n]*\n(?P<setup>.*?)-->|^```(?P<lang>[\w-]*)\n(?P<code>.*?)^```",
    re.S | re.M,
)


def blocks(page: Path) -> list[tuple[str, str, int]]:
    """(language or "setup", code, line) of every fenced block and setup comment."""
    text = page.read_text()
    out = []
    for m in _BLOCK.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        if m["setup"] is not None:
            out.append(("setup", m["setup"], line))
        else:
            out.append((m["lang"], m["code"], line))
    return out


def commands(code: str) -> list[list[str]]:
    """The shell commands of a bash block, each split into words."""
    joined = re.sub(r"\\\n", " ", code)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            out.append(words[:cut])
            words = words[cut + 1 :]
    return [w for w in out if w]


def csgd_call(words: list[str]) -> tuple[str, list[str]] | None:
    """(stage, arguments) of a csgd command, None for any other command."""
    if words[0] == "csgd":
        return words[1], words[2:]
    if words[0] == "torchrun" and "csgd_cli" in words:
        i = words.index("csgd_cli")
        if words[i - 1] == "-m":
            return words[i + 1], words[i + 2 :]
    return None


def _python_pages() -> list[Path]:
    return [p for p in PAGES if any(lang == "python" for lang, _, _ in blocks(p))]


def _bash_commands() -> list[tuple[str, list[str]]]:
    out = []
    for page in PAGES:
        for lang, code, line in blocks(page):
            if lang in ("bash", "sh", "shell", "console"):
                out += [(f"{page.name}:{line}", w) for w in commands(code)]
    return out


def test_every_page_is_found_and_linked_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(PAGES) > 1
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).exists(), f"README.md links {target}, which does not exist"


@pytest.mark.parametrize("page", _python_pages(), ids=lambda p: p.name)
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for lang, code, line in blocks(page):
        if lang in ("python", "setup"):
            # blank lines up front: a traceback's line number is the page's
            source = "\n" * line + code
            exec(compile(source, str(page.relative_to(ROOT)), "exec"), scope)
    if page.name in AFTER:
        AFTER[page.name](scope, tmp_path)


def _readme_example_holds(scope: dict[str, Any], cwd: Path) -> None:
    """What the README's own-loop example promises beyond its final assert."""
    from torch import nn

    pruner, thin = scope["pruner"], scope["thin"]
    assert pruner.ready() and pruner.chi() < 1e-8 * pruner.chi_report()["chi"] + 1e-6
    assert pruner.merge_report["relative_logit_diff"] < 1e-5
    assert pruner.merge_report["params_after"] < pruner.merge_report["params_before"]
    assert (cwd / "pruned.pt").is_file()
    convs = [m for m in thin.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16]  # ratio 0.5 of 16 and 32


# checks run on a page's namespace once its blocks ran
AFTER: dict[str, Callable[[dict[str, Any], Path], None]] = {"README.md": _readme_example_holds}


def test_bash_commands_compose_and_validate() -> None:
    """Every documented ``csgd`` command composes (its keys exist, its values type-check)
    and passes the config's validation, at every point of a sweep."""
    from hydra import compose, initialize_config_dir

    from csgd_cli.common.config import STAGES, register_schema, validate
    from csgd_cli.runner.cli import config_dir, expand_sweep

    register_schema()
    calls = [(where, c) for where, words in _bash_commands() if (c := csgd_call(words))]
    assert len(calls) >= 20, calls  # the pages document at least this many
    checked = 0
    for where, (stage, args) in calls:
        assert stage in STAGES, f"{where}: `csgd {stage}` is not a stage"
        overrides = [a for a in args if not a.startswith("-") and a != "..."]
        points = _covering(expand_sweep(overrides)) if "-m" in args else [overrides]
        with initialize_config_dir(str(config_dir()), version_base="1.3", job_name=stage):
            for i, point in enumerate(points):
                try:
                    if i == 0:  # Hydra's own keys too (launchers, run directories)
                        compose(config_name=stage, overrides=point, return_hydra_config=True)
                    validate(compose(config_name=stage, overrides=_not_hydra(point)))
                except Exception as e:
                    raise AssertionError(f"{where}: csgd {stage} {' '.join(point)}: {e}") from e
                checked += 1
    assert checked >= len(calls)


def _covering(points: list[list[str]]) -> list[list[str]]:
    """Sweep points that, together, hold every value of every swept key (a 7 x 2 x 3 grid
    needs 7, not 42): each value is composed at least once."""
    seen: set[str] = set()
    out = []
    for point in points:
        if not set(point) <= seen:
            out.append(point)
            seen |= set(point)
    return out


def _not_hydra(point: list[str]) -> list[str]:
    return [a for a in point if a.lstrip("+~").split("=")[0].split("/")[0].split(".")[0] != "hydra"]


def test_paths_the_pages_name_exist() -> None:
    """A file or folder of the repository named in a page (`csgd_cli/...`, `scripts/...`,
    `tests/...`, `conf/...`, `docs/...`) is there: a moved module fails here."""
    gone = []
    for page in PAGES:
        for path in re.findall(
            r"`((?:csgd_cli|scripts|tests|conf|docs)/[^`\s<>*]+)`", page.read_text()
        ):
            if not (ROOT / path.split(":")[0]).exists():
                gone.append(f"{page.name}: {path}")
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in link and not (page.parent / link).exists():
                gone.append(f"{page.name}: link {link}")
    assert not gone, gone


def test_documented_scripts_exist() -> None:
    for where, words in _bash_commands():
        script = next((w for w in words[:2] if w.startswith("scripts/")), None)
        if script is not None:
            assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
            if words[0] != "python":
                assert os.access(ROOT / script, os.X_OK), f"{where}: {script} is not executable"


def test_the_architecture_page_names_every_module_with_its_floor() -> None:
    """docs/ARCHITECTURE.md's module table: every module of the package, at the floor
    ``tests/test_architecture.py`` gives its subpackage, no module that is gone, and for
    each the test files that test it, which exist."""
    from test_architecture import FLOORS

    pkg = ROOT / "csgd_cli"
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    named: dict[str, int] = {}
    for floor, cell in re.findall(r"^\| (\d+) \| (.+?) \|", text, re.M):
        named.update({path: int(floor) for path in re.findall(r"`([\w/]+\.py)`", cell)})
    modules = {
        str(p.relative_to(pkg))
        for p in pkg.rglob("*.py")
        if p.parent != pkg and (p.name != "__init__.py" or p.parent.name in ("models", "stages"))
    }
    assert sorted(modules - set(named)) == [], "modules missing from docs/ARCHITECTURE.md"
    assert sorted(set(named) - modules) == [], "docs/ARCHITECTURE.md names modules that are gone"
    wrong = {m: f for m, f in named.items() if FLOORS[m.split("/")[0]] != f}
    assert not wrong, f"floors in docs/ARCHITECTURE.md differ from FLOORS: {wrong}"
    for modules_cell, tests_cell in re.findall(r"^\| \d+ \| (.+?) \| .+? \| (.+) \|$", text, re.M):
        tests = re.findall(r"`(test_\w+\.py)`", tests_cell)
        assert tests, f"no test file named for {modules_cell}"
        gone = [t for t in tests if not (ROOT / "tests" / t).is_file()]
        assert not gone, f"{modules_cell}: {gone} are not in tests/"
