"""The package's shape holds (issue 16, "No import circles", "Library internals are used").

1. No import cycle among the modules of ``myapp`` (all of it, ``myapp.db`` included),
   whether closed at import time, through an import inside a function, or through an
   ``if TYPE_CHECKING:`` import (each kind is its own test).
2. Nothing below the lifecycle knows about Flask: the Flask-aware modules of
   ``myapp.db`` are listed (``FLASK_AWARE``), the list is checked against the imports,
   and no other module of ``myapp.db`` reaches Flask through the package's modules.
3. No reach into a library object (Flask, Werkzeug, SQLAlchemy, psycopg, PyMySQL...):
   underscore attributes, assignments to its attributes or items, Flask's internal
   tables, private imports. The heuristic (what counts as "ours") is documented in
   ``tests/support/layout.py``. Every finding must be in ``ALLOWED``, with its reason;
   ``TO_BE_REMOVED`` names today's known offenders, which still fail the test. An entry
   of either list that no longer occurs fails too, so neither list can rot.
4. Self-tests: the checkers find what they must in synthetic sources.

Expected to fail on main until the myapp/db redesign removes the offenders.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

from tests.support.layout import (
    DEFERRED,
    RUNTIME,
    TYPE_CHECKING_ONLY,
    Allowed,
    Finding,
    Import,
    find_cycles,
    import_graph,
    imports,
    library_reaches,
    load_package,
    parse_modules,
)

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "myapp"
MODULES = load_package(ROOT, PACKAGE)

# -- 1. import cycles ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", [RUNTIME, DEFERRED, TYPE_CHECKING_ONLY])
def test_no_import_cycles(kind: str) -> None:
    """``runtime``: every step runs at import time; ``deferred``: one step at least is an
    import inside a function; ``type-checking``: one step at least is under
    ``if TYPE_CHECKING:``."""
    cycles = [str(cycle) for cycle in find_cycles(MODULES) if cycle.kind == kind]
    assert not cycles, f"{len(cycles)} import cycle(s) closed through {kind} imports:\n" + "\n".join(cycles)


# -- 2. Flask stays above the lifecycle -----------------------------------------------------

FLASK_ROOTS = {"flask", "werkzeug"}  # and every flask_* extension
# Flask glue: the lifecycle (the registry in ``g``, teardown, the request's read-only
# promise), the per-request instruments (``g``, after_request), read-your-writes' cookie
# (sticking) and the replicas feature that registers it (request.method), and the units'
# session_scope (it pushes an app context). A type annotation alone (``Flask`` under
# TYPE_CHECKING) does not make a module Flask-aware: nothing of Flask runs there.
FLASK_AWARE = {
    "myapp.db.lifecycle", "myapp.db.instrumentation", "myapp.db.sticking", "myapp.db.replication",
    "myapp.db.units",
}
# The list of every feature, Flask-aware ones included: it stands with the lifecycle,
# which alone imports it.
ABOVE_THE_GLUE = {"myapp.db.features"}
DB_PACKAGE = "myapp.db"  # its __init__ re-exports the lifecycle, so it is above it


@functools.cache
def _graph() -> dict[str, dict[str, Import]]:
    return import_graph(MODULES)


def _is_flask(module: str) -> bool:
    root = module.split(".")[0]
    return root in FLASK_ROOTS or root.startswith("flask_")


def _imports_flask(name: str) -> list[str]:
    return [f"{each.where()} {each.target}" for each in imports(MODULES[name], MODULES)
            if _is_flask(each.target) and each.kind != TYPE_CHECKING_ONLY]


def _db_modules() -> list[str]:
    return sorted(name for name in MODULES if name.startswith(DB_PACKAGE + "."))


def test_the_flask_aware_list_is_what_imports_flask() -> None:
    """Derived, not trusted: a module that starts (or stops) importing Flask must be
    added to (or removed from) FLASK_AWARE, with a reason."""
    derived = {name for name in _db_modules() if _imports_flask(name)}
    assert derived == FLASK_AWARE, {name: _imports_flask(name) for name in derived ^ FLASK_AWARE}


@pytest.mark.parametrize("module", [name for name in _db_modules() if name not in FLASK_AWARE | ABOVE_THE_GLUE])
def test_modules_below_the_lifecycle_do_not_reach_flask(module: str) -> None:
    """Not directly, and not through another module of the package (at import time or
    in a function; TYPE_CHECKING imports aside)."""
    graph = _graph()
    paths = {module: [module]}
    todo = [module]
    reached = []
    while todo:
        current = todo.pop()
        for line in _imports_flask(current):
            reached.append(" -> ".join(paths[current]) + f" -> {line.split()[1]} ({line.split()[0]})")
        for target, step in graph[current].items():
            if step.kind != TYPE_CHECKING_ONLY and target not in paths:
                paths[target] = [*paths[current], target]
                todo.append(target)
    assert not reached, "\n".join(reached)


def test_the_guard_sees_flask_where_it_is() -> None:
    assert _imports_flask("myapp.db.lifecycle")
    assert FLASK_AWARE <= set(MODULES)


# -- 3. reaches into library objects ----------------------------------------------------------

_SESSION_INFO = "SQLAlchemy documents Session.info as the user's dictionary on a session"
_CONNECTION_INFO = "SQLAlchemy documents Connection.info as the user's dictionary on a connection"
_FLASK_G = "Flask documents flask.g as the namespace for data during an app context"
_FLASK_SESSION = "flask.session (the signed cookie) is a documented dict-like object"
_FLASK_CONFIG = "Flask documents app.config as the writable configuration mapping"
_FLASK_EXTENSIONS = "Flask documents app.extensions as where an extension keeps its state per app"
_LOCAL_PROXY = "Werkzeug documents LocalProxy._get_current_object() as the way to reach the proxied object"
_HEADERS = "Werkzeug documents Response.headers (Headers) as writable"
_IS_DISCONNECT = "SQLAlchemy documents setting ExceptionContext.is_disconnect in a handle_error listener"
_MAPPED = "a mapped attribute of our model: assigning it is the ORM's public API"

_AUTOCOMMIT = (
    "psycopg documents Connection.autocommit as writable while no transaction is open on the server. The "
    "read-only fast path sets it in SQLAlchemy's 'begin' event, before psycopg has sent anything, and clears "
    "it before the statement that needs a transaction is sent (psycopg then sends BEGIN first); in autocommit "
    "psycopg's commit() and rollback() are no-ops, so SQLAlchemy's bookkeeping stays true. No public SQLAlchemy "
    "switch changes a connection's isolation inside a unit of work"
)
_SESSION_STATE = "session.state is our SessionState, the one attribute AppSession adds (Session has none of that name)"

ALLOWED = [
    Allowed("myapp/auth.py", "g.*", _FLASK_G),
    Allowed("myapp/db/instrumentation.py", "g.*", _FLASK_G),
    Allowed("myapp/observability.py", "g.*", _FLASK_G),
    Allowed("myapp/db/lifecycle.py", "setattr(g, _SCOPE_KEY)", _FLASK_G + " (the context's registry key)"),
    Allowed("myapp/auth.py", "session[...]", _FLASK_SESSION),
    Allowed("myapp/db/sticking.py", "cookie[...]", _FLASK_SESSION + " (imported as cookie)"),
    Allowed("myapp/config.py", "app.config[...]", _FLASK_CONFIG),
    Allowed("myapp/login_limits.py", "app.config[...]", _FLASK_CONFIG),
    Allowed("myapp/db/lifecycle.py", "app.extensions[...]", _FLASK_EXTENSIONS),
    Allowed("myapp/login_limits.py", "app.extensions[...]", _FLASK_EXTENSIONS),
    Allowed("myapp/security.py", "app.extensions[...]", _FLASK_EXTENSIONS + " (the session's signing serializer)"),
    Allowed("myapp/security.py", "app.session_interface",
            "Flask documents app.session_interface as the attribute to set for a custom session interface"),
    Allowed("myapp/security.py", "app.wsgi_app",
            "Flask documents wrapping app.wsgi_app as the way to add WSGI middleware (ProxyFix)"),
    Allowed("myapp/db/units.py", "current_app._get_current_object", _LOCAL_PROXY),
    Allowed("myapp/db/instrumentation.py", "response.headers[...]", _HEADERS),
    Allowed("myapp/db/sticking.py", "response.headers[...]", _HEADERS),
    Allowed("myapp/observability.py", "response.headers[...]", _HEADERS + " (X-Request-ID)"),
    Allowed("myapp/observability.py", "log.propagate",
            "logging documents Logger.propagate as writable: the request lines have a handler of their own"),
    Allowed("myapp/exporter.py", "environ[...]",
            "os.environ is documented as writable, and the setting reaches the workers only through it "
            "(prometheus_client reads PROMETHEUS_MULTIPROC_DIR at import)"),
    Allowed("myapp/db/metrics.py", "self._wait",
            "our MeasuredPool(QueuePool)'s own field, set by measure(); QueuePool has no attribute of that name"),
    Allowed("myapp/db/metrics.py", "self._timeouts",
            "our MeasuredPool(QueuePool)'s own field, set by measure(); QueuePool has no attribute of that name"),
    Allowed("myapp/db/autocommit.py", "connection.info[...]", _CONNECTION_INFO),
    Allowed("myapp/db/tracking.py", "connection.info[...]", _CONNECTION_INFO),
    Allowed("myapp/db/instrumentation.py", "conn.info[...]", _CONNECTION_INFO),
    Allowed("myapp/db/galera.py", "record.info[...]",
            "SQLAlchemy documents ConnectionPoolEntry.info as the user's dictionary on a pooled connection"),
    Allowed("myapp/db/hosts.py", "record.info[...]",
            "SQLAlchemy documents ConnectionPoolEntry.info as the user's dictionary on a pooled connection"),
    Allowed("myapp/db/engines.py", "cparams[...]",
            "SQLAlchemy documents modifying cparams in place in a do_connect listener"),
    Allowed("myapp/db/hosts.py", "cparams[...]",
            "SQLAlchemy documents modifying cparams in place in a do_connect listener (the hosts' order)"),
    Allowed("myapp/db/engines.py", "context.is_disconnect", _IS_DISCONNECT),
    Allowed("myapp/db/galera.py", "context.is_disconnect", _IS_DISCONNECT),
    Allowed("myapp/db/engines.py", "dbapi_connection.isolation_level",
            "sqlite3 documents isolation_level; SQLAlchemy's pysqlite recipe sets it on the DBAPI connection of a "
            "'connect' listener"),
    Allowed("myapp/db/autocommit.py", "dbapi_connection.autocommit",
            "psycopg documents Connection.autocommit as writable; set on the DBAPI connection a 'checkin' pool "
            "listener is handed, outside any SQLAlchemy transaction, to reset it (as the pysqlite recipe does)"),
    Allowed("myapp/db/autocommit.py", "connection.connection.dbapi_connection.autocommit", _AUTOCOMMIT),
    Allowed("myapp/db/session.py", "connection.connection.dbapi_connection.autocommit", _AUTOCOMMIT),
    Allowed("myapp/db/engines.py", "engine.dialect.do_ping",
            "the one replaced library method, kept because no public mechanism is as cheap: pool_pre_ping (the "
            "seed's promise) calls the dialect's do_ping and SQLAlchemy has no hook between checkout and ping. "
            "Measured in docs/performance.md: the post page 1.10x faster in process (40 interleaved pairs) than "
            "with a SELECT 1 round trip at every checkout; engines.py says so where it is done"),
    Allowed("myapp/db/session.py", "self.state", _SESSION_STATE),
    Allowed("myapp/db/lifecycle.py", "session.state.origin", _SESSION_STATE),
    Allowed("myapp/db/replication.py", "session.state.origin", _SESSION_STATE),
    Allowed("myapp/db/routing.py", "state_of(session).reads.replica",
            "SessionState.reads holds our routing.ReplicaReads (typed Any there: session.py cannot import routing)"),
    Allowed("myapp/db/lifecycle.py", "scope.key.session", "our _Scope (and its _Key), kept in and popped from g"),
    Allowed("myapp/db/lifecycle.py", "self.finaliser.atexit", "weakref.finalize documents its atexit attribute"),
    Allowed("myapp/db/replicas.py", "replica_set._after_fork", "our ReplicaSet's own method, from our WeakSet of them"),
    Allowed("myapp/db/errors.py", "self.reason",
            "our DatabaseUnavailable(SQLAlchemyError)'s own field; SQLAlchemyError has no such attribute"),
    Allowed("myapp/db/errors.py", "self.retry_after",
            "our DatabaseUnavailable(SQLAlchemyError)'s own field; SQLAlchemyError has no such attribute"),
    Allowed("myapp/db/errors.py", "self.stuck_on",
            "our DatabaseUnavailable(SQLAlchemyError)'s own field; SQLAlchemyError has no such attribute"),
    Allowed("myapp/login_limits.py", "self._next_purge",
            "our DatabaseStorage(limits Storage)'s own timer; limits.storage has no such attribute"),
    Allowed("myapp/posts.py", "post.title", _MAPPED),
    Allowed("myapp/posts.py", "post.body", _MAPPED),
    Allowed("myapp/users.py", "user.password_hash", _MAPPED),
    Allowed("myapp/posts.py", "form.version.data", "WTForms documents Field.data as writable"),
]

# Offenders still to remove: they FAIL the test (then delete the entry: an entry that no
# longer occurs fails too). Never move one to ALLOWED to pass.
TO_BE_REMOVED: list[Allowed] = [
]


@functools.cache
def _findings() -> list[Finding]:
    return library_reaches(MODULES)


def test_no_reach_into_library_objects() -> None:
    failures = []
    for finding in _findings():
        if any(entry.matches(finding) for entry in ALLOWED):
            continue
        offender = next((entry for entry in TO_BE_REMOVED if entry.matches(finding)), None)
        why = f"TO_BE_REMOVED: {offender.reason}" if offender else "not allowed"
        failures.append(f"{finding}  ({why})")
    assert not failures, f"{len(failures)} reach(es) into library objects:\n" + "\n".join(failures)


@pytest.mark.parametrize("listing", ["ALLOWED", "TO_BE_REMOVED"])
def test_every_listed_entry_still_occurs(listing: str) -> None:
    entries = {"ALLOWED": ALLOWED, "TO_BE_REMOVED": TO_BE_REMOVED}[listing]
    findings = _findings()
    stale = [str(entry) for entry in entries if not any(entry.matches(finding) for finding in findings)]
    assert not stale, f"{listing} entries that no longer occur (delete them):\n" + "\n".join(stale)


def test_no_entry_is_both_allowed_and_to_be_removed() -> None:
    findings = _findings()
    both = [
        str(finding) for finding in findings
        if any(e.matches(finding) for e in ALLOWED) and any(e.matches(finding) for e in TO_BE_REMOVED)
    ]
    assert not both


# -- 4. self-tests: the checkers find what they must ----------------------------------------


def _package(**modules: str) -> dict[str, str]:
    """``_package(a="...", b="...")`` -> pkg/__init__.py, pkg/a.py, pkg/b.py."""
    return {"pkg/__init__.py": "", **{f"pkg/{name.replace('__', '/')}.py": source for name, source in modules.items()}}


def _cycles(**modules: str) -> list[str]:
    return [f"{' -> '.join([*c.modules, c.modules[0]])} {c.kind}" for c in find_cycles(parse_modules(_package(**modules)))]


def test_a_cycle_is_found_and_named_a_b_a() -> None:
    assert _cycles(a="from . import b\n", b="from .a import thing\n") == ["pkg.a -> pkg.b -> pkg.a runtime"]


def test_cycle_kinds() -> None:
    assert _cycles(
        a="from typing import TYPE_CHECKING\nfrom .b import x\nif TYPE_CHECKING:\n    from .a import y\n",
        b="from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n",
    ) == ["pkg.a -> pkg.a type-checking", "pkg.a -> pkg.b -> pkg.a type-checking"]
    assert _cycles(a="import pkg.b\n", b="def f():\n    from pkg import a\n") == ["pkg.a -> pkg.b -> pkg.a deferred"]
    # A runtime and a TYPE_CHECKING import of the same module: the cycle is a runtime one.
    assert _cycles(
        a="import typing\nif typing.TYPE_CHECKING:\n    from . import b\nfrom . import b\n", b="from .a import x\n"
    ) == ["pkg.a -> pkg.b -> pkg.a runtime"]


def test_relative_imports_resolve() -> None:
    modules = parse_modules({
        "pkg/__init__.py": "from .sub import thing\n",
        "pkg/top.py": "",
        "pkg/sub/__init__.py": "from . import inner\nfrom .. import top\n",
        "pkg/sub/inner.py": "from ..top import x\nfrom . import name_in_init\n",
    })
    graph = import_graph(modules)
    assert set(graph["pkg"]) == {"pkg.sub"}
    assert set(graph["pkg.sub"]) == {"pkg.sub.inner", "pkg.top"}
    assert set(graph["pkg.sub.inner"]) == {"pkg.top", "pkg.sub"}


def test_no_cycle_in_a_tree() -> None:
    assert _cycles(a="from . import b\n", b="import os\n") == []


def _reaches(source: str) -> list[str]:
    return [f"{f.rule} {f.expr}" for f in library_reaches(parse_modules({"pkg/__init__.py": "", "pkg/m.py": source}))]


def test_replacing_a_library_method_is_found() -> None:
    assert _reaches("def f(engine, g):\n    engine.dialect.do_ping = g\n") == ["attribute-assignment engine.dialect.do_ping"]


def test_replacing_an_attribute_of_a_library_object_held_by_self_is_found() -> None:
    source = (
        "from sqlalchemy.orm import scoped_session\n"
        "class Database:\n"
        "    def __init__(self):\n"
        "        self.session = scoped_session(self.make)\n"
        "        self.session.registry = object()\n"
        "        self.ours = {}\n"
        "        self.ours['k'] = 1\n"
    )
    assert _reaches(source) == ["attribute-assignment self.session.registry"]


def test_own_privates_are_not_flagged() -> None:
    source = (
        "import threading\n"
        "class Ours:\n"
        "    def __init__(self):\n"
        "        self._x = 1\n"
        "        self._local = threading.local()\n"
        "    def m(self):\n"
        "        self._local.slot = self._x\n"
        "        return self._x\n"
        "def helper(ours: Ours) -> Ours:\n"
        "    ours._x = 2\n"
        "    made = Ours()\n"
        "    made.y = ours._x\n"
        "    return helper(made)\n"
        "def other():\n"
        "    return Ours._x\n"
    )
    assert _reaches(source) == []


def test_library_privates_and_imports_are_found() -> None:
    source = (
        "from flask.globals import _cv_app\n"
        "import sqlalchemy._internal\n"
        "from flask import current_app\n"
        "def f(stmt, proxy):\n"
        "    a = stmt._for_update_arg\n"
        "    b = getattr(proxy, '_get_current_object')\n"
        "    c = current_app._get_current_object()\n"
        "    return stmt.__class__\n"
    )
    assert _reaches(source) == [
        "private-import from flask.globals import _cv_app",
        "private-import import sqlalchemy._internal",
        "private-attribute stmt._for_update_arg",
        "private-attribute proxy._get_current_object",
        "private-attribute current_app._get_current_object",
    ]


def test_flask_internal_tables_and_setattr_are_found() -> None:
    source = (
        "def f(app, view, obj):\n"
        "    app.after_request_funcs.setdefault(None, []).insert(0, view)\n"
        "    app.view_functions['x'] = view\n"
        "    app.url_map.converters['y'] = view\n"
        "    app.url_map.add(view)\n"
        "    setattr(obj, 'name', 1)\n"
        "    record = obj.record\n"
        "    record.info['k'] = 1\n"
    )
    assert _reaches(source) == [
        "flask-internal-table app.after_request_funcs",
        "flask-internal-table app.view_functions",
        "flask-internal-table app.url_map.converters[...]",
        "item-assignment app.url_map.converters[...]",
        "flask-internal-table app.url_map.add",
        "attribute-assignment setattr(obj, 'name')",
        "item-assignment record.info[...]",
    ]


def test_a_subclass_of_a_library_class_setting_its_state_is_found() -> None:
    source = (
        "from sqlalchemy.util import ScopedRegistry\n"
        "class Registry(ScopedRegistry):\n"
        "    def __init__(self, create):\n"
        "        self.createfunc = create\n"
        "        self.registry['k'] = 1\n"
    )
    assert _reaches(source) == [
        "library-subclass-attribute self.createfunc",
        "library-subclass-attribute self.registry[...]",
    ]


def test_a_name_bound_to_ours_and_to_something_else_is_not_ours() -> None:
    source = (
        "class Ours:\n    pass\n"
        "def f(engine):\n"
        "    x = Ours()\n"
        "    if engine:\n"
        "        x = engine.dialect\n"
        "    x.do_ping = None\n"
    )
    assert _reaches(source) == ["attribute-assignment x.do_ping"]


def test_allowed_patterns_match_only_their_file_and_expression() -> None:
    entry = Allowed("pkg/m.py", "session.info[...]", "why")
    assert entry.matches(Finding("pkg/m.py", 1, "item-assignment", "session.info[...]"))
    assert not entry.matches(Finding("pkg/n.py", 1, "item-assignment", "session.info[...]"))
    assert not entry.matches(Finding("pkg/m.py", 1, "item-assignment", "session.infos[...]"))
    assert Allowed("pkg/m.py", "g.*", "why").matches(Finding("pkg/m.py", 1, "attribute-assignment", "g.user"))


# -- 5. short functions ---------------------------------------------------------------------

LONGEST_FUNCTION = 40  # lines, docstring included: a longer one hides more than one job


def test_no_function_is_longer_than_forty_lines() -> None:
    long = []
    for module in MODULES.values():
        for node in ast.walk(module.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > LONGEST_FUNCTION:
                    long.append(f"{module.rel}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "\n".join(long)
