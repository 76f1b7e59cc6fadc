"""Files ``ckptmigrate init`` writes: the revision template and the ini file, per project kind.

Each folder here is one template (``init --template NAME``): its ``README``
(first line: what it is for; the whole: the migrations folder's README) and
``settings.ini`` (its part of ``alembic_style.ini``); ``script.py.tmpl`` and
the rest of the ini file are shared.
"""

from __future__ import annotations

from importlib import resources

DEFAULT_TEMPLATE = "pytorch"


def read(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def names() -> list[str]:
    """Every template, the default first."""
    found = sorted(
        p.name for p in resources.files(__name__).iterdir() if p.is_dir() and p.name[0] != "_"
    )
    return sorted(found, key=lambda n: n != DEFAULT_TEMPLATE)


def description(template: str) -> str:
    return read(f"{template}/README").splitlines()[0]


def ini_text(template: str, script_location: str) -> str:
    settings = read(f"{template}/settings.ini").rstrip("\n") + "\n"
    text = read("alembic_style.ini.tmpl")
    return text.replace("${settings}", settings).replace("${script_location}", script_location)
