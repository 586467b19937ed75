"""Docs that cannot drift: the commands, flags, paths and links of the README and the manual.

Which files
    Commands, flags and paths are read from README.md, docs/*.md and cluster/README.md (the
    manual's cluster page). Links are read from those and from reports/**/*.md.

How a command is found
    * Fenced code blocks whose info string is empty or bash, sh, shell or console: each line,
      with backslash continuations joined, a leading `$ ` prompt dropped and a `#` comment
      (a `#` after a space) cut off.
    * Inline code spans (one or two backticks) in the prose, outside fenced blocks.
    Each is split into shell pieces at `&&`, `||`, `;` and `|`, and each piece into words
    (shlex). A piece is a command of this project when, after any leading `VAR=value` words,
    or after a wrapper's `--` (as in `ray job submit ... -- python sweeps/sigma_aug.py`), it
    starts with one of these entry points:

        raven SUBCOMMAND ...               the console script, raven.cli:main
        python sweeps/NAME.py ...          an entry script
        python reports/RUN/NAME.py ...     a report's script
        python -m raven.MODULE ...         a module with a command line (raven.bench)
        bash .ci/run                       CI

    Other pieces (pip, mlflow, ray, optuna-dashboard, jupyter, python -m pytest, ...) are not
    this project's commands and are skipped, except `pip install` of this project, whose extras
    (`.[fid]`, `raven[fid]`) must be extras of the installed distribution.

What is checked
    * The entry point is real: the installed console script `raven` runs raven.cli:main, the
      subcommand is one of its parser's, the script file exists, the module has a parser.
    * Every word that starts with `-` is an option string of that parser (of the subcommand's
      parser for raven and raven.bench); `--flag=value` counts as `--flag`. Values and
      positionals are not parsed, since the docs write placeholders (DIR, N, URI).
    * A script without a command line (reports/strong-study/*.py, .ci/run) takes no flags.
    * An inline span that is only a flag (`--seeds`, `--seeds N`) names a flag of some parser of
      this project, or one of the few other tools' flags listed in FOREIGN_FLAGS.
    * An inline span that is a path in the repository (`raven/pack.py`, `reports/strong-study/`)
      exists.
    * Every relative link and image (`[text](path#anchor)`) points at a file of the repository,
      and an anchor into a markdown file at one of its headings (GitHub's slugs).
    * The README's one-model smoke commands run (in a temporary folder, on the offline data),
      with the strong protocol left out for time (`--protocol paper` appended: test_protocols
      and test_evaluate cover it). The sweep's and the reproduction's `--smoke` take minutes, so
      only their flags are checked here; test_sweep and test_reproduce run them.

Parsers are built in-process: `build_parser()` of raven.cli, raven.bench and the entry scripts
that have one; sweeps/reproduce.py builds its parser inside `parse_args(argv)`, so that function
is called with `ArgumentParser.parse_args` patched to hand the parser back instead of parsing.
A script that used argparse only inside its main would be asked for its --help in a subprocess.
Any run, here or on CI: `python -m pytest -q tests/test_docs.py` (about 30 s on 2 cores, most of
it the smoke commands).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest


REPO_ROOT = Path(__file__).resolve().parents[1]
COMMAND_FILES = ["README.md", *sorted(f"docs/{p.name}" for p in (REPO_ROOT / "docs").glob("*.md")),
                 "cluster/README.md"]
LINK_FILES = sorted({*COMMAND_FILES, *(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "reports").rglob("*.md"))})
SHELL_INFO = {"", "bash", "sh", "shell", "console"}
# Flags of other tools that the docs name in prose.
FOREIGN_FLAGS = {"--no-deps", "--backend-store-uri", "--artifacts-destination", "--working-dir", "--no-wait"}
PATH_ROOTS = ("raven/", "sweeps/", "tests/", "reports/", "docs/", "cluster/", "notebooks/", ".ci/")
TEST_COMMAND = "pip install -e '.[test]' && python -m pytest -q tests"


@dataclass(frozen=True)
class Command:
    file: str
    line: int
    words: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {' '.join(self.words)}"


# --- reading markdown --------------------------------------------------------------------------

FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
INLINE = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")


def split_markdown(text: str) -> tuple[list[tuple[int, str, str]], list[tuple[int, str]]]:
    """(fenced blocks as (first line number, info string, body), prose lines as (number, text))."""
    blocks, prose = [], []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match:
            fence, info, start = match.group(1), match.group(2).lower(), i + 1
            i += 1
            body = []
            while i < len(lines) and not lines[i].strip().startswith(fence[0] * len(fence)):
                body.append(lines[i])
                i += 1
            blocks.append((start + 1, info, "\n".join(body)))
        else:
            prose.append((i + 1, lines[i]))
        i += 1
    return blocks, prose


def inline_spans(prose: list[tuple[int, str]]) -> list[tuple[int, str]]:
    return [(number, m.group(2).strip()) for number, line in prose for m in INLINE.finditer(line)]


def shell_lines(block: str, first_line: int) -> list[tuple[int, str]]:
    out, pending, start = [], "", first_line
    for offset, raw in enumerate(block.split("\n")):
        line = raw.rstrip()
        if not pending:
            start = first_line + offset
            line = line.lstrip()
            if line.startswith("$ "):
                line = line[2:]
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def strip_comment(line: str) -> str:
    return re.split(r"(?:^|\s)#", line, maxsplit=1)[0]


def pieces(text: str) -> list[list[str]]:
    out = []
    for part in re.split(r"&&|\|\||;|\|", text):
        try:
            words = shlex.split(part)
        except ValueError:
            words = part.split()
        if words:
            out.append(words)
    return out


ENV_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def entry_words(words: list[str]) -> list[str] | None:
    """The words from the entry point on, or None when the piece is no command of this project."""
    starts = [0] + [i + 1 for i, w in enumerate(words) if w == "--"]
    for start in starts:
        rest = words[start:]
        while rest and ENV_WORD.match(rest[0]):
            rest = rest[1:]
        if not rest:
            continue
        if rest[0] == "raven" and len(rest) > 1:
            return rest
        if rest[0] in ("python", "python3") and len(rest) > 1:
            if rest[1].startswith(("sweeps/", "reports/")) and rest[1].endswith(".py"):
                return rest
            if rest[1] == "-m" and len(rest) > 2 and rest[2].startswith("raven"):
                return rest
        if rest[:2] == ["bash", ".ci/run"]:
            return rest
    return None


def extract_commands(relpath: str) -> list[Command]:
    """Every command of this project in one markdown file (the module docstring says how)."""
    blocks, prose = split_markdown((REPO_ROOT / relpath).read_text())
    candidates: list[tuple[int, str]] = []
    for first_line, info, body in blocks:
        if info in SHELL_INFO:
            candidates += [(n, strip_comment(line)) for n, line in shell_lines(body, first_line)]
    candidates += inline_spans(prose)
    commands = []
    for number, text in candidates:
        for words in pieces(text):
            found = entry_words(words)
            if found:
                commands.append(Command(relpath, number, tuple(found)))
    return commands


def pip_installs(relpath: str) -> list[tuple[int, list[str]]]:
    blocks, prose = split_markdown((REPO_ROOT / relpath).read_text())
    texts = [(n, strip_comment(line)) for first, info, body in blocks if info in SHELL_INFO
             for n, line in shell_lines(body, first)] + inline_spans(prose)
    return [(n, words) for n, text in texts for words in pieces(text) if words[:2] == ["pip", "install"]]


# --- parsers -----------------------------------------------------------------------------------

class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"_docs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _capture_parser(parse_args) -> argparse.ArgumentParser:
    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            parse_args([])
        except _Captured as captured:
            return captured.parser
    raise AssertionError("parse_args returned without building a parser")


class HelpParser:
    """The option strings of a script that builds its parser only inside main, read from its --help."""

    def __init__(self, help_text: str) -> None:
        self._actions = [argparse.Action(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", help_text), "_")]


@functools.cache
def script_parser(relpath: str) -> argparse.ArgumentParser | HelpParser | None:
    """The argparse parser of an entry script; None for a script without a command line.

    A script with `def build_parser()` or `def parse_args(argv)` is imported (its main is
    guarded) and its parser built in-process; one that uses argparse otherwise is asked for its
    --help in a subprocess; one that does neither takes no flags and is not imported (it may do
    its work at import time).
    """
    path = REPO_ROOT / relpath
    source = path.read_text()
    if "def build_parser(" in source or "def parse_args(" in source:
        module = _load_script(path)
        if hasattr(module, "build_parser"):
            return module.build_parser()
        return _capture_parser(module.parse_args)
    if "argparse" in source:
        done = subprocess.run([sys.executable, str(path), "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"{relpath} --help failed:\n{done.stderr[-2000:]}"
        return HelpParser(done.stdout)
    return None


@functools.cache
def module_parser(name: str) -> argparse.ArgumentParser:
    module = importlib.import_module(name)
    if not hasattr(module, "build_parser"):
        raise AssertionError(f"{name} has no command line (no build_parser())")
    return module.build_parser()


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@functools.cache
def all_flags() -> frozenset[str]:
    parsers = [module_parser("raven.cli"), module_parser("raven.bench")]
    parsers += [script_parser(f"sweeps/{p.name}") for p in sorted((REPO_ROOT / "sweeps").glob("*.py"))]
    flags: set[str] = set()
    for parser in filter(None, parsers):
        flags |= options(parser)
        for sub in subparsers(parser).values():
            flags |= options(sub)
    return frozenset(flags)


# --- checking one command ----------------------------------------------------------------------

def _flag_errors(parser: argparse.ArgumentParser | None, words: list[str], what: str) -> list[str]:
    allowed = options(parser) if parser is not None else set()
    errors = []
    for word in words:
        if word.startswith("-") and len(word) > 1 and not re.fullmatch(r"-[\d.]+", word):
            flag = word.split("=", 1)[0]
            if flag not in allowed:
                errors.append(f"{what} has no flag {flag}")
    return errors


def _with_subcommand(parser: argparse.ArgumentParser, words: list[str], what: str) -> list[str]:
    """Flags before the subcommand are the main parser's; from it on, the subcommand's."""
    subs = subparsers(parser)
    for i, word in enumerate(words):
        if not word.startswith("-"):
            if word not in subs:
                return [f"{what} has no subcommand {word!r} (it has {', '.join(subs)})"]
            return _flag_errors(parser, words[:i], what) + _flag_errors(subs[word], words[i + 1:], f"{what} {word}")
    return _flag_errors(parser, words, what)


@functools.cache
def console_script() -> str:
    """What the installed `raven` console script runs (pyproject.toml's [project.scripts])."""
    return next((e.value for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "raven"), "")


@functools.cache
def extras() -> frozenset[str]:
    """The installed distribution's extras (pyproject.toml's [project.optional-dependencies])."""
    return frozenset(importlib.metadata.metadata("raven").get_all("Provides-Extra") or ())


def check_command(words: tuple[str, ...]) -> list[str]:
    """What is wrong with one command of this project; [] when nothing is."""
    words = list(words)
    if words[0] == "raven":
        if console_script() != "raven.cli:main":
            return [f"the installed console script raven is {console_script()!r}, not raven.cli:main"]
        return _with_subcommand(module_parser("raven.cli"), words[1:], "raven")
    if words[0] == "bash":
        if not (REPO_ROOT / words[1]).is_file():
            return [f"{words[1]} does not exist"]
        return _flag_errors(None, words[2:], words[1])
    if words[1] == "-m":
        name = words[2]
        try:
            parser = module_parser(name)
        except (ImportError, AssertionError) as error:
            return [f"python -m {name}: {error}"]
        if subparsers(parser):
            return _with_subcommand(parser, words[3:], f"python -m {name}")
        return _flag_errors(parser, words[3:], f"python -m {name}")
    script = words[1]
    if not (REPO_ROOT / script).is_file():
        return [f"{script} does not exist"]
    return _flag_errors(script_parser(script), words[2:], script)


@functools.cache
def documented_commands() -> tuple[Command, ...]:
    return tuple(c for relpath in COMMAND_FILES for c in extract_commands(relpath))


# --- the tests ---------------------------------------------------------------------------------

def test_the_docs_name_commands_of_every_entry_point():
    commands = documented_commands()
    starts = {c.words[0] if c.words[0] != "python" else c.words[1].split("/")[0] for c in commands}
    assert {"raven", "sweeps", "-m", "bash"} <= starts, starts
    assert len(commands) >= 50, f"only {len(commands)} commands found: is the extraction broken?"


@pytest.mark.parametrize("relpath", COMMAND_FILES)
def test_every_documented_command_names_a_real_entry_point_and_only_its_flags(relpath):
    errors = [f"{command}\n    {error}" for command in documented_commands() if command.file == relpath
              for error in check_command(command.words)]
    assert not errors, "commands that drifted from their parsers:\n" + "\n".join(errors)


def test_the_checker_rejects_a_flag_its_parser_lacks():
    assert check_command(("raven", "evaluate", "DIR", "--no-fid")) == []
    assert check_command(("raven", "evaluate", "DIR", "--no-such-flag"))
    assert check_command(("raven", "train", "--seeds", "0-4")) == []
    assert check_command(("raven", "no-such-command"))
    assert check_command(("python", "sweeps/reproduce.py", "--smoke", "--strong-steps", "5")) == []
    assert check_command(("python", "sweeps/reproduce.py", "--no-such-flag"))
    assert check_command(("python", "sweeps/sigma_aug.py", "--objective=strong")) == []
    assert check_command(("python", "-m", "raven.bench", "pack", "--no-estimate")) == []
    assert check_command(("python", "-m", "raven.bench", "train", "--no-estimate"))
    assert check_command(("python", "sweeps/no_such_script.py"))
    assert check_command(("python", "reports/strong-study/rank.py", "--verbose"))
    help_parser = HelpParser("usage: x.py [-h] [--foo FOO]\n\noptions:\n  --bar-baz  a flag, see --foo\n")
    assert _flag_errors(help_parser, ["--foo", "1", "--bar-baz", "--qux"], "x.py") == ["x.py has no flag --qux"]


def test_extraction_reads_blocks_spans_continuations_and_wrappers():
    text = ("Run `raven evaluate DIR --no-fid` or `--seeds`.\n\n```bash\n"
            "RAVEN_DATA_DIR=x python sweeps/sigma_aug.py --smoke \\\n  --epochs 2   # a comment\n"
            "ray job submit --working-dir . -- python sweeps/reproduce.py --smoke && raven report\n"
            "pip install mlflow\n```\n\n```python\nraven.load_checkpoint('x')\n```\n")
    blocks, prose = split_markdown(text)
    found = [entry_words(words) for _, line in inline_spans(prose) for words in pieces(line)]
    found += [entry_words(words) for first, info, body in blocks if info in SHELL_INFO
              for _, line in shell_lines(body, first) for words in pieces(strip_comment(line))]
    assert [w for w in found if w] == [
        ["raven", "evaluate", "DIR", "--no-fid"],
        ["python", "sweeps/sigma_aug.py", "--smoke", "--epochs", "2"],
        ["python", "sweeps/reproduce.py", "--smoke"],
        ["raven", "report"],
    ]


@pytest.mark.parametrize("relpath", COMMAND_FILES)
def test_every_flag_named_in_prose_belongs_to_a_parser(relpath):
    _, prose = split_markdown((REPO_ROOT / relpath).read_text())
    unknown = []
    for number, span in inline_spans(prose):
        first = span.split()[0] if span.split() else ""
        if first.startswith("--") and len(first) > 2:
            flag = first.split("=", 1)[0].rstrip(",.:")
            if flag not in all_flags() and flag not in FOREIGN_FLAGS:
                unknown.append(f"{relpath}:{number}: {span}")
    assert not unknown, "flags no parser of this project has:\n" + "\n".join(unknown)


@pytest.mark.parametrize("relpath", COMMAND_FILES)
def test_every_repository_path_named_in_prose_exists(relpath):
    _, prose = split_markdown((REPO_ROOT / relpath).read_text())
    missing = [f"{relpath}:{number}: {span}" for number, span in inline_spans(prose)
               if re.fullmatch(r"[\w.-]+(/[\w.-]+)*/?", span) and span.startswith(PATH_ROOTS)
               and "/" in span and not (REPO_ROOT / span).exists()]
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("relpath", COMMAND_FILES)
def test_pip_installs_name_extras_that_exist(relpath):
    errors = []
    for number, words in pip_installs(relpath):
        for word in words[2:]:
            match = re.fullmatch(r"(?:\.|raven)\[([\w,-]+)\]", word)
            if match:
                errors += [f"{relpath}:{number}: no extra {e!r} in pyproject.toml" for e in match.group(1).split(",")
                           if e not in extras()]
    assert not errors, "\n".join(errors)


def test_ci_runs_the_readme_install_and_test_command_verbatim():
    readme_blocks, _ = split_markdown((REPO_ROOT / "README.md").read_text())
    assert any(TEST_COMMAND in body.split("\n") for _, info, body in readme_blocks), \
        f"README.md has no code line {TEST_COMMAND!r}"
    ci = [line.strip() for line in (REPO_ROOT / ".ci/run").read_text().split("\n")]
    assert TEST_COMMAND in ci, f".ci/run does not run {TEST_COMMAND!r}"
    assert not [line for line in ci if "pip install" in line and line != TEST_COMMAND], \
        ".ci/run installs Python packages the README does not"


def test_the_readme_indexes_every_page_of_the_manual_and_maps_every_module():
    readme = (REPO_ROOT / "README.md").read_text()
    pages = [p.name for p in (REPO_ROOT / "docs").glob("*.md")]
    assert pages and not [p for p in pages if f"](docs/{p})" not in readme]
    section = readme.split("## Package map", 1)[1].split("\n## ", 1)[0]
    modules = {p.stem for p in (REPO_ROOT / "raven").rglob("*.py") if p.stem != "__init__"}
    unmapped = sorted(m for m in modules if f"`{m}`" not in section)
    assert not unmapped, f"modules missing from the README's package map: {unmapped}"


# --- links -------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def github_anchors(relpath: Path) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file."""
    _, prose = split_markdown(relpath.read_text())
    anchors, seen = set(), {}
    for _, line in prose:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_links(relpath: str, root: Path = REPO_ROOT) -> list[str]:
    """The relative links and images of one markdown file that lead nowhere in `root`."""
    root = root.resolve()
    source = root / relpath
    _, prose = split_markdown(source.read_text())
    broken = []
    for number, line in prose:
        for target in LINK.findall(INLINE.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue
            file_part, _, anchor = target.partition("#")
            path = (source.parent / file_part).resolve() if file_part else source
            where = f"{relpath}:{number}: ({target})"
            if root not in path.parents and path != root:
                broken.append(f"{where} leaves the repository")
            elif not path.exists():
                broken.append(f"{where} does not exist")
            elif anchor and path.suffix == ".md" and anchor not in github_anchors(path):
                broken.append(f"{where} has no heading #{anchor}")
    return broken


@pytest.mark.parametrize("relpath", LINK_FILES)
def test_every_relative_link_points_at_a_file_of_the_repository(relpath):
    broken = broken_links(relpath)
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_check_sees_missing_files_anchors_and_links_out_of_the_repository(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "methods.md").write_text("# Methods\n\n## Deviations from the paper\n\n```bash\n# not a heading\n```\n")
    (tmp_path / "docs" / "probe.md").write_text(
        "# Probe\n\n[gone](no-such-page.md) [ok](methods.md#deviations-from-the-paper) "
        "[bad anchor](methods.md#no-such-heading) [code comment](methods.md#not-a-heading) "
        "[out](../../elsewhere.md) [web](https://example.org/x.md) `[not a link](nowhere.md)`\n")
    assert [b.split(": ", 1)[1] for b in broken_links("docs/probe.md", tmp_path)] == [
        "(no-such-page.md) does not exist",
        "(methods.md#no-such-heading) has no heading #no-such-heading",
        "(methods.md#not-a-heading) has no heading #not-a-heading",
        "(../../elsewhere.md) leaves the repository",
    ]


# --- the README's one-model smoke form ---------------------------------------------------------

def _raven_executable() -> str:
    beside = Path(sys.executable).parent / "raven"
    found = str(beside) if beside.exists() else shutil.which("raven")
    assert found, "the raven console script is not installed (pip install -e '.[test]')"
    return found


def test_the_readme_one_model_smoke_commands_run(tmp_path, data_dir):
    """The README's block of `raven train ... --limit` then `raven evaluate`, run as written."""
    blocks, _ = split_markdown((REPO_ROOT / "README.md").read_text())
    smoke = None
    for first, info, body in blocks:
        commands = [entry_words(w) for _, line in shell_lines(body, first) for w in pieces(strip_comment(line))]
        commands = [c for c in commands if c]
        if [c[:2] for c in commands] == [["raven", "train"], ["raven", "evaluate"]] and "--limit" in commands[0]:
            smoke = commands
            break
    assert smoke, "README.md lost its one-model smoke form (a block of raven train --limit ..., raven evaluate ...)"
    env = {**os.environ, "RAVEN_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    train, evaluate = smoke
    for words in (train, [*evaluate, "--protocol", "paper"]):
        done = subprocess.run([_raven_executable(), *words[1:]], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"{' '.join(words)} failed:\n{done.stderr[-3000:]}"
    out = Path(train[train.index("--out") + 1]) if "--out" in train else None
    assert out is not None and (tmp_path / out / "robustness.json").is_file()
