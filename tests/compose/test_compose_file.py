"""compose.yaml (and the tests' overlay) checked without a Docker engine, as CI must.

1. The interpolated files validate against the Compose Specification's JSON schema (vendored in
   ``compose-spec/``; a few broken variants must fail it, so the check is not vacuous).
2. What the schema cannot see: every ``depends_on`` names a service, with no cycle; every
   variable has a default; Redis 7 with AOF and a health check; the worker image builds from
   this repository (the Dockerfile's sources exist and survive ``.dockerignore``, and exactly
   those files build the distribution with its ``broker`` command); each container's ``broker``
   arguments parse with the real CLI; each worker's handler imports and is of the kind its
   options say; each environment variable is one something reads.
3. ``docker compose config`` when the docker client has the compose plugin (it needs no
   engine); otherwise reported as not run, with the reason.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import jsonschema
import pytest

from tests.compose.composefile import (
    COMPOSE,
    OVERLAY,
    ROOT,
    SCHEMA,
    Dockerfile,
    depends_on,
    dockerignore_patterns,
    dockerignored,
    env_of,
    load,
    merge,
    parse_cli,
)
from tests.compose.stack import required

FILES = [COMPOSE, OVERLAY]
#: environment variables the broker CLI and Python themselves read
KNOWN_ENV = {"BROKER_URL", "BROKER_NAMESPACE", "BROKER_HOST", "PYTHONPATH", "PYTHONUNBUFFERED"}


def _validator() -> jsonschema.Draft201909Validator:
    schema = json.loads(SCHEMA.read_text())
    # it says "$schema": "http://json-schema.org/draft/2019-09/schema#", a spelling of draft
    # 2019-09 that jsonschema does not look up by itself
    assert "2019-09" in schema["$schema"], schema["$schema"]
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def _errors(model: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}"
        for e in sorted(_validator().iter_errors(model), key=lambda e: list(e.absolute_path))
    ]


def _effective() -> dict[str, Any]:
    """compose.yaml with the test overlay on top, as ``-f compose.yaml -f compose.test.yaml``."""
    return merge(load(COMPOSE).model, load(OVERLAY).model)


def _models() -> dict[str, dict[str, Any]]:
    return {"compose.yaml": load(COMPOSE).model, "compose.yaml+overlay": _effective()}


def _image_services(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services built from this repository (the worker image, entrypoint ``broker``)."""
    return {name: svc for name, svc in model["services"].items() if "build" in svc}


# -- 1. the schema ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_validates_against_the_compose_spec_schema(path: Path) -> None:
    errors = _errors(load(path).model)
    assert not errors, f"{path.name} breaks the compose-spec schema:\n" + "\n".join(errors)


def _mutations() -> list[tuple[str, Any]]:
    def typo(m: dict[str, Any]) -> None:
        m["services"]["consumer"]["healtcheck"] = m["services"]["consumer"].pop("healthcheck")

    def condition(m: dict[str, Any]) -> None:
        m["services"]["consumer"]["depends_on"]["redis"]["condition"] = "service_ready"

    def replicas(m: dict[str, Any]) -> None:
        m["services"]["consumer"]["deploy"]["replicas"] = "three"

    def command(m: dict[str, Any]) -> None:
        m["services"]["producer"]["command"] = {"worker": "orders"}

    def top(m: dict[str, Any]) -> None:
        m["service"] = m.pop("services")

    return [("typo", typo), ("condition", condition), ("replicas", replicas),
            ("command", command), ("top-level", top)]  # fmt: skip


@pytest.mark.parametrize("mutate", [m for _, m in _mutations()], ids=[n for n, _ in _mutations()])
def test_the_schema_rejects_a_broken_file(mutate: Any) -> None:
    model = copy.deepcopy(load(COMPOSE).model)
    mutate(model)
    assert _errors(model), "the schema accepted a broken compose file: the check is vacuous"


# -- 2. what the schema cannot see ------------------------------------------------------------


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_variable_has_a_default(path: Path) -> None:
    loaded = load(path)
    bare = sorted(name for name, has_default in loaded.variables.items() if not has_default)
    assert not bare, f"{path.name}: ${bare} without a default (empty without a .env file)"


@pytest.mark.parametrize("which", ["compose.yaml", "compose.yaml+overlay"])
def test_depends_on_names_services_without_cycles(which: str) -> None:
    services = _models()[which]["services"]
    for name, svc in services.items():
        missing = [d for d in depends_on(svc) if d not in services]
        assert not missing, f"{which}: {name} depends on unknown services {missing}"

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"{which}: a depends_on cycle {' -> '.join((*path, name))}"
        for dep in depends_on(services[name]):
            visit(dep, (*path, name))

    for name in services:
        visit(name, ())


def test_services_of_the_issue_are_there() -> None:
    model = load(COMPOSE).model
    services = model["services"]
    workers = {n: s for n, s in _image_services(model).items() if s["command"][0] == "worker"}
    consumers = [n for n, s in workers.items() if "--group" in s["command"]]
    producers = [n for n, s in workers.items() if "--group" not in s["command"]]
    tails = [n for n, s in _image_services(model).items() if s["command"][0] == "tail"]
    assert "redis" in services and consumers and producers and tails, sorted(services)
    for name in consumers:
        replicas = services[name].get("deploy", {}).get("replicas", services[name].get("scale"))
        assert isinstance(replicas, int) and replicas >= 2, f"{name}: replicas {replicas!r}"
    # the run-once services stay out of a plain `docker compose up`
    for name in ("tests", "demo"):
        assert services[name].get("profiles"), f"{name} would start with `docker compose up`"


def test_redis_is_7_with_aof_and_a_health_check() -> None:
    redis = load(COMPOSE).model["services"]["redis"]
    image = redis["image"]
    assert image.split(":")[0] == "redis" and image.split(":")[1].startswith("7"), image
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes", command
    check = redis["healthcheck"]
    assert not check.get("disable") and "ping" in " ".join(check["test"]), check
    for name, svc in load(COMPOSE).model["services"].items():
        if "redis" in depends_on(svc):
            assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_the_worker_image_is_built_from_this_repository() -> None:
    model = load(COMPOSE).model
    built = _image_services(model)
    assert {"producer", "consumer", "tail"} <= set(built), sorted(built)
    for name, svc in built.items():
        build = svc["build"] if isinstance(svc["build"], dict) else {"context": svc["build"]}
        context = (COMPOSE.parent / build.get("context", ".")).resolve()
        assert context == ROOT, f"{name}: build context {context}"
        assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name

    df = Dockerfile(ROOT / "Dockerfile")
    base = df.all("FROM")
    assert len(base) == 1 and base[0].args == "python:3.11-slim", base
    # the repository itself is installed (with extras or not)
    assert any(
        re.search(r"pip install (\.|\"\.\[[a-z,]+\]\")(\s|$)", run.args) for run in df.all("RUN")
    ), df.all("RUN")
    entry = df.all("ENTRYPOINT")
    assert entry and entry[-1].json_args() == ["broker"], entry
    check = df.all("HEALTHCHECK")
    assert check and " CMD " in f" {check[-1].args} ", check
    assert json.loads(check[-1].args.split("CMD", 1)[1]) == ["broker", "worker", "--check"], check
    ignored = dockerignore_patterns()
    for source in df.copy_sources():
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not dockerignored(source, ignored), f"COPY {source}: excluded by .dockerignore"


def test_the_image_sources_build_the_distribution(tmp_path: Path) -> None:
    """Exactly what the Dockerfile copies (less what .dockerignore drops) builds a wheel with
    the library, the CLI and the worker runtime under ``broker`` and the ``broker`` command:
    ``pip install .`` in the image works."""
    ignored = dockerignore_patterns()
    context = tmp_path / "context"
    context.mkdir()
    for source in Dockerfile(ROOT / "Dockerfile").copy_sources():
        src = ROOT / source
        # as docker COPY does: links are copied as links (broker/cli -> ../cli)
        files = (
            [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file() or p.is_symlink()]
        )
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if dockerignored(rel, ignored):
                continue
            (context / rel).parent.mkdir(parents=True, exist_ok=True)
            if f.is_symlink():
                (context / rel).symlink_to(f.readlink())
            else:
                shutil.copy2(f, context / rel)
    out = tmp_path / "wheel"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
         "--disable-pip-version-check", "-w", str(out), str(context)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (wheel,) = out.glob("broker-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = z.read(entry_points).decode()
    for module in ("broker/__init__.py", "broker/workers/__init__.py", "broker/cli/main.py"):
        assert module in names, f"{module} missing from the image's distribution"
    assert "broker = broker.cli.main:main" in scripts, scripts


def _arguments() -> list[tuple[str, str, list[str]]]:
    """(model, what, broker arguments) for every command and health check of the image."""
    out = []
    for which, model in _models().items():
        for name, svc in _image_services(model).items():
            out.append((which, f"{name} command", [str(a) for a in svc["command"]]))
            test = (svc.get("healthcheck") or {}).get("test")
            if test and not svc["healthcheck"].get("disable"):
                assert test[0] == "CMD" and test[1] == "broker", (which, name, test)
                out.append((which, f"{name} healthcheck", [str(a) for a in test[2:]]))
    return out


@pytest.mark.parametrize(
    "args", [a for _, _, a in _arguments()], ids=[f"{m}:{w}" for m, w, _ in _arguments()]
)
def test_container_arguments_parse_with_the_cli(args: list[str]) -> None:
    try:
        path, ctx = parse_cli(args)
    except click.UsageError as exc:
        pytest.fail(f"`broker {' '.join(args)}` does not parse: {exc.format_message()}")
    if path != ["worker"] or ctx.params.get("check"):
        return
    # a worker: its handler imports and is of the kind its options say
    target = ctx.params["handler"]
    module_name, _, attr = target.partition(":")
    try:
        handler = getattr(__import__(module_name, fromlist=[attr]), attr)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"{target}: does not import ({exc})")
    channels, group = ctx.params["channels"], ctx.params["group"]
    assert channels, f"{target}: no --channel"
    if inspect.isasyncgenfunction(handler):
        assert group is None and len(channels) == 1, f"{target} is a producer: one --channel"
    else:
        assert inspect.iscoroutinefunction(handler), f"{target}: not an async handler"
        assert group is not None, f"{target} is a consumer: it needs --group"


@pytest.mark.parametrize("which", ["compose.yaml", "compose.yaml+overlay"])
def test_environment_variables_are_read_by_something(which: str) -> None:
    model = _models()[which]
    for name, svc in _image_services(model).items():
        env = env_of(svc)
        command = [str(a) for a in svc["command"]]
        source = ""
        if command[0] == "worker":
            module = command[1].partition(":")[0]
            source = Path(__import__(module, fromlist=["_"]).__file__ or "").read_text()
        unread = [k for k in env if k not in KNOWN_ENV and f'"{k}"' not in source]
        assert not unread, f"{which}: {name} sets {unread}; neither broker nor its handler reads it"
        url = urlsplit(env.get("BROKER_URL", ""))
        assert url.hostname in model["services"], f"{which}: {name}: BROKER_URL host {url.hostname}"
        assert url.hostname in depends_on(svc), f"{which}: {name} does not wait for {url.hostname}"


def test_image_healthcheck_fits_each_service() -> None:
    """The image's HEALTHCHECK (``broker worker --check``) fails where no worker runs: such
    services disable it; worker services keep one."""
    for which, model in _models().items():
        for name, svc in _image_services(model).items():
            check = svc.get("healthcheck") or {}
            if svc["command"][0] == "worker":
                assert not check.get("disable"), f"{which}: {name} runs a worker unchecked"
            else:
                assert check.get("disable"), f"{which}: {name} runs no worker but is checked"


# -- 3. docker compose config -------------------------------------------------------------------


def _compose_cli() -> str | None:
    """Why ``docker compose`` cannot be used here, or None."""
    if shutil.which("docker") is None:
        return "no docker client on PATH"
    try:
        done = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`docker compose version` failed: {exc}"
    if done.returncode != 0:
        return "the docker client has no compose plugin (`docker compose version` failed)"
    return None


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, OVERLAY]], ids=["alone", "with-overlay"])
def test_docker_compose_config(files: list[Path]) -> None:
    why_not = _compose_cli()
    if why_not:
        message = f"`docker compose config` not run: {why_not}; the schema tests stand in"
        if required():  # CI installs the compose plugin (.ci/docker)
            pytest.fail(f"{message}; required here (CI=true or BROKER_REQUIRE_COMPOSE=1)", False)
        pytest.skip(message)
    argv = ["docker", "compose", "--project-directory", str(ROOT)]
    for f in files:
        argv += ["-f", str(f)]
    done = subprocess.run([*argv, "config", "--quiet"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr
