"""Where a lineage's settings come from, and how commands talk to the user.

Lookup order for the file: ``-c/--config``, ``$CKPTMIGRATE_CONFIG``,
``alembic_style.ini`` in the working directory, then ``[tool.ckptmigrate]``
in ``pyproject.toml``. One section per lineage, picked with ``-n/--name``.
"""

from __future__ import annotations

import configparser
import copy
import importlib
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .errors import ConfigError

if TYPE_CHECKING:
    from .script.hooks import Hook

DEFAULT_INI = "alembic_style.ini"
DEFAULT_SECTION = "ckptmigrate"
ENV_VAR = "CKPTMIGRATE_CONFIG"
DEFAULT_FILE_TEMPLATE = "%(rev)s_%(slug)s"


class Config:
    """One section of a configuration file, plus the command's output streams."""

    def __init__(
        self,
        file: str | os.PathLike[str] | None = None,
        section: str = DEFAULT_SECTION,
        options: Mapping[str, str] | None = None,
        *,
        quiet: bool = False,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        echo: bool = True,
    ) -> None:
        self.file = Path(file).resolve() if file is not None else None
        self.section = section
        self.quiet = quiet
        self.echo = echo  # False: results are returned, not printed (the Python API)
        self._stdout = stdout
        self._stderr = stderr
        self._options: dict[str, str] = dict(options or {})
        #: what is worked out from this configuration once (the model built on meta);
        #: shared with the copies :meth:`redirected` makes
        self.memo: dict[str, Any] = {}
        if self.file is not None and self.file.exists():
            self._options = {**self._read(self.file, section), **self._options}

    # ----------------------------------------------------------------- reading

    @property
    def here(self) -> Path:
        return self.file.parent if self.file is not None else Path.cwd()

    def _read(self, file: Path, section: str) -> dict[str, str]:
        if file.name == "pyproject.toml" or file.suffix == ".toml":
            return _read_pyproject(file, section, self.here)
        parser = configparser.ConfigParser(defaults={"here": str(file.parent)})
        try:
            with open(file, encoding="utf-8") as fh:
                parser.read_file(fh)
        except (OSError, UnicodeDecodeError, configparser.Error) as exc:
            raise ConfigError(
                f"cannot read configuration {file}: {_first_line(exc)}",
                hint="fix the file or pass another with -c PATH",
            ) from exc
        if not parser.has_section(section):
            found = ", ".join(parser.sections()) or "none"
            raise ConfigError(
                f"no [{section}] section in {file} (sections: {found})",
                hint="pick a section with -n NAME or add it to the file",
            )
        try:
            return {k: v for k, v in parser.items(section) if k != "here"}
        except configparser.Error as exc:
            raise ConfigError(
                f"bad value in [{section}] of {file}: {_first_line(exc)}",
                hint="write a literal percent sign as %%",
            ) from exc

    def get(self, option: str, default: str | None = None) -> str | None:
        value = self._options.get(option)
        return default if value is None or value == "" else value

    def set(self, option: str, value: str) -> None:
        self._options[option] = value
        self.memo.clear()  # worked out from the old settings

    @property
    def script_location(self) -> Path:
        location = self.get("script_location")
        if location is None:
            where = self.file or "the configuration"
            raise ConfigError(
                f"no script_location in [{self.section}] of {where}",
                hint="add 'script_location = %(here)s/migrations', "
                "or run 'ckptmigrate init migrations'",
            )
        path = Path(location)
        return path if path.is_absolute() else (self.here / path)

    @property
    def file_template(self) -> str:
        return self.get("file_template", DEFAULT_FILE_TEMPLATE) or DEFAULT_FILE_TEMPLATE

    @property
    def truncate_slug_length(self) -> int:
        raw = self.get("truncate_slug_length", "40")
        try:
            return int(raw or 40)
        except ValueError:
            raise ConfigError(
                f"truncate_slug_length must be a whole number, not {raw!r}",
                hint=f"fix [{self.section}] in {self.file}",
            ) from None

    def prepend_sys_path(self) -> None:
        """Put ``prepend_sys_path`` entries (relative to the file) on sys.path."""
        raw = self.get("prepend_sys_path")
        if not raw:
            return
        for entry in reversed(raw.replace(",", " ").split()):
            path = str((self.here / entry).resolve())
            if path not in sys.path:
                sys.path.insert(0, path)

    def model_factory(self) -> Callable[[], Any] | None:
        """The ``model = pkg.module:callable`` that builds the current model."""
        spec = self.get("model")
        if not spec:
            return None
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ConfigError(
                f"model = {spec!r} is not of the form 'package.module:callable'",
                hint=f"fix [{self.section}] in {self.file}",
            )
        self.prepend_sys_path()
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(
                f"cannot import {module_name!r} for model = {spec}: {exc}",
                hint="check prepend_sys_path and that the package is installed",
            ) from exc
        factory = module
        for part in attr.split("."):
            try:
                factory = getattr(factory, part)
            except AttributeError:
                raise ConfigError(
                    f"{module_name} has no attribute {attr!r} (model = {spec})",
                    hint=f"fix [{self.section}] in {self.file}",
                ) from None
        if not callable(factory):
            raise ConfigError(
                f"model = {spec} is not callable", hint="point it at a function or class"
            )
        return factory

    def post_write_hooks(self) -> list[Hook]:
        """The ``[post_write_hooks]`` of the configuration file, as in Alembic's ini."""
        from .script.hooks import parse_ini_hooks, parse_toml_hooks

        if self.file is None or not self.file.exists():
            return []
        if self.file.name == "pyproject.toml" or self.file.suffix == ".toml":
            table = _load_toml(self.file).get("tool", {}).get("ckptmigrate", {})
            tables = table.get("post_write_hooks", []) if isinstance(table, dict) else []
            return parse_toml_hooks(tables if isinstance(tables, list) else [tables])
        parser = configparser.ConfigParser(defaults={"here": str(self.file.parent)})
        try:
            with open(self.file, encoding="utf-8") as fh:
                parser.read_file(fh)
            if not parser.has_section("post_write_hooks"):
                return []
            items = {k: v for k, v in parser.items("post_write_hooks") if k != "here"}
        except (OSError, UnicodeDecodeError, configparser.Error) as exc:
            raise ConfigError(
                f"cannot read [post_write_hooks] in {self.file}: {_first_line(exc)}",
                hint="fix the section (write a literal percent sign as %%)",
            ) from exc
        return parse_ini_hooks(items)

    # ----------------------------------------------------------------- output

    @property
    def stdout(self) -> TextIO:
        return self._stdout or sys.stdout

    @property
    def stderr(self) -> TextIO:
        return self._stderr or sys.stderr

    def redirected(self, stdout: TextIO, stderr: TextIO) -> Config:
        """The same configuration printing elsewhere (a batch keeps each checkpoint's lines)."""
        other = copy.copy(self)
        other._stdout, other._stderr = stdout, stderr
        return other

    def print_stdout(self, text: str = "") -> None:
        """Results: shown even with -q (not where the caller takes them as return values)."""
        if self.echo:
            print(text, file=self.stdout)

    def log(self, text: str) -> None:
        """Progress and notes on stderr; silenced by -q."""
        if not self.quiet:
            print(text, file=self.stderr, flush=True)

    # ----------------------------------------------------------------- discovery

    @classmethod
    def discover(
        cls,
        path: str | os.PathLike[str] | None = None,
        section: str = DEFAULT_SECTION,
        *,
        cwd: str | os.PathLike[str] | None = None,
        must_exist: bool = True,
        **kwargs: Any,
    ) -> Config:
        """Find the configuration the way the command line does."""
        base = Path(cwd) if cwd is not None else Path.cwd()
        candidates: list[Path] = []
        if path is not None:
            explicit = Path(path)
            explicit = explicit if explicit.is_absolute() else base / explicit
            if must_exist and not explicit.exists():
                raise ConfigError(
                    f"configuration file {path} does not exist",
                    hint="check the -c path, or run 'ckptmigrate init migrations' to create one",
                )
            return cls(explicit, section, **kwargs)
        env = os.environ.get(ENV_VAR)
        if env:
            env_path = Path(env)
            if must_exist and not env_path.exists():
                raise ConfigError(
                    f"${ENV_VAR} points at {env}, which does not exist",
                    hint=f"fix or unset {ENV_VAR}",
                )
            return cls(env_path, section, **kwargs)
        candidates.append(base / DEFAULT_INI)
        pyproject = base / "pyproject.toml"
        for candidate in candidates:
            if candidate.exists():
                return cls(candidate, section, **kwargs)
        if pyproject.exists() and _pyproject_has_section(pyproject, section):
            return cls(pyproject, section, **kwargs)
        if must_exist:
            raise ConfigError(
                f"no configuration found: no {DEFAULT_INI} and no [tool.ckptmigrate] "
                f"in pyproject.toml in {base}",
                hint="run 'ckptmigrate init migrations', or pass -c PATH",
            )
        return cls(base / DEFAULT_INI, section, **kwargs)

    @classmethod
    def from_location(cls, location: str | os.PathLike[str], **kwargs: Any) -> Config:
        """A config from an ini/pyproject file or straight from a migrations folder."""
        path = Path(location)
        if path.is_dir():
            if (path / "versions").is_dir():
                return cls(None, options={"script_location": str(path.resolve())}, **kwargs)
            for name in (DEFAULT_INI, "pyproject.toml"):
                if (path / name).exists():
                    return cls(path / name, **kwargs)
            raise ConfigError(
                f"{location} is neither a migrations folder (no versions/ inside) "
                "nor a folder with alembic_style.ini",
                hint="pass the migrations folder or the ini file",
            )
        if not path.exists():
            raise ConfigError(
                f"{location} does not exist",
                hint="pass the migrations folder or the alembic_style.ini that points at it",
            )
        return cls(path, **kwargs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _load_toml(file: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(file, "rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"cannot read {file}: {_first_line(exc)}", hint="fix the TOML syntax"
        ) from exc


def _pyproject_table(data: dict[str, Any], section: str) -> dict[str, Any] | None:
    table = data.get("tool", {}).get("ckptmigrate")
    if not isinstance(table, dict):
        return None
    if section == DEFAULT_SECTION:
        return table
    sub = table.get(section)
    return sub if isinstance(sub, dict) else None


def _pyproject_has_section(file: Path, section: str) -> bool:
    return _pyproject_table(_load_toml(file), section) is not None


def _read_pyproject(file: Path, section: str, here: Path) -> dict[str, str]:
    table = _pyproject_table(_load_toml(file), section)
    if table is None:
        name = "tool.ckptmigrate" + ("" if section == DEFAULT_SECTION else f".{section}")
        raise ConfigError(f"no [{name}] table in {file}", hint="add it, or pick another with -n")
    out: dict[str, str] = {}
    for key, value in table.items():
        if isinstance(value, dict) or (
            isinstance(value, list) and value and isinstance(value[0], dict)
        ):
            continue  # another lineage's table, or post_write_hooks
        text = " ".join(map(str, value)) if isinstance(value, list) else str(value)
        out[key] = text.replace("%(here)s", str(here))
    return out
