"""The documentation says what the code does.

Every ``ablate ...`` command shown in README.md (code blocks and inline code) and in the comments
of jobs/*.yaml and configs/*.yaml is parsed by the live CLI (``typer.main.get_command``), so an
option that no longer exists, a missing value, an extra or a missing argument fails here. The
options come from the commands themselves, never from a list typed in this file.

Why a parse and not only ``--help``: click reads the whole line before acting on ``--help``, so an
unknown option does fail with ``--help`` appended, but extra arguments pass, and ``--format --help``
gives ``--help`` to ``--format`` as its value and runs the command. So each line is parsed first
(``make_context``: nothing runs), then run with ``--help`` appended, and with ``--dry-run`` where the
command has one. Nothing trains.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from ablate.cli import app

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CLI = typer.main.get_command(app)
SPAN = re.compile(r"`([^`]+)`")


# --------------------------------------------------------------------------- extraction
def _commands_in(text: str) -> list[tuple[str, bool]]:
    """``(line, names_only)`` for the ``ablate ...`` commands in ``text``: inline code spans that hold
    one (also after ``--``, as in ``ray job submit -- ablate submit JOB.yaml``), and a line that starts
    with one (its ``#`` comment cut off), which is a command to run. A code span of a command's name
    alone (``ablate train``) only names it, and ``ablate a/b/c`` names ``ablate a``, ``ablate b``,
    ...: those have ``names_only`` set."""
    found = []
    for span in SPAN.findall(text):
        m = re.search(r"(?:^|\s--\s)(ablate\s.*)$", span.replace("\n", " "))
        if m:
            found.append((m.group(1), True))
    stripped = text.strip()
    if stripped.startswith("ablate "):
        found.append((stripped, False))
    elif m := re.match(r"ray job submit\s.*?\s--\s(ablate\s.*)$", stripped):  # the driver of a Ray job
        found.append((m.group(1), False))
    out = []
    for line, in_span in found:
        words = shlex.split(line, comments=True)
        if len(words) == 2 and "/" in words[1] and not words[1].startswith(("-", ".")) and "." not in words[1]:
            out += [(f"ablate {name}", True) for name in words[1].split("/")]
        else:
            out.append((shlex.join(words), in_span and _names_a_command(words)))
    return out


def _names_a_command(words: list[str]) -> bool:
    try:
        return not _leaf(words)[2]
    except AssertionError:  # not a command: the test of the line says so
        return False


def _flags_in(text: str) -> list[str]:
    """Long options named on their own in inline code (``--store``, ``--format table|csv``)."""
    return [m.group(1) for span in SPAN.findall(text) if (m := re.match(r"(--[a-z][\w-]*)", span))]


def _readme_texts() -> list[tuple[str, str]]:
    """(where, text): each line of a fenced block whole; outside them, each inline code span (which
    may run over a line break)."""
    text = README.read_text()
    out, pos = [], 0
    parts = re.split(r"(^```.*\n(?:.*\n)*?```$)", text, flags=re.M)
    for part in parts:
        line0 = text.count("\n", 0, pos) + 1
        if part.startswith("```"):  # a line continued with a backslash is one command
            joined = re.sub(r"\\\n\s*", " ", part)
            lines = part.splitlines()
            starts = [i for i, line in enumerate(lines) if i and not (i > 1 and lines[i - 1].rstrip().endswith("\\"))]
            out += [(f"README.md:{line0 + i}", line) for i, line in zip(starts, joined.splitlines()[1:])]
        else:
            out += [(f"README.md:{line0 + part.count(chr(10), 0, m.start())}", m.group(0))
                    for m in SPAN.finditer(part)]
        pos += len(part)
    return out


def _yaml_comments(path: Path) -> list[tuple[str, str]]:
    """(where, comment text) of every ``#`` comment of a YAML file (``#`` at line start or after a blank)."""
    out: list[tuple[str, str]] = []
    continued = False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = re.search(r"(?:^|\s)#(.*)$", line)
        if m and continued:  # the previous comment line ended with a backslash: one command
            out[-1] = (out[-1][0], out[-1][1].rstrip()[:-1] + " " + m.group(1).strip())
        elif m:
            out.append((f"{path.relative_to(REPO)}:{n}", m.group(1)))
        continued = bool(m) and out[-1][1].rstrip().endswith("\\")
    return out


def _yaml_files() -> list[Path]:
    return sorted((REPO / "jobs").glob("*.yaml")) + sorted((REPO / "configs").glob("*.yaml"))


def documented_commands() -> list[tuple[str, str, bool]]:
    """(where, command line, names_only) of every documented ``ablate`` command."""
    sources = _readme_texts() + [c for p in _yaml_files() for c in _yaml_comments(p)]
    return [(where, cmd, names) for where, text in sources for cmd, names in _commands_in(text)]


def documented_flags() -> list[tuple[str, str, str | None]]:
    """(where, --flag, the command it belongs to): a job file's comments speak of ``ablate submit``, a
    trial config's of ``ablate train``; README prose may name any command's option (None)."""
    out = [(w, f, None) for w, text in _readme_texts() for f in _flags_in(text)]
    for path in _yaml_files():
        command = "submit" if path.parent.name == "jobs" else "train"
        out += [(w, f, command) for w, text in _yaml_comments(path) for f in _flags_in(text)]
    return out


# --------------------------------------------------------------------------- the live CLI
def _leaf(words: list[str]):
    """(click command, its name path, the words left for it) for ``ablate <group>... <command> ...``."""
    assert words[0] == "ablate"
    cmd, path, rest = CLI, ["ablate"], list(words[1:])
    while hasattr(cmd, "commands"):
        if not rest or rest[0].startswith("-"):
            raise AssertionError(f"{' '.join(path)} needs a subcommand; it has {', '.join(cmd.commands)}")
        sub = cmd.get_command(typer.Context(cmd), rest[0])
        if sub is None:
            raise AssertionError(f"{' '.join(path)} has no command {rest[0]!r}; it has {', '.join(cmd.commands)}")
        cmd, path, rest = sub, path + [rest.pop(0)], rest
    return cmd, path, rest


def parse(line: str) -> dict:
    """The parameters the live CLI reads from a documented line (nothing runs); AssertionError naming
    the problem (unknown command or option, missing value, extra or missing argument, bad value)."""
    cmd, path, rest = _leaf(shlex.split(line))
    asks_help = "--help" in rest  # `ablate simulate --help`: the arguments may be left out
    rest = [w for w in rest if w != "--help"]
    try:
        return cmd.make_context(" ".join(path), rest).params
    except typer.TyperException as e:  # click's UsageError and its kin
        if asks_help and type(e).__name__ == "MissingParameter":
            return {}
        raise AssertionError(f"{line}: {e.format_message() if hasattr(e, 'format_message') else e}") from None


def _options(cmd) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}


def _all_options(cmd=CLI) -> set[str]:
    if hasattr(cmd, "commands"):
        return _options(cmd).union(*(_all_options(c) for c in cmd.commands.values()))
    return _options(cmd) | {"--help"}


@functools.cache
def _infra_options() -> set[str]:
    """Options of the tools the README's cluster section names besides ablate: infra/local's
    scripts and ``mlflow server`` (taken from their own --help, so a renamed option fails)."""
    import subprocess
    import sys

    helps = [subprocess.run(["bash", str(REPO / "infra/local" / script), "--help"], capture_output=True,
                            text=True).stdout for script in ("cluster.sh", "mlflow.sh")]
    helps.append(subprocess.run([str(Path(sys.executable).with_name("mlflow")), "server", "--help"],
                                capture_output=True, text=True).stdout)
    return {m for text in helps for m in re.findall(r"--[a-z][\w-]*", text)}


COMMANDS = documented_commands()
FLAGS = documented_flags()


def test_the_documentation_shows_commands_and_the_extraction_finds_them():
    lines = {cmd for _, cmd, names in COMMANDS if not names}
    assert len(lines) >= 20  # README's two command blocks alone hold more
    assert "ablate submit jobs/quickstart.yaml" in lines and "ablate train configs/quickstart.yaml" in lines
    assert "ablate status quickstart" in lines  # a code span in a code block's comment
    names = {cmd for _, cmd, names in COMMANDS if names}
    assert {"ablate submit", "ablate resume", "ablate cancel"} <= names  # from `ablate submit/status/resume/...`
    assert {"--tracking", "--store"} <= {f for _, f, _ in FLAGS}


@pytest.mark.parametrize(("where", "line", "names_only"), COMMANDS, ids=[f"{w} {c}" for w, c, _ in COMMANDS])
def test_documented_command_parses_and_its_help_runs(where, line, names_only):
    """The whole line parses (a command only named, as in `ablate submit/status`, must exist)."""
    if names_only:
        _leaf(shlex.split(line))
    else:
        parse(line)
    result = CliRunner().invoke(app, shlex.split(line)[1:] + ["--help"])
    assert result.exit_code == 0 and "Usage" in result.output, f"{where}: {line} --help:\n{result.output}"


@pytest.mark.parametrize(("where", "flag", "command"), FLAGS, ids=[f"{w} {f}" for w, f, _ in FLAGS])
def test_documented_flag_exists(where, flag, command):
    if command is None:
        assert flag in _all_options() | _infra_options(), f"{where}: neither ablate nor infra/local nor mlflow has {flag}"
    else:
        cmd, _, _ = _leaf(["ablate", command])
        assert flag in _options(cmd), f"{where}: ablate {command} has no {flag}; it has {sorted(_options(cmd))}"


def test_parse_refuses_what_help_alone_lets_through():
    """The check itself: each of these lines is wrong, and ``parse`` says so."""
    for bad in ("ablate submit jobs/coco.yaml --tracking-uri http://mlflow:5000",  # no such option
                "ablate submit a.yaml b.yaml",  # extra argument (passes with --help)
                "ablate results quickstart --format",  # missing value (--help would become it)
                "ablate bench loss --repeats many",  # not an integer
                "ablate results",  # missing argument
                "ablate bench"):  # no subcommand
        with pytest.raises(AssertionError):
            parse(bad)
    assert parse("ablate bench loss --repeats 7")["repeats"] == 7


def _coco_stand_in(job: Path, tmp_path: Path) -> Path:
    """``job`` with its COCO paths pointing at a small generated set (the real one is not here)."""
    from ablate.data import generate_synthetic

    info = generate_synthetic(tmp_path / "coco", num_train=4, num_val=2, image_size=64, seed=0)
    raw = yaml.safe_load(job.read_text())
    raw["dataset"]["coco"] = {"train_ann": str(info.annotations("train")), "train_images": str(info.root / "train"),
                              "val_ann": str(info.annotations("val")), "val_images": str(info.root / "val")}
    out = tmp_path / job.name
    out.write_text(yaml.safe_dump(raw))
    return out


def _placeholder(word: str) -> bool:
    """``JOB.yaml``, ``CONFIG.yaml``: a name the reader replaces."""
    return Path(word).stem.isupper()


def _job_file(line: str) -> str | None:
    """The job file of a documented command that has ``--dry-run`` (None: it has none, or the line
    does not parse, which its own test reports)."""
    try:
        cmd = _leaf(shlex.split(line))[0]
        if "--dry-run" not in _options(cmd):
            return None
        (arg,) = [p.name for p in cmd.params if p.param_type_name == "argument"]
        return str(parse(line)[arg])
    except AssertionError:
        return None


DRY = [(w, c) for w, c, names in COMMANDS if not names and _job_file(c) and not _placeholder(_job_file(c))]


@pytest.mark.parametrize(("where", "line"), DRY, ids=[f"{w} {c}" for w, c in DRY])
def test_documented_command_runs_dry(where, line, tmp_path, monkeypatch):
    """``--dry-run`` validates and expands the job as the command would, and runs nothing."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("ABLATE_STORE", raising=False)
    # shell variables the cluster section's commands use, as `make cluster-up` would export them
    shell = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5050", "ABLATE_STORE": "postgresql+psycopg://postgres@127.0.0.1/ablate",
             "PWD": str(REPO)}
    words = [re.sub(r"\$(\w+)", lambda m: shell[m.group(1)], w) for w in shlex.split(line)[1:]]
    job = REPO / _job_file(line)
    if yaml.safe_load(job.read_text())["dataset"].get("coco"):
        words[words.index(_job_file(line))] = str(_coco_stand_in(job, tmp_path))
    before = sorted(p.name for p in REPO.iterdir())
    result = CliRunner().invoke(app, words + ["--dry-run"])
    assert result.exit_code == 0, f"{where}: {line} --dry-run:\n{result.output}"
    assert "trials" in result.output and sorted(p.name for p in REPO.iterdir()) == before


def test_documented_cluster_addresses_are_accepted_by_the_runner(monkeypatch, tmp_path):
    """Every ``--address`` the documentation gives passes the runner's own check (Ray Client's
    ``ray://`` is refused there), which comes before anything is opened."""
    import ablate.store
    from ablate.runner import JobError, run_job
    from ablate.spec import load_job_spec

    addresses = [(w, parse(c)["address"]) for w, c, _ in COMMANDS if "--address" in shlex.split(c)]
    assert addresses, "the documentation shows no --address (the COCO job's comment does)"

    class Reached(Exception):
        pass

    def stop(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(ablate.store, "open_store", stop)
    spec = load_job_spec(REPO / "jobs" / "quickstart.yaml", store=f"sqlite:///{tmp_path / 'unused.db'}")
    for where, address in addresses:
        with pytest.raises(Reached):  # past the address check, stopped at the store
            try:
                run_job(spec, "", address=address, live=False, mlflow=False)
            except JobError as e:
                pytest.fail(f"{where}: {e}")


# --------------------------------------------------------------------------- jobs/coco.yaml
def _coco_job() -> dict:
    return yaml.safe_load((REPO / "jobs" / "coco.yaml").read_text())


def test_coco_job_keeps_no_decoded_images_and_validates():
    """COCO train2017 decoded is ~100 GB per process: the COCO job turns the image cache off, and the
    rest of the file is a valid spec (its data paths only exist on the cluster)."""
    from ablate.spec import JobSpec

    raw = _coco_job()
    assert raw["dataset"]["cache"] == "none"
    spec = JobSpec.model_validate(raw)  # the model, not load_job_spec: that also wants the files
    assert spec.dataset.cache == "none"


def test_job_comments_on_threads_say_what_threads_does():
    """``threads`` is torch's CPU thread count (``torch.set_num_threads``) and, unless ``data.workers``
    is set, one more than the loader's worker processes: a comment on it must say torch, and where it
    speaks of workers, give them as threads - 1."""
    import inspect

    from ablate import train
    from ablate.config import TrialConfig

    source = inspect.getsource(train)
    assert "torch.set_num_threads(config.threads)" in source
    for path in _yaml_files():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*threads:", line) and "#" in line:
                comment = line.split("#", 1)[1].lower()
                assert "torch" in comment, f"{path.name}:{n}: {line}"
                if "worker" in comment:
                    threads = int(line.split(":", 1)[1].split("#")[0])
                    assert f"threads - 1 = {threads - 1}" in comment, f"{path.name}:{n}: {line}"
                    assert train.loader_workers(TrialConfig.model_validate({"threads": threads})) == threads - 1


# --------------------------------------------------------------------------- README figures and layout
def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_loss_benchmark_repeats_match_the_command_shown():
    """"median of N" in the loss benchmark is what a command shown in that section does (its
    ``--repeats``, or the default)."""
    section = _section("Loss benchmark")
    (n,) = {int(m) for m in re.findall(r"median of (\d+)", section)}
    shown = [c for c, _ in _commands_in(section) if c.startswith("ablate bench loss")]
    assert shown and n in {parse(c)["repeats"] for c in shown}, (n, shown)


def _layout_entries() -> set[str]:
    """The paths the README's layout block lists (``ablate/cli.py, cli_jobs.py`` is two; an indented
    name lies in the folder above it)."""
    block = _section("Layout").split("```")[1]
    listed, folder = set(), ""
    for line in block.splitlines()[1:]:
        m = re.match(r"(\s*)([^\s,]+(?:, [^\s,]+)*)", line)
        if not m:
            continue
        names = m.group(2).split(", ")
        if m.group(1):
            listed |= {folder + n for n in names}
            continue
        head = names[0]
        folder = head if head.endswith("/") else head.rsplit("/", 1)[0] + "/" if "/" in head else ""
        listed |= {head} | {(head.rsplit("/", 1)[0] + "/" if "/" in head else "") + n for n in names[1:]}
    return listed


def test_readme_layout_lists_every_module_and_folder():
    """Every module and folder of the package (and each file of ablate/detect/, listed one by one),
    and every top-level folder of the repository, is in the layout; everything listed exists."""
    listed = _layout_entries()
    for entry in listed:
        assert (REPO / entry).exists(), f"README layout lists {entry}, which does not exist"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    top = {f.split("/")[0] + "/" for f in tracked if "/" in f and not f.startswith(".")}
    unlisted = [t for t in top if not any(e.startswith(t) for e in listed)]
    assert not unlisted, f"missing from README's layout: {sorted(unlisted)}"
    pkg = REPO / "ablate"
    wanted = {f"ablate/{p.name}" for p in pkg.glob("*.py") if p.name != "__init__.py"}
    wanted |= {f"ablate/{p.name}/" for p in pkg.iterdir() if p.is_dir() and p.name != "__pycache__"}
    wanted |= {f"ablate/detect/{p.name}" for p in (pkg / "detect").glob("*.py") if p.name != "__init__.py"}
    assert not wanted - listed, f"missing from README's layout: {sorted(wanted - listed)}"


# --------------------------------------------------------------------------- dashboards/views.sql
def test_metric_curves_comment_says_how_often_losses_are_recorded():
    """The loss terms are recorded per training report (every ``train.log_every`` steps), not per epoch."""
    from ablate.config import TrainConfig

    sql = (REPO / "dashboards" / "views.sql").read_text()
    comment = sql[:sql.index("CREATE VIEW metric_curves")].rsplit("\n\n", 1)[-1]
    assert "metric_curves" in comment and "per epoch" not in comment
    field = re.search(r"train\.(\w+) steps", comment)
    assert field and field.group(1) in TrainConfig.model_fields, comment
