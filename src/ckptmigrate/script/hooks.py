"""``post_write_hooks``: programs run on every revision file ckptmigrate writes.

Configured as in Alembic, in a ``[post_write_hooks]`` section of the ini file
(or ``[[tool.ckptmigrate.post_write_hooks]]`` tables in ``pyproject.toml``)::

    [post_write_hooks]
    hooks = ruff
    ruff.type = exec
    ruff.executable = %(here)s/.venv/bin/ruff
    ruff.options = format REVISION_SCRIPT_FILENAME

``type`` is ``console_scripts`` (``entrypoint``: a console script installed in
this environment), ``exec`` (``executable``) or ``module`` (``module``, run as
``python -m``); ``options`` is split like a shell command line, with
``REVISION_SCRIPT_FILENAME`` replaced by the new file's path (put first when
absent); ``cwd`` is the folder the hook runs in. Unlike Alembic, a hook that
exits with a failure status is an error, not ignored.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import CommandError, ConfigError

TOKEN = "REVISION_SCRIPT_FILENAME"


KINDS = ("console_scripts", "exec", "module")


@dataclass(frozen=True)
class Hook:
    name: str
    options: Mapping[str, str]

    def __post_init__(self) -> None:
        kind = self.options.get("type")
        if kind not in KINDS:
            raise ConfigError(
                f"post_write_hooks: {self.name}.type is " + (repr(kind) if kind else "missing"),
                hint="say how to run the hook: " + ", ".join(KINDS),
            )

    def option(self, key: str) -> str:
        value = self.options.get(key)
        if not value:
            raise ConfigError(
                f"post_write_hooks: {self.name}.{key} is required for a hook of type "
                f"{self.options.get('type')!r}",
                hint=f"add '{self.name}.{key} = ...' to [post_write_hooks]",
            )
        return value

    def command(self) -> list[str]:
        import importlib.metadata
        import importlib.util

        kind = self.options.get("type")
        if kind == "module":
            module = self.option("module")
            if importlib.util.find_spec(module) is None:
                raise ConfigError(
                    f"post_write_hooks: {self.name}: there is no module {module!r} to run",
                    hint="install it, or fix the module name",
                )
            return [sys.executable, "-m", module]
        if kind == "console_scripts":
            name = self.option("entrypoint")
            for entry in importlib.metadata.entry_points(group="console_scripts"):
                if entry.name == name:
                    module, _, attr = entry.value.partition(":")
                    code = f"import sys, {module}; sys.exit({module}.{attr.strip()}())"
                    return [sys.executable, "-c", code]
            raise ConfigError(
                f"post_write_hooks: {self.name}: no console script {name!r} is installed",
                hint="install the tool in this environment, or use type = exec",
            )
        return [self.option("executable")]

    def run(self, path: Path) -> None:
        import shlex
        import subprocess

        text = self.options.get("options", "")
        if TOKEN not in text:
            text = f"{TOKEN} {text}"
        args = [a.replace(TOKEN, str(path)) for a in shlex.split(text)]
        try:
            done = subprocess.run(
                [*self.command(), *args],
                cwd=self.options.get("cwd") or None,
                capture_output=True,
                text=True,
            )
        except OSError as exc:
            raise CommandError(
                f"post_write_hook {self.name!r} could not run: {exc.strerror}",
                hint="check its executable or cwd in [post_write_hooks]",
            ) from exc
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip().splitlines()
            raise CommandError(
                f"post_write_hook {self.name!r} exited with status {done.returncode} on "
                f"{path.name}" + (f": {said[-1]}" if said else ""),
                hint="fix the hook (see [post_write_hooks]) or the file it rejected",
            )


def parse_ini_hooks(section: Mapping[str, str]) -> list[Hook]:
    """Alembic's layout: ``hooks = a, b`` and ``a.type = ...`` for each."""
    names = [n for n in section.get("hooks", "").replace(",", " ").split() if n]
    hooks = []
    for name in names:
        prefix = name + "."
        options = {k[len(prefix) :]: v for k, v in section.items() if k.startswith(prefix)}
        hooks.append(Hook(name, options))
    return hooks


def parse_toml_hooks(tables: Sequence[Mapping[str, object]]) -> list[Hook]:
    """``[[tool.ckptmigrate.post_write_hooks]]`` tables, each with a ``name``."""
    hooks = []
    for i, table in enumerate(tables):
        if not isinstance(table, Mapping):
            raise ConfigError(
                "post_write_hooks in pyproject.toml must be tables",
                hint="write [[tool.ckptmigrate.post_write_hooks]] with name, type, ...",
            )
        options = {str(k): str(v) for k, v in table.items()}
        name = options.pop("name", f"hook {i + 1}")
        hooks.append(Hook(name, options))
    return hooks


def run_hooks(hooks: Sequence[Hook], path: Path, log: Callable[[str], None] | None = None) -> None:
    for hook in hooks:
        if log is not None:
            log(f"Running post_write_hook {hook.name!r} on {path.name}")
        hook.run(path)
