"""Named SQL blocks: each storage plugin keeps its queries in one `.sql` file.

    -- name: insert_event
    INSERT INTO ...;

Parsed once at import; Python code refers to queries by name and never assembles SQL. The
files ship as package data and are read through `importlib.resources`.
"""

from __future__ import annotations

import re
from importlib.resources import files

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.M)


def load(package: str, name: str) -> dict[str, str]:
    """The named blocks of the file `name` in `package` (a dotted module name)."""
    text = files(package).joinpath(name).read_text(encoding="utf-8")
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [ln for ln in body.strip().splitlines() if not ln.lstrip().startswith("--")]
        queries[name] = "\n".join(lines).strip().rstrip(";")
    return queries
