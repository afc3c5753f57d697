"""Folded stacks, as ``py-spy record --format raw`` writes them, merged and named.

One line is ``outer;...;inner COUNT`` and a frame is ``function (file:line)``. The
workers of one server are sampled separately; their stacks are merged into one
``Counter`` so that a flame graph and its tables cover every worker's samples.

A sample is charged to a *layer* (a package group): that of its innermost frame that
belongs to a named layer. Standard-library and other unnamed frames are charged to the
named code that called them (``socket.send`` under psycopg is psycopg's cost), so the
layer table reads as self time by layer; "other" is left with what no named code called.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

Stack = tuple[str, ...]
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
OTHER = "other"
TEMPLATES = "jinja2 + templates"

# (layer, package folders); the first layer with a matching folder wins, so the specific
# folders (sqlalchemy/orm) come before the general ones (sqlalchemy).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("psycopg", ("psycopg", "psycopg_binary", "psycopg_c", "psycopg_pool")),
    ("sqlalchemy.orm", ("sqlalchemy/orm", "sqlalchemy/ext")),
    ("sqlalchemy.engine/sql/pool", ("sqlalchemy",)),
    (TEMPLATES, ("jinja2", "markupsafe")),
    ("flask_wtf/wtforms", ("flask_wtf", "wtforms")),
    ("flask_sqlalchemy", ("flask_sqlalchemy",)),
    ("flask_limiter/limits", ("flask_limiter", "limits")),
    ("flask", ("flask",)),
    ("werkzeug", ("werkzeug",)),
    ("gunicorn", ("gunicorn",)),
    ("itsdangerous", ("itsdangerous",)),
    ("myapp.db", ("myapp/db",)),
    ("myapp other (peer code)", ("myapp", "bench")),
)
LAYER_NAMES: tuple[str, ...] = tuple(name for name, _ in LAYERS) + (OTHER,)


def fold(lines: Iterable[str]) -> Counter[Stack]:
    """The stacks of one raw file, counted; blank and malformed lines are skipped."""
    stacks: Counter[Stack] = Counter()
    for line in lines:
        path, _, count = line.rstrip("\n").rpartition(" ")
        if path and count.isdigit():
            stacks[tuple(path.split(";"))] += int(count)
    return stacks


def merge(parts: Iterable[Counter[Stack]]) -> Counter[Stack]:
    """Several workers' stacks as one profile: counts of identical stacks add up."""
    merged: Counter[Stack] = Counter()
    for part in parts:
        merged.update(part)
    return merged


def frame_file(frame: str) -> str:
    """The file of a frame, '' when the frame names none."""
    match = FRAME.match(frame)
    return match.group("file") if match else ""


def layer_of(frame: str) -> str:
    """The named layer a frame's file belongs to, or ``OTHER`` (stdlib, unknown)."""
    path = frame_file(frame).replace("\\", "/")
    if path.endswith((".html", ".jinja", ".j2")) or "<template>" in path:
        return TEMPLATES
    path = path.rpartition("site-packages/")[2]
    folders = "/" + path.rpartition("/")[0] + "/"
    for name, packages in LAYERS:
        if any(f"/{package}/" in folders for package in packages):
            return name
    return OTHER


def charged_layer(stack: Stack) -> str:
    """The layer of the innermost frame that belongs to a named one, else ``OTHER``."""
    for frame in reversed(stack):
        name = layer_of(frame)
        if name != OTHER:
            return name
    return OTHER


def by_layer(stacks: Counter[Stack]) -> Counter[str]:
    """Samples per layer (self time by layer, unnamed callees charged to their caller)."""
    layers: Counter[str] = Counter()
    for stack, count in stacks.items():
        layers[charged_layer(stack)] += count
    return layers


def self_time(stacks: Counter[Stack]) -> Counter[str]:
    """Samples per function as the innermost frame, line numbers dropped (one row a function)."""
    functions: Counter[str] = Counter()
    for stack, count in stacks.items():
        match = FRAME.match(stack[-1])
        name = f"{match.group('function')} ({match.group('file')})" if match else stack[-1]
        functions[name] += count
    return functions


def inclusive(stacks: Counter[Stack], part: str) -> int:
    """Samples whose stack passes through a frame containing ``part`` (in its function's
    name or its file): that code's time with its callees', each sample counted once."""
    return sum(count for stack, count in stacks.items() if any(part in frame for frame in stack))
