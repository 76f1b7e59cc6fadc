"""The migrations folder: revision files in, new revision files out.

Graph commands must stay fast on lineages of thousands of revisions and must
not run user code, so a revision file's identity (``revision``,
``down_revision``, ``branch_labels``, ``depends_on`` and its docstring) is
read from its syntax tree. The module itself is imported only when one of its
``upgrade()``/``downgrade()`` functions is about to run (or when its header is
not made of literals).
"""

from __future__ import annotations

import ast
import gc
import os
import re
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..errors import (
    CkptMigrateError,
    CommandError,
    ConfigError,
    MultipleHeads,
    RevisionError,
    ScriptError,
)
from ..paths import display_path
from .cache import (
    FileKey,
    Fingerprint,
    GraphCache,
    Header,
    HeaderCache,
    StoredGraph,
    file_keys,
)
from .hooks import Hook, run_hooks
from .revision import (
    Revision,
    RevisionMap,
    restore_node,
    to_tuple,
    tuple_or_scalar,
    verify_new_name,
)

TEMPLATE_NAME = "script.py.tmpl"
_SLUG = re.compile(r"\w+")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_HEADER_NAMES = ("revision", "down_revision", "branch_labels", "depends_on", "replaces")
_IGNORED = (".#", "__init__")  # editor lock files and package markers
#: What a stored graph that this code did not write can raise when it is restored.
_DAMAGED = (LookupError, TypeError, ValueError, AttributeError, RevisionError)


if TYPE_CHECKING:
    import datetime as _dt


def new_rev_id() -> str:
    import uuid

    return uuid.uuid4().hex[-12:]


class Script(Revision):
    """A revision backed by a file in ``versions/``."""

    def __init__(
        self,
        revision: str,
        down_revision: Any,
        dependencies: Any,
        branch_labels: Any,
        *,
        path: Path | str,
        longdoc: str,
        module: ModuleType | None = None,
        replaces: Any = None,
    ) -> None:
        super().__init__(revision, down_revision, dependencies, branch_labels, replaces)
        self._path = path  # a str until asked for: 10,000 Path objects cost a tenth of a second
        self._longdoc = longdoc.strip()
        self._module = module

    @classmethod
    def restored(cls, path: str, longdoc: str) -> Script:
        """A bare script for ``RevisionMap.restore`` to put a stored graph's links on."""
        script = cls.__new__(cls)
        script._path = path
        script._longdoc = longdoc
        script._module = None
        return script

    @property
    def longdoc(self) -> str:
        """The docstring: the message, then anything else it says."""
        return self._longdoc

    @property
    def path(self) -> Path:
        if isinstance(self._path, str):
            self._path = Path(self._path)
        return self._path

    @property
    def doc(self) -> str:
        """The message: the docstring's first paragraph."""
        return _PARAGRAPH_BREAK.split(self.longdoc, 1)[0]

    @property
    def module(self) -> ModuleType:
        if self._module is None:
            self._module = _import_script(self.path)
        return self._module

    @property
    def seed_revision(self) -> str:
        """The id new values are drawn from: this revision's, or the one a squash replaced."""
        return self.revision

    def migration_fn(self, name: str) -> Any:
        fn = getattr(self.module, name, None)
        if not callable(fn):
            raise ScriptError(
                f"revision {self.revision} ({self.path}) has no {name}() function",
                hint=f"define 'def {name}() -> None:' in the revision file",
            )
        return fn


def step_function(name: str, replaced: str) -> str:
    """The name of a squashed file's copy of one replaced revision's ``upgrade``/``downgrade``."""
    return f"{name}_{replaced}"


class ReplacedStep(Script):
    """One revision a squash replaced, run from the squashed file's copy of its steps.

    A checkpoint stamped at (or going to) a revision inside a squashed range
    moves through these one at a time, with the values the replaced revision
    drew (``seed_revision``); a migration across the whole range runs the
    squash's own ``upgrade()``/``downgrade()`` instead. The last one of a
    squash has the squash's id: a checkpoint there is at the squash.
    """

    def __init__(self, squash: Script, replaced: str, node_id: str, down: tuple[str, ...]) -> None:
        end = node_id == squash.revision
        Revision.__init__(
            self,
            node_id,
            down,
            squash.dependencies if end else None,
            squash.declared_branch_labels if end else None,
        )
        self._path = squash.path
        self._module = None
        self.squash = squash
        self.replaced = replaced
        self.index = squash.replaces.index(replaced)

    @property
    def seed_revision(self) -> str:
        return self.replaced

    @property
    def module(self) -> ModuleType:
        return self.squash.module

    @property
    def longdoc(self) -> str:
        fn = getattr(self.module, step_function("upgrade", self.replaced), None)
        return (getattr(fn, "__doc__", None) or "").strip()

    def migration_fn(self, name: str) -> Any:
        fn = getattr(self.module, step_function(name, self.replaced), None)
        if not callable(fn):
            raise ScriptError(
                f"squashed revision {self.squash.revision} ({self.path}) has no "
                f"{step_function(name, self.replaced)}() for the revision {self.replaced} "
                "it replaces",
                hint="restore the function, or take the revision out of 'replaces'",
            )
        return fn


def _import_script(path: Path) -> ModuleType:
    import importlib.util

    name = "ckptmigrate_rev_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - .py files always load
        raise ScriptError(f"cannot load revision file {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise ScriptError(
            f"revision file {path}, line {exc.lineno}: syntax error: {exc.msg}",
            hint="fix the file; nothing was changed",
        ) from exc
    except Exception as exc:
        raise ScriptError(
            f"importing revision file {path} failed: {type(exc).__name__}: {exc}",
            hint="fix the file; nothing was changed",
            traceback_helps=True,
        ) from exc
    return module


def _literal_header(path: Path, source: str) -> tuple[dict[str, Any], str, bool]:
    """(header variables, docstring, whether every header value was a literal)."""
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise ScriptError(
            f"revision file {path}, line {exc.lineno}: syntax error: {exc.msg}",
            hint="fix the file; nothing was changed",
        ) from exc
    values: dict[str, Any] = {}
    literal = True
    for node in tree.body:
        target: ast.expr | None = None
        value: ast.expr | None = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        if isinstance(target, ast.Name) and target.id in _HEADER_NAMES and value is not None:
            try:
                values[target.id] = ast.literal_eval(value)
            except ValueError:
                literal = False
    return values, ast.get_docstring(tree) or "", literal


def read_header(path: Path) -> tuple[Header, ModuleType | None]:
    """The header of a revision file, and its module if it had to be imported for it.

    Only a header made of literals is read without running the file (and may be
    cached); anything else is what importing the module defines.
    """
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScriptError(f"cannot read revision file {path}: {exc}") from exc
    values, doc, literal = _literal_header(path, source)
    if literal and "revision" in values:
        return Header(values, doc), None
    module = _import_script(path)
    values = {n: getattr(module, n) for n in _HEADER_NAMES if hasattr(module, n)}
    return Header(values, module.__doc__ or ""), module


def load_script(path: Path) -> Script:
    header, module = read_header(path)
    return script_from_header(path, header, module)


def script_from_header(
    path: Path | str, header: Header, module: ModuleType | None = None
) -> Script:
    values = header.values
    if "revision" not in values:
        raise ScriptError(
            f"revision file {path} does not define 'revision'",
            hint='add e.g. revision = "1a2b3c4d5e6f" (see the template in the migrations folder)',
        )
    if "down_revision" not in values:
        raise ScriptError(
            f"revision file {path} does not define 'down_revision'",
            hint="add down_revision = None for a first revision, or the parent's id",
        )
    for name in _HEADER_NAMES[1:]:
        value = values.get(name)
        ok = (
            value is None
            or isinstance(value, str)
            or (isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value))
        )
        if not ok:
            raise ScriptError(
                f"revision file {path}: {name} must be None, a string or a tuple of strings, "
                f"not {value!r}"
            )
    rev_id = values["revision"]
    if not isinstance(rev_id, str) or not rev_id:
        raise ScriptError(
            f"revision file {path}: 'revision' must be a non-empty string, not {rev_id!r}"
        )
    try:
        return Script(
            rev_id,
            values.get("down_revision"),
            values.get("depends_on"),
            values.get("branch_labels"),
            path=path,
            longdoc=header.doc,
            module=module,
            replaces=values.get("replaces"),
        )
    except RevisionError as exc:
        raise ScriptError(f"revision file {path}: {exc.message}", hint=exc.hint) from exc


def slugify(message: str, limit: int) -> str:
    slug = "_".join(_SLUG.findall(message or "")).lower()
    if len(slug) > limit:
        slug = slug[:limit].rsplit("_", 1)[0] + "_"
    return slug


def py_literal(value: Any) -> str:
    """Render ids the way a person writes them (double quotes, tuples)."""
    if value is None:
        return "None"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    items = [py_literal(v) for v in value]
    if len(items) == 1:
        return f"({items[0]},)"
    return "(" + ", ".join(items) + ")"


def indent_body(lines: Sequence[str] | str | None) -> str:
    if lines is None or (not isinstance(lines, str) and not lines):
        return "pass"
    text = lines if isinstance(lines, str) else "\n".join(lines)
    return "\n".join(("    " + ln) if ln.strip() else "" for ln in text.splitlines()).lstrip()


class ScriptDirectory:
    """A migrations folder: ``versions/`` plus the revision template."""

    def __init__(
        self,
        dir: str | os.PathLike[str],
        *,
        file_template: str = "%(rev)s_%(slug)s",
        truncate_slug_length: int = 40,
        post_write_hooks: Sequence[Hook] = (),
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.dir = Path(dir)
        self.file_template = file_template
        self.truncate_slug_length = truncate_slug_length
        self.post_write_hooks = tuple(post_write_hooks)
        self._notify = notify
        self._compact: RevisionMap | None = None
        self._map: RevisionMap | None = None
        self._looked: tuple[Fingerprint, StoredGraph | None] | None = None

    @classmethod
    def from_config(cls, config: Config) -> ScriptDirectory:
        location = config.script_location
        if not (location / "versions").is_dir():
            raise ConfigError(
                f"script_location {location} is not a migrations folder (no versions/ inside)",
                hint="run 'ckptmigrate init <dir>' or fix script_location in "
                + str(config.file or "the configuration"),
            )
        return cls(
            location,
            file_template=config.file_template,
            truncate_slug_length=config.truncate_slug_length,
            post_write_hooks=config.post_write_hooks(),
            notify=config.log,
        )

    @property
    def versions(self) -> Path:
        return self.dir / "versions"

    @property
    def template_path(self) -> Path:
        return self.dir / TEMPLATE_NAME

    def script_paths(self) -> list[Path]:
        return [self.versions / name for name in self._scan()[0::5]]

    def _scan(self) -> Fingerprint:
        """The revision files in ``versions/``, sorted by name, each with its version key."""
        folder = os.path.join(self.versions, "")
        names = sorted(
            name
            for name in os.listdir(folder)
            if name.endswith(".py") and not name.startswith(_IGNORED)
        )
        found: Fingerprint = []
        add = found.extend
        for name in names:  # os.stat: a third quicker than a scandir entry's stat, per file
            try:
                st = os.stat(folder + name)
            except FileNotFoundError:  # removed meanwhile, or a dangling link: not there
                continue
            if stat.S_ISREG(st.st_mode):
                add((name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        return found

    def _load(self) -> RevisionMap:
        """The graph stored for these very files, or the one their headers make."""
        files, stored = self._look()
        graph = stored.graph() if stored is not None else None
        if graph is not None:
            try:
                return RevisionMap.restore(graph, self._maker())
            except _DAMAGED:  # not a graph this code wrote: build it again
                pass
        rmap, names = self._build(files)

        def payload(rev: Revision) -> list[str]:
            assert isinstance(rev, Script)
            return [names[rev.revision], rev.longdoc]

        if files and len(names) * 5 == len(files):  # every header was a literal: no file ran
            snapshot = rmap.snapshot(payload)
            tips = {*rmap.heads, *rmap.real_heads}
            summary = {
                "heads": snapshot["heads"],
                "real_heads": snapshot["real_heads"],
                "tips": [row for row in snapshot["nodes"] if row[0] in tips],
            }
            GraphCache(self.dir).save(files, summary, snapshot)
        return rmap

    def _look(self) -> tuple[Fingerprint, StoredGraph | None]:
        """The files in ``versions/``, and the graph stored for them if there is one."""
        if self._looked is None:
            files = self._scan()
            self._looked = files, GraphCache(self.dir).load(files)
        return self._looked

    def _maker(self) -> Callable[[Any], Script]:
        """What makes a stored graph's bare scripts (its payloads: [file name, docstring])."""
        folder = os.path.join(self.versions, "")
        return lambda payload: Script.restored(folder + payload[0], payload[1])

    def heads(self, *, real: bool = False) -> list[Script]:
        """The head revisions (``real``: counting ``depends_on`` too).

        Taken from the stored graph's summary when it matches the files: a long
        history's thousands of other revisions are then not even made.
        """
        if self._compact is None:
            _, stored = self._look()
            if stored is not None:
                try:
                    make = self._maker()
                    tips = [restore_node(row, make) for row in stored.summary["tips"]]
                    by_id = {tip.revision: tip for tip in tips if isinstance(tip, Script)}
                    return [by_id[rid] for rid in stored.summary["real_heads" if real else "heads"]]
                except _DAMAGED:
                    pass
        rmap = self.compact_map
        return [self.script(rid, compact=True) for rid in (rmap.real_heads if real else rmap.heads)]

    def _build(self, files: Fingerprint) -> tuple[RevisionMap, dict[str, str]]:
        """The graph the files' headers make; with the file of each revision whose header
        was read without running it."""
        folder = os.path.join(self.versions, "")
        scripts: list[Script] = []
        seen: dict[str, str] = {}
        cache = HeaderCache(self.dir)
        cache.load()
        cacheable: dict[str, tuple[FileKey, Header]] = {}
        literal: dict[str, str] = {}
        for name, key in file_keys(files):
            path = folder + name
            header = cache.get(name, key)
            module = None
            if header is None:
                header, module = read_header(Path(path))
            script = script_from_header(path, header, module)
            if module is None:
                cacheable[name] = (key, header)
                literal[script.revision] = name
            if script.revision in seen:
                raise ScriptError(
                    f"revision id {script.revision} is used by two files: "
                    f"{seen[script.revision]} and {path}",
                    hint="give one of them a new id (revision = ...) and fix its children",
                )
            seen[script.revision] = path
            scripts.append(script)
        cache.save(cacheable)
        try:
            return RevisionMap(scripts), literal
        except RevisionError as exc:
            raise _with_files(exc, seen) from exc

    @property
    def compact_map(self) -> RevisionMap:
        """One node per revision file, a squash included: what graph commands show."""
        if self._compact is None:
            # Tens of thousands of small objects and nothing to collect: the cyclic
            # collector would only slow the build of a long history down.
            enabled = gc.isenabled()
            gc.disable()
            try:
                self._compact = self._load()
            finally:
                if enabled:
                    gc.enable()
        return self._compact

    @property
    def revision_map(self) -> RevisionMap:
        """What checkpoints move on: every squash as the chain of revisions it replaced."""
        if self._map is None:
            self._map = self.compact_map.expand(_replaced_step)
        return self._map

    def forget(self) -> None:
        """Read the folder again next time (after writing or removing revision files)."""
        self._compact = self._map = None
        self._looked = None

    def _graph(self, compact: bool) -> RevisionMap:
        return self.compact_map if compact else self.revision_map

    def get_revision(self, symbol: str | None, *, compact: bool = False) -> Script | None:
        return self._graph(compact).get_revision(symbol)  # type: ignore[return-value]

    def get_revisions(self, symbol: Any, *, compact: bool = False) -> tuple[Script | None, ...]:
        return self._graph(compact).get_revisions(symbol)  # type: ignore[return-value]

    def script(self, rev_id: str, *, compact: bool = False) -> Script:
        return self._graph(compact).revision(rev_id)  # type: ignore[return-value]

    def walk_revisions(
        self, base: str = "base", head: str = "heads", *, compact: bool = False
    ) -> list[Script]:
        return self._graph(compact).walk(base, head)  # type: ignore[return-value]

    def parents_for(self, head: str | Sequence[str]) -> list[Revision]:
        """The revisions a new revision on ``head`` revises (none on base)."""
        rmap = self.compact_map
        try:
            heads = rmap.get_revisions(head)
        except MultipleHeads as exc:
            raise CommandError(
                "multiple heads are present: " + ", ".join(rmap.heads),
                hint="pass --head REV to choose the parent, or join them with "
                "'ckptmigrate merge heads -m ...'",
            ) from exc
        return [h for h in heads if h is not None]

    def generate_revision(
        self,
        rev_id: str | None,
        message: str | None,
        *,
        head: str | Sequence[str] = "head",
        splice: bool = False,
        branch_labels: str | Sequence[str] | None = None,
        depends_on: str | Sequence[str] | None = None,
        upgrades: Sequence[str] | str | None = None,
        downgrades: Sequence[str] | str | None = None,
        imports: Iterable[str] = (),
        create_date: _dt.datetime | None = None,
    ) -> Script:
        rev_id = self.new_id(rev_id)
        rmap = self.compact_map
        parents = self.parents_for(head)
        if len({p.revision for p in parents}) != len(parents):
            raise CommandError("duplicate head revisions specified", hint="name each head once")
        if not splice:
            for parent in parents:
                if not parent.is_head:
                    raise CommandError(
                        f"revision {parent.revision} is not a head revision",
                        hint="pass --splice to build on it anyway (it starts a new branch)",
                    )
        resolved_deps: list[str] = []
        for dep in to_tuple(depends_on):
            target = rmap.get_revision(dep)
            if target is None:
                raise CommandError(f"--depends-on {dep} names no revision")
            resolved_deps.append(dep if dep in target.branch_labels else target.revision)
        labels = to_tuple(branch_labels)
        for label in labels:
            verify_new_name("branch label", label)
            if label in rmap.branch_labels or label in rmap:
                raise CommandError(
                    f"branch label '{label}' is already in use",
                    hint="choose another --branch-label",
                )
        if create_date is None:
            import datetime

            create_date = datetime.datetime.now().replace(microsecond=0)
        path = self.revision_path(rev_id, message or "", create_date)
        down_ids = [p.revision for p in parents]
        text = self.render(
            message=message or "empty message",
            up_revision=rev_id,
            down_revision=tuple_or_scalar(down_ids),
            branch_labels=tuple_or_scalar(labels) if labels else None,
            depends_on=tuple_or_scalar(resolved_deps) if resolved_deps else None,
            create_date=create_date,
            upgrades=upgrades,
            downgrades=downgrades,
            imports=imports,
        )
        self.write_file(path, text)
        try:
            script = load_script(path)
        except Exception:
            path.unlink()
            raise
        if labels and not script.branch_labels:
            path.unlink()
            raise CommandError(
                f"the template {self.template_path} does not write branch_labels",
                hint="add 'branch_labels = ${branch_labels}' to the template",
            )
        self.forget()
        return script

    def new_id(self, rev_id: str | None) -> str:
        """``rev_id`` (or a fresh one) checked: a plain name no revision has or had."""
        if rev_id is None:
            rev_id = new_rev_id()
        verify_new_name("revision id", rev_id)
        rmap = self.compact_map
        if rmap.knows(rev_id):
            squash = rmap.squashed_into(rev_id)
            where = (
                f"squashed into {squash.revision}"
                if squash is not None
                else str(self.script(rev_id, compact=True).path)
            )
            raise CommandError(
                f"revision id {rev_id} already exists ({where})",
                hint="pick another --rev-id",
            )
        return rev_id

    def revision_path(self, rev_id: str, message: str, create_date: _dt.datetime) -> Path:
        fields = {
            "rev": rev_id,
            "slug": slugify(message, self.truncate_slug_length),
            "epoch": int(create_date.timestamp()),
            "year": create_date.year,
            "month": create_date.month,
            "day": create_date.day,
            "hour": create_date.hour,
            "minute": create_date.minute,
            "second": create_date.second,
        }
        try:
            name = self.file_template % fields
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"bad file_template {self.file_template!r}: {exc}",
                hint="use %(rev)s, %(slug)s, %(epoch)s, %(year)d ... (%%(rev)s in an ini file)",
            ) from None
        return self._inside_versions(name)

    def _inside_versions(self, name: str) -> Path:
        """``versions/<name>.py``, refused unless it lies directly in ``versions/``.

        Only files directly in ``versions/`` are read back, so a name that
        reaches a subfolder (or, with ``..`` or an absolute path, any other
        folder) would write a revision the lineage never sees.
        """
        path = self.versions / f"{name}.py"
        separators = {"/", os.sep, os.altsep or "/"}
        inside = (
            not any(sep in name for sep in separators)
            and name not in ("", ".", "..")
            and path.parent.resolve() == self.versions.resolve()
        )
        if not inside:
            raise ConfigError(
                f"file_template {self.file_template!r} makes the file name {name!r}, which is "
                f"not a file directly inside {display_path(self.versions)}",
                hint="file_template names a file, not a folder: no '/' and no '..' "
                "(e.g. %(rev)s_%(slug)s, written %%(rev)s_%%(slug)s in an ini file)",
            )
        return path

    def write_file(self, path: Path, text: str) -> None:
        """Create a new revision file, then run the post_write_hooks on it."""
        self._create(path, text)
        try:
            run_hooks(self.post_write_hooks, path, self._notify)
        except CkptMigrateError as exc:
            exc.message += f" (the file {display_path(path)} was written)"
            raise

    def _create(self, path: Path, text: str) -> None:
        """Write a new file; never over an existing one, never through a symbolic link."""
        self.versions.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "x", encoding="utf-8") as fh:  # O_EXCL: fails on any link too
                fh.write(text)
        except FileExistsError:
            what = "a symbolic link" if path.is_symlink() else "a file"
            raise CommandError(
                f"{display_path(path)} already exists ({what}); nothing was written",
                hint="pick another message or --rev-id",
            ) from None
        except OSError as exc:
            path.unlink(missing_ok=True)  # ours: open("x") made it, the write failed
            raise CommandError(
                f"cannot write {display_path(path)}: {exc.strerror}; nothing was written",
                hint="check the folder's permissions and free space",
            ) from exc

    def render(
        self,
        *,
        message: str,
        up_revision: str,
        down_revision: str | tuple[str, ...] | None,
        branch_labels: str | tuple[str, ...] | None,
        depends_on: str | tuple[str, ...] | None,
        create_date: _dt.datetime,
        upgrades: Sequence[str] | str | None,
        downgrades: Sequence[str] | str | None,
        imports: Iterable[str] = (),
    ) -> str:
        import string

        try:
            template = string.Template(self.template_path.read_text(encoding="utf-8"))
        except OSError:
            from .. import templates

            template = string.Template(templates.read(TEMPLATE_NAME))
        escaped = message.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
        values = {
            "message": escaped,
            "up_revision": up_revision,
            "down_revision": py_literal(down_revision),
            "revises": ", ".join(to_tuple(down_revision)) or "<base>",
            "branch_labels": py_literal(branch_labels),
            "depends_on": py_literal(depends_on),
            "create_date": str(create_date),
            "upgrades": indent_body(upgrades),
            "downgrades": indent_body(downgrades),
            "imports": "".join("\n" + line for line in imports),
        }
        try:
            text = template.substitute(values)
        except (KeyError, ValueError) as exc:
            raise ScriptError(
                f"the revision template {self.template_path} uses an unknown placeholder: {exc}",
                hint="known: " + ", ".join(f"${{{k}}}" for k in values) + "; write $$ for a dollar",
            ) from None
        return re.sub(r"\n{4,}", "\n\n\n", text)


def _replaced_step(squash: Revision, name: str, node_id: str, down: tuple[str, ...]) -> Revision:
    assert isinstance(squash, Script)
    return ReplacedStep(squash, name, node_id, down)


def _with_files(exc: RevisionError, files: dict[str, str]) -> RevisionError:
    """Name the files behind the revision ids a graph error mentions."""
    named = [f"{rid} ({os.path.basename(files[rid])})" for rid in files if rid in exc.message]
    if not named or len(named) > 6:
        return exc
    exc.message = exc.message + " [files: " + ", ".join(named) + "]"
    exc.args = (exc.one_line(),)
    return exc
