"""Every ``metakd-run`` command that README.md and docs/*.md show must still compose, so the docs
cannot rot; and every relative link among them must lead to a file and heading that exist.

Each document is parsed on each run: fenced code blocks (``\\`` continuations, ``$ `` prompts, ``#``
comments) and inline code spans that start a command (after environment assignments such as
``METAKD_DATA_ROOT=...``, ``/usr/bin/time`` or ``srun``; ``torchrun ... -m metakd_run.cli`` counts
too). Each command is composed in this process through Hydra's compose API, with the same config
folder and overrides as ``metakd-run --cfg job`` (a sweep is expanded into each of its jobs), and
turned into the typed config, whose range checks run before any training. A few commands also run
as real ``metakd-run --cfg job`` subprocesses, and a command that the README shows failing (a
``$`` prompt followed by ``metakd-run: error: ...``) must print exactly the documented line.

Placeholders (``<run>``) become plausible paths: composing does not read them. A command that
cannot be composed as written (elided arguments, an unknown placeholder) is skipped with its
reason, which ``pytest -ra`` lists.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, ROOT, metakd_run_exe

README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
PROGRAM = "metakd-run"
# How a placeholder reads once filled in; composing (``--cfg job``) does not open these paths.
PLACEHOLDERS = {"<run>": "outputs/2026-01-01/00-00-00", "<teacher.pt>": "runs/teacher/checkpoints/teacher.pt"}
SHELL_OPERATORS = ("|", "||", "&&", ";", "&", ">", ">>", "2>", "2>&1", "<")
# Tiny budget appended to a command whose documented outcome is an error, in case it is not one.
TINY = ["train.iterations=2", "eval.tasks=4", "train.val_tasks=2", "train.progress=false"]


@dataclass
class Command:
    line: int  # where it starts in its document
    text: str  # as written
    args: list[str] = field(default_factory=list)  # what follows the program
    env: dict[str, str] = field(default_factory=dict)  # VAR=value prefixes
    error: str | None = None  # the documented stderr line, for a command shown failing
    skip: str | None = None  # why it cannot be composed as written
    doc: str = "README.md"  # the document, relative to the repository root

    @property
    def where(self) -> str:
        return f"{self.doc} line {self.line}"

    @property
    def id(self) -> str:
        return f"{Path(self.doc).stem}:L{self.line}:{' '.join(self.args)[:70] or PROGRAM}"


def _program_args(words: list[str]) -> tuple[dict[str, str], list[str]] | None:
    """Split off ``VAR=value``, ``/usr/bin/time``, ``srun`` and torchrun's own options."""
    env: dict[str, str] = {}
    i = 0
    while i < len(words) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[i]):
        key, value = words[i].split("=", 1)
        env[key] = value
        i += 1
    while i < len(words) and words[i] in ("time", "/usr/bin/time", "srun", "command"):
        i += 1
    if i < len(words) and words[i] == PROGRAM:
        return env, words[i + 1 :]
    if i < len(words) and words[i] == "torchrun":
        rest = words[i + 1 :]
        for j in range(len(rest) - 1):
            if rest[j] == "-m" and rest[j + 1] == "metakd_run.cli":
                return env, rest[j + 2 :]
    return None


QUOTED_DOLLAR = "\ue000"  # a ``$`` inside single quotes: the shell leaves it alone, so must we


def _protect_single_quoted(text: str) -> str:
    """``text`` with each ``$`` inside single quotes replaced by :data:`QUOTED_DOLLAR`, so that the
    variable expansion below spares what a shell spares (Hydra's ``'...${seed}'`` interpolations)."""
    out, single, double = [], False, False
    for ch in text:
        if ch == "'" and not double:
            single = not single
        elif ch == '"' and not single:
            double = not double
        out.append(QUOTED_DOLLAR if ch == "$" and single else ch)
    return "".join(out)


def _parse(text: str, line: int, error: str | None = None) -> Command | None:
    try:
        words = shlex.split(_protect_single_quoted(text), comments=True)
    except ValueError:
        return None
    found = _program_args(words)
    if found is None:
        return None
    env, args = found
    operators = [i for i, a in enumerate(args) if a in SHELL_OPERATORS]
    args = args[: operators[0]] if operators else args  # `metakd-run ... | tee log`: the command
    cmd = Command(line, text, args, env, error)
    if any("…" in a or a == "..." for a in args):
        cmd.skip = "arguments elided (…)"
    for i, arg in enumerate(cmd.args):
        for hole, value in PLACEHOLDERS.items():
            arg = arg.replace(hole, value)
        cmd.args[i] = arg
        unknown = re.findall(r"<[^<>]+>", arg)
        if unknown and cmd.skip is None:
            cmd.skip = f"unknown placeholder {unknown[0]}"
    return cmd


def readme_commands(text: str) -> list[Command]:
    """Every command of the README, fenced or inline, in order of appearance."""
    commands: list[Command] = []
    lines = text.splitlines()
    prose: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        if not lines[i].lstrip().startswith("```"):
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        i += 1
        block: list[tuple[int, str]] = []
        while i < len(lines) and not lines[i].lstrip().startswith("```"):
            block.append((i + 1, lines[i]))
            i += 1
        i += 1
        commands += _block_commands(block)
    commands += _inline_commands(prose)
    unique: dict[tuple, Command] = {}
    for cmd in sorted(commands, key=lambda c: c.line):  # the first of identical commands
        unique.setdefault((tuple(cmd.args), tuple(sorted(cmd.env.items())), cmd.error), cmd)
    return list(unique.values())


def _block_commands(block: list[tuple[int, str]]) -> list[Command]:
    prompted = any(t.startswith("$ ") for _, t in block)
    out: list[Command] = []
    j = 0
    while j < len(block):
        start, text = block[j]
        if prompted and not text.startswith("$ "):
            j += 1
            continue
        text = text[2:] if prompted else text
        while text.rstrip().endswith("\\") and j + 1 < len(block):  # a "\" continuation
            j += 1
            text = text.rstrip()[:-1] + " " + block[j][1].strip()
        j += 1
        error = None
        if prompted and j < len(block) and not block[j][1].startswith("$ "):
            error = block[j][1].strip()  # the documented output: one line
        cmd = _parse(text, start, error)
        if cmd is not None:
            out.append(cmd)
    return out


def _inline_commands(prose: list[tuple[int, str]]) -> list[Command]:
    out: list[Command] = []
    paragraph: list[tuple[int, str]] = []
    for number, text in [*prose, (0, "")]:
        if text.strip():
            paragraph.append((number, text))
            continue
        joined = " ".join(t.strip() for _, t in paragraph)
        for match in re.finditer(r"`([^`]+)`", joined):
            line = _line_of(paragraph, match.group(1))
            for variant in _alternatives(match.group(1)):
                cmd = _parse(variant, line)
                if cmd is not None:
                    out.append(cmd)
        paragraph = []
    return out


def _line_of(paragraph: list[tuple[int, str]], span: str) -> int:
    head = span.split()[0] if span.split() else span
    for number, text in paragraph:
        if head in text:
            return number
    return paragraph[0][0]


def _alternatives(span: str) -> list[str]:
    """``meta.chunk=4|8`` in prose means two commands; ``|`` is no pipe inside one word here."""
    words = span.split(" ")
    options = [
        [w.split("=", 1)[0] + "=" + v for v in w.split("=", 1)[1].split("|")]
        if "=" in w and "|" in w
        else [w]
        for w in words
    ]
    return [" ".join(combo) for combo in itertools.product(*options)]


def _expand_vars(arg: str, env: dict[str, str]) -> str:
    """The shell's ``$VAR`` expansion (unset: empty) and ``~`` at the start of a word only."""
    values = {**os.environ, "PWD": str(ROOT), **env}
    arg = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: values.get(m.group(1), ""), arg)
    arg = arg.replace(QUOTED_DOLLAR, "$")
    return os.path.expanduser(arg) if arg.startswith("~") else arg


def overrides_of(cmd: Command) -> tuple[list[str], bool]:
    """The overrides that ``--cfg job`` would compose, and whether the command is a sweep."""
    sweep = False
    out: list[str] = []
    args = iter(cmd.args)
    for arg in args:
        if arg in ("-m", "--multirun") or arg.startswith(("study=", "hparams_search=")):
            sweep = sweep or arg in ("-m", "--multirun") or "=null" not in arg  # presets that set MULTIRUN
            if arg.startswith(("study=", "hparams_search=")):
                out.append(_expand_vars(arg, cmd.env))
        elif arg in ("-c", "--cfg", "-p", "--package"):
            next(args, None)
        elif arg in ("--resolve", "--info", "-h", "--help", "--hydra-help"):
            continue
        else:
            out.append(_expand_vars(arg, cmd.env))
    return out, sweep


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Jobs of a grid sweep that between them take every value of every swept key once (not the
    whole grid: each value composes alone). Hydra's own override parser splits the values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    axes = []
    for text, override in zip(overrides, parsed):
        if override.is_sweep_override():
            key = override.get_key_element()
            axes.append([f"{key}={v}" for v in override.sweep_string_iterator()])
        else:
            axes.append([text])
    return [[axis[i % len(axis)] for axis in axes] for i in range(max(len(a) for a in axes))]


def doc_commands(docs: list[Path]) -> list[Command]:
    """The commands of every document; one shown in several documents is tried where it first appears."""
    seen: set[tuple] = set()
    out: list[Command] = []
    for doc in docs:
        for cmd in readme_commands(doc.read_text()):
            cmd.doc = doc.relative_to(ROOT).as_posix()
            key = (tuple(cmd.args), tuple(sorted(cmd.env.items())), cmd.error)
            if key not in seen:
                seen.add(key)
                out.append(cmd)
    return out


COMMANDS = doc_commands(DOCS)
COMPOSED = [c for c in COMMANDS if c.error is None]
FAILING = [c for c in COMMANDS if c.error is not None]


def test_the_docs_show_commands():
    """The parser still finds the commands (a format change must not empty this file), in the README
    and in the documents under docs/."""
    assert len(COMPOSED) >= 60, [c.text for c in COMMANDS]
    assert any(overrides_of(c)[1] for c in COMPOSED), "no sweep (-m) found"
    docs = {c.doc for c in COMPOSED}
    for name in ("README.md", "docs/configuration.md", "docs/sweeps.md", "docs/results.md", "docs/speed.md"):
        assert name in docs, sorted(docs)
    assert FAILING, "no documented error found"


@pytest.fixture(scope="module")
def compose():
    """Hydra's compose API on the real configs, initialised once for the module (it is the cost)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import metakd_run.cli  # noqa: F401 - registers the structured configs

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield lambda *overrides: hydra_compose("config", list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("cmd", COMPOSED, ids=[c.id for c in COMPOSED])
def test_command_composes(cmd: Command, compose, monkeypatch):
    if cmd.skip:
        pytest.skip(f"{cmd.where}: {cmd.skip}: {cmd.text}")
    from hydra.errors import ConfigCompositionException, OverrideParseException
    from omegaconf import open_dict

    from metakd_run.config import to_typed

    for key, value in cmd.env.items():
        monkeypatch.setenv(key, value)
    overrides, sweep = overrides_of(cmd)
    if any(o.startswith(("hydra/launcher=", "hparams_search=")) for o in overrides):
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
        pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    jobs = sweep_jobs(overrides) if sweep else [overrides]
    for n, job in enumerate(jobs):
        try:
            cfg = compose(*job)
            if n == 0:  # a sweep may show a failing cell on purpose; its first job must be valid
                with open_dict(cfg):
                    cfg.pop("hydra")  # the job's config alone, as the task function receives it
                to_typed(cfg)
        except (ConfigCompositionException, OverrideParseException, ValueError) as err:
            cause = err.__cause__ or err
            pytest.fail(f"{cmd.where} does not compose: {cmd.text}\n  {type(cause).__name__}: {cause}")


def _subprocess_cases() -> list[Command]:
    """Real ``--cfg job`` runs for a few commands: one of each kind (plain, preset, sweep, env)."""
    picked: dict[str, Command] = {}
    for c in COMPOSED:
        if c.skip:
            continue
        overrides, sweep = overrides_of(c)
        if sweep:
            kind = "sweep"
        elif c.env:
            kind = "env"
        else:
            kind = "preset" if any(o.startswith("experiment=") for o in overrides) else "plain"
        picked.setdefault(kind, c)
    return list(picked.values())


SUBPROCESS = _subprocess_cases()


@pytest.mark.slow
@pytest.mark.parametrize("cmd", SUBPROCESS, ids=[c.id for c in SUBPROCESS])
def test_command_prints_its_config(cmd: Command, tmp_path: Path):
    overrides, sweep = overrides_of(cmd)
    if sweep:  # --cfg cannot be combined with --multirun: print the first job's config
        overrides = sweep_jobs(overrides)[0]
    env = {**os.environ, **cmd.env}
    proc = subprocess.run(
        [*metakd_run_exe(), "--cfg", "job", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, f"{cmd.where}: {cmd.text}\n{proc.stderr[-2000:]}"
    assert "dataset:" in proc.stdout and "meta:" in proc.stdout


@pytest.mark.parametrize("cmd", FAILING, ids=[c.id for c in FAILING])
def test_documented_error_is_what_the_user_sees(cmd: Command, tmp_path: Path):
    """A failure the README shows (``$ metakd-run ...`` then its line) must look exactly like that."""
    overrides, _ = overrides_of(cmd)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [*metakd_run_exe(), *overrides, *TINY, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, **cmd.env},
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [cmd.error], f"{cmd.where}: {cmd.text}\n{proc.stderr[-2000:]}"
    assert proc.returncode == 2 and not run_dir.exists()


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a document's headings: lower case, punctuation dropped, spaces to ``-``."""
    anchors: set[str] = set()
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def relative_links(doc: Path) -> list[tuple[str, Path, str]]:
    """(link as written, the file it names, its #anchor or "") for every relative link and image."""
    out = []
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # links in code are not links
    text = re.sub(r"`[^`\n]*`", "", text)
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        out.append((target, (doc.parent / path).resolve() if path else doc, anchor))
    return out


def broken_links(doc: Path) -> list[str]:
    """Each relative link of ``doc`` whose file or heading does not exist, with what is missing."""
    broken = []
    for target, path, anchor in relative_links(doc):
        if not path.exists():
            broken.append(f"{target}: no file {path.name}")
        elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    return broken


@pytest.mark.parametrize("doc", DOCS, ids=[d.relative_to(ROOT).as_posix() for d in DOCS])
def test_relative_links_lead_somewhere(doc: Path):
    """A moved section or a renamed heading must not leave a link from another document dangling."""
    broken = broken_links(doc)
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_single_quotes_keep_what_the_shell_keeps():
    cmd = _parse("metakd-run -m 'hydra.sweep.subdir=${study.cell}-s${seed}' train.teacher_cache=$HOME/t", 1)
    overrides, sweep = overrides_of(cmd)
    assert sweep and overrides == [
        "hydra.sweep.subdir=${study.cell}-s${seed}",
        f"train.teacher_cache={Path.home()}/t",
    ]


def test_the_link_check_sees_a_broken_link(tmp_path: Path):
    """The checker itself: a missing file and a missing heading are found, good links are not."""
    (tmp_path / "other.md").write_text("# Other doc\n\n## Why it, works?\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "[ok](other.md#why-it-works) [file](other.md) [gone](missing.md) [bad](other.md#nope)\n"
        "`[code](x.md)` [web](https://x.y) ![img](missing.png) [here](#doc)\n\n# Doc\n"
    )
    assert broken_links(doc) == [
        "missing.md: no file missing.md",
        "other.md#nope: no heading #nope in other.md",
        "missing.png: no file missing.png",
    ]
