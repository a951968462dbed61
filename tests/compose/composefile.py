"""Reading compose files and the Dockerfile the way Docker would, without Docker.

- :func:`load`: a compose file with ``${VAR}`` interpolation (defaults applied, each variable
  recorded) — the schema applies to the interpolated model, as in ``docker compose config``.
- :func:`merge`: ``-f a.yaml -f b.yaml`` (mappings merged, sequences of ports and volumes
  appended, everything else replaced).
- :class:`Dockerfile`: its instructions; :func:`dockerignored`: ``.dockerignore`` matching.
- :func:`parse_cli`: a container's ``broker`` arguments parsed by the real click application.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from pathlib import Path
from typing import Any

import click
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Path(__file__).with_name("compose-spec") / "compose-spec.json"
COMPOSE = ROOT / "compose.yaml"
OVERLAY = ROOT / "tests" / "compose" / "compose.test.yaml"

_VAR = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$", re.S)


@dataclasses.dataclass
class Loaded:
    path: Path
    model: dict[str, Any]
    #: every variable used: name -> whether every use has a default
    variables: dict[str, bool]


def _interpolate(node: Any, env: dict[str, str], seen: dict[str, bool]) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, env, seen) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env, seen) for v in node]
    if not isinstance(node, str):
        return node

    def one(m: re.Match[str]) -> str:
        if m["dollar"]:
            return "$"
        if m["bare"]:
            seen[m["bare"]] = False  # $NAME has no default
            return env.get(m["bare"], "")
        spec = _BRACED.match(m["braced"])
        if spec is None:
            raise ValueError(f"invalid interpolation ${{{m['braced']}}}")
        name, op, arg = spec["name"], spec["op"], spec["arg"] or ""
        has_default = op in (":-", "-")
        seen[name] = seen.get(name, True) and has_default
        value = env.get(name)
        if op in (":-", "-"):
            use_default = value is None or (op == ":-" and value == "")
            return _interpolate(arg, env, seen) if use_default else value  # type: ignore[return-value]
        if op in (":?", "?") and (value is None or (op == ":?" and value == "")):
            raise ValueError(f"required variable {name} is missing: {arg}")
        if op in (":+", "+"):
            return arg if value else ""
        return value or ""

    return _VAR.sub(one, node)


def load(path: Path, env: dict[str, str] | None = None) -> Loaded:
    """The compose file at ``path``, interpolated with ``env`` (default: no variables set, so
    every default applies)."""
    raw = yaml.safe_load(path.read_text())
    seen: dict[str, bool] = {}
    model = _interpolate(raw, env or {}, seen)
    return Loaded(path, model, seen)


_APPENDED = {"ports", "volumes", "expose", "dns", "extra_hosts"}


def merge(base: dict[str, Any], override: dict[str, Any], *, key: str = "") -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if k in out and isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = merge(out[k], v, key=k)
        elif k in out and k in _APPENDED and isinstance(out[k], list) and isinstance(v, list):
            out[k] = [*out[k], *v]
        else:
            out[k] = v
    return out


def depends_on(service: dict[str, Any]) -> list[str]:
    deps = service.get("depends_on") or []
    return list(deps) if isinstance(deps, dict) else [str(d) for d in deps]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


# -- the image ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Instruction:
    keyword: str
    args: str

    def json_args(self) -> list[str] | None:
        """The exec form (``["a", "b"]``) as a list, else None."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        parsed = yaml.safe_load(text)  # a JSON array is YAML too
        return [str(x) for x in parsed]


class Dockerfile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.instructions: list[Instruction] = []
        logical = ""
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if not logical and (not stripped or stripped.startswith("#")):
                continue
            if stripped.startswith("#"):
                continue  # a comment inside a continued instruction
            if stripped.endswith("\\"):
                logical += stripped[:-1] + " "
                continue
            logical += stripped
            keyword, _, args = logical.partition(" ")
            self.instructions.append(Instruction(keyword.upper(), args.strip()))
            logical = ""

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def copy_sources(self) -> list[str]:
        out = []
        for ins in self.all("COPY"):
            parts = [p for p in ins.args.split() if not p.startswith("--")]
            out += parts[:-1]
        return out


def dockerignored(relpath: str, patterns: list[str]) -> bool:
    """Whether ``.dockerignore`` ``patterns`` exclude ``relpath`` from the build context (the
    last matching pattern wins; a pattern matches a path or any of its parent directories)."""
    parts = relpath.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(c.rsplit("/", 1)[-1], pattern[3:]) for c in candidates)
        else:
            hit = any(fnmatch.fnmatchcase(c, pattern) for c in candidates)
        if hit:
            excluded = not negate
    return excluded


def dockerignore_patterns(root: Path = ROOT) -> list[str]:
    path = root / ".dockerignore"
    if not path.exists():
        return []
    lines = (ln.strip() for ln in path.read_text().splitlines())
    return [ln for ln in lines if ln and not ln.startswith("#")]


# -- the CLI ------------------------------------------------------------------------------------


def parse_cli(args: list[str]) -> tuple[list[str], click.Context]:
    """Parse ``broker ARGS`` with the real click application without running anything.

    Returns the command path (e.g. ``["worker"]``) and the innermost context (its ``params``).

    :raises click.UsageError: on an unknown command or option, or a bad value.
    """
    from broker.cli.main import cli

    if args and args[0].startswith("-"):
        raise click.UsageError(
            f"global options in a container command ({args[0]}): set BROKER_URL / "
            "BROKER_NAMESPACE in the service's environment instead"
        )
    ctx = click.Context(cli, info_name="broker")
    command: click.Command = cli
    rest = list(args)
    path: list[str] = []
    while isinstance(command, click.Group):
        if not rest:
            raise click.UsageError(f"missing a subcommand after {' '.join(['broker', *path])}")
        sub = command.get_command(ctx, rest[0])
        if sub is None:
            raise click.UsageError(f"no such command: broker {' '.join([*path, rest[0]])}")
        path.append(rest[0])
        if isinstance(sub, click.Group):
            ctx = click.Context(sub, info_name=rest[0], parent=ctx)
            command, rest = sub, rest[1:]
            continue
        ctx = sub.make_context(rest[0], rest[1:], parent=ctx)
        command = sub
    return path, ctx
