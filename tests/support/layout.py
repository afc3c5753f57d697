"""Static checks of a package's shape, read from its source with ``ast`` (nothing is
imported): the import graph and its cycles, and reaches into library objects.

Used by ``tests/db/test_layout.py``; its self-tests feed these functions synthetic
sources (``parse_modules``) so that a checker that finds nothing cannot pass silently.

Import graph
------------
Every ``import`` / ``from ... import`` of every module is read, relative imports are
resolved against the importing module (a package's ``__init__`` resolves ``.`` to
itself), and each is given a kind:

- ``runtime``: executed when the module is imported (module or class level, also
  under ``try``/``if`` other than ``if TYPE_CHECKING:``);
- ``deferred``: inside a function, executed only when it is called;
- ``type-checking``: under ``if TYPE_CHECKING:`` (never executed, but it still says
  "this module depends on that one", and a circle closed through it is a circle in
  the design).

``from pkg import x`` is an edge to the submodule ``pkg.x`` when that is a module of
the package, otherwise to ``pkg`` (the name comes from its ``__init__``). A parent
package's ``__init__``, which Python runs before any submodule, is *not* made an edge:
every package that re-exports its submodules would otherwise be a cycle.

Reaches into library objects
----------------------------
Without static types we cannot tell a Flask object from one of ours, so the check
is conservative: an expression counts as **ours** only when it provably is, and
everything else is treated as a library object. Ours are:

- the names ``self`` and ``cls`` (and a method's first parameter);
- a module of the package, and a class, function or module-level instance that the
  package defines, reached by name (directly, or imported from the package);
- a local name whose every binding in its function is ours: a parameter annotated
  with a class of ours, or an assignment from an expression that is ours: a call of
  a class of ours, a call of a function or method of ours whose return annotation is
  a class of ours (``self._state()`` -> ``AppState``), a fresh container (literal,
  ``dict()``, ``weakref.WeakKeyDictionary()``...), or another name that is ours.

"A class of ours" means one whose bases are all ours or builtins (``object``,
``Exception``...; ``Generic``/``Protocol``): a subclass of a library class (a
declarative model, a form, ``_AppContextRegistry(ScopedRegistry)``) is a library
object, since its attributes are the library's.

An attribute of an object of ours (``self.session``, ``state.engine``) is *not*
ours: its type is unknown. So ``self.session.registry = ...`` and
``engine.dialect.do_ping = ...`` are both flagged. Anything flow-dependent (a name
bound once to ours and once to something else, a loop variable, a tuple unpack) is
not ours: when in doubt, flag, and let the allow-list say why it is fine.

Rules (each a ``Finding.rule``):

- ``private-attribute``: ``X._name`` (read, write or ``del``; also ``getattr(X, "_name")``)
  where ``X`` is not ours. Dunder names are not private. ``self._x`` and
  ``engines._all_engines`` are our own privates and are not flagged.
- ``attribute-assignment``: ``X.attr = ...``, ``X.attr += ...``, ``del X.attr``,
  ``setattr(X, ...)``, ``delattr(X, ...)``, ``object.__setattr__(X, ...)`` where ``X``
  is not ours.
- ``library-subclass-attribute``: ``self.attr = ...`` or ``self.attr[k] = ...`` inside a
  class of the package that subclasses a library class: it may overwrite the library's
  own state (``_AppContextRegistry`` setting ``ScopedRegistry``'s ``registry``).
- ``item-assignment``: ``X[k] = ...`` / ``del X[k]`` where the container ``X`` is not
  ours (``record.info[...]``, ``app.config[...]``, an event's ``cparams[...]``);
  ``self.attr[k]`` counts as ours in a class of ours.
- ``flask-internal-table``: any use of a Flask attribute that Flask documents as
  internal ("This data structure is internal. It should not be modified directly"):
  ``FLASK_INTERNAL_TABLES``. Every use, reads included: a read can be aliased and then
  mutated through a method (``app.after_request_funcs.setdefault(None, []).insert(...)``),
  which no assignment rule sees. ``url_map`` is flagged when mutated (an assignment to
  it or its attributes, an item assignment, or a mutating method call on it).
- ``private-import``: ``from lib import _name`` / ``import lib._mod`` of any module
  outside the package (the libraries named in the issue and any other).

What it does not see: a library object mutated through one of its own methods
(beyond Flask's internal tables), or reached through ``vars()``/``__dict__`` of
something ours. The allow-list is matched by file and expression, so an entry
covers each occurrence of that expression in that file.
"""

from __future__ import annotations

import ast
import builtins
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

RUNTIME = "runtime"
DEFERRED = "deferred"
TYPE_CHECKING_ONLY = "type-checking"
_STRENGTH = {RUNTIME: 0, DEFERRED: 1, TYPE_CHECKING_ONLY: 2}  # lower runs more surely

# Flask attributes whose docs say "This data structure is internal. It should not be
# modified directly and its format may change at any time." (Flask.* and Blueprint.*),
# plus the scaffold's other registries of the same kind.
FLASK_INTERNAL_TABLES = frozenset({
    "after_request_funcs",
    "before_request_funcs",
    "teardown_request_funcs",
    "teardown_appcontext_funcs",
    "url_value_preprocessors",
    "url_default_functions",
    "template_context_processors",
    "error_handler_spec",
    "view_functions",
    "url_build_error_handlers",
    "shell_context_processors",
    "before_first_request_funcs",
    "deferred_functions",
})
FLASK_MUTATED_TABLES = frozenset({"url_map"})  # flagged when mutated only
_MUTATORS = frozenset({
    "add", "append", "extend", "insert", "update", "setdefault", "pop", "popitem", "clear",
    "remove", "discard", "__setitem__", "__delitem__", "add_url_rule",
})
# Constructors whose result is a new container that nobody else holds.
FRESH_CONSTRUCTORS = frozenset({
    "threading.local", "dict", "list", "set", "frozenset", "tuple", "bytearray", "deque", "defaultdict",
    "OrderedDict", "Counter", "WeakKeyDictionary", "WeakValueDictionary", "WeakSet",
})
_SAFE_BASES = frozenset({"Generic", "Protocol", "NamedTuple", "TypedDict"}) | {
    name for name, value in vars(builtins).items() if isinstance(value, type)
}


# -- modules ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    name: str  # dotted: myapp.db.engines
    rel: str  # as reported: myapp/db/engines.py
    is_package: bool
    tree: ast.Module


def parse_modules(sources: Mapping[str, str]) -> dict[str, Module]:
    """Modules from ``{relative path: source}``, e.g. ``{"pkg/__init__.py": "", ...}``."""
    modules = {}
    for rel, source in sources.items():
        parts = rel.removesuffix(".py").split("/")
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        name = ".".join(parts)
        modules[name] = Module(name, rel, is_package, ast.parse(source, filename=rel))
    return modules


def load_package(root: Path, package: str) -> dict[str, Module]:
    """Every ``.py`` module of ``root/package``, its subpackages included."""
    return parse_modules({
        path.relative_to(root).as_posix(): path.read_text()
        for path in sorted((root / package).rglob("*.py"))
    })


# -- imports ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # dotted; inside the package, a module of it
    line: int
    kind: str
    rel: str  # the importer's file

    def where(self) -> str:
        return f"{self.rel}:{self.line}"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _with_kinds(node: ast.AST, kind: str = RUNTIME) -> Iterator[tuple[ast.AST, str]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _with_kinds(child, DEFERRED if kind == RUNTIME else kind)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for inner in child.body:
                yield inner, TYPE_CHECKING_ONLY
                yield from _with_kinds(inner, TYPE_CHECKING_ONLY)
            for inner in child.orelse:
                yield inner, kind
                yield from _with_kinds(inner, kind)
        else:
            yield child, kind
            yield from _with_kinds(child, kind)


def _resolve_from(module: Module, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    parts = module.name.split(".")
    if not module.is_package:
        parts = parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    base = ".".join(parts)
    return f"{base}.{node.module}" if node.module else base


def _known_prefix(name: str, known: Iterable[str]) -> str | None:
    known = set(known)
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return None


def imports(module: Module, known: Iterable[str]) -> list[Import]:
    """Every import of ``module``; targets inside the package are modules of ``known``."""
    known = set(known)
    found = []
    for node, kind in _with_kinds(module.tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [_known_prefix(alias.name, known) or alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, node)
            from_base = False
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    targets.append(f"{base}.{alias.name}")
                else:
                    from_base = True
            if from_base:
                targets.append(_known_prefix(base, known) or base)
        for target in dict.fromkeys(targets):
            found.append(Import(module.name, target, node.lineno, kind, module.rel))  # type: ignore[attr-defined]
    return found


def import_graph(modules: Mapping[str, Module]) -> dict[str, dict[str, Import]]:
    """importer -> imported module of the package -> its surest import (runtime first)."""
    graph: dict[str, dict[str, Import]] = {name: {} for name in modules}
    for name, module in modules.items():
        for each in imports(module, modules):
            if each.target not in modules:
                continue
            current = graph[name].get(each.target)
            if current is None or _STRENGTH[each.kind] < _STRENGTH[current.kind]:
                graph[name][each.target] = each
    return graph


@dataclass(frozen=True)
class Cycle:
    steps: tuple[Import, ...]  # a -> b, b -> c, c -> a

    @property
    def kind(self) -> str:
        """The least sure of its imports: a cycle is ``runtime`` only if every step is."""
        return max((step.kind for step in self.steps), key=_STRENGTH.__getitem__)

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(step.importer for step in self.steps)

    def __str__(self) -> str:
        path = " -> ".join([*self.modules, self.modules[0]])
        via = ", ".join(f"{step.where()} {step.kind}" for step in self.steps)
        return f"{path}  [{self.kind}; {via}]"


def find_cycles(modules: Mapping[str, Module]) -> list[Cycle]:
    """Every elementary cycle of the package's import graph, each once (from its
    smallest module), in a stable order."""
    graph = import_graph(modules)
    order = sorted(graph)
    rank = {name: index for index, name in enumerate(order)}
    cycles = []

    def walk(start: str, node: str, path: list[Import], seen: set[str]) -> None:
        for target, step in sorted(graph[node].items()):
            if target == start:
                cycles.append(Cycle((*path, step)))
            elif rank[target] > rank[start] and target not in seen:
                walk(start, target, [*path, step], seen | {target})

    for start in order:
        walk(start, start, [], {start})
    return cycles


# -- reaches into library objects ----------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    rel: str
    line: int
    rule: str
    expr: str

    def __str__(self) -> str:
        return f"{self.rel}:{self.line} [{self.rule}] {self.expr}"


@dataclass(frozen=True)
class Allowed:
    rel: str
    expr: str  # the Finding's expr; ``*`` matches anything
    reason: str

    def matches(self, finding: Finding) -> bool:
        pattern = ".*".join(re.escape(part) for part in self.expr.split("*"))
        return finding.rel == self.rel and re.fullmatch(pattern, finding.expr) is not None

    def __str__(self) -> str:
        return f"{self.rel}: {self.expr}"


def _root_name(node: ast.expr) -> str | None:
    while isinstance(node, (ast.Subscript, ast.Attribute, ast.Call)):
        node = node.value if not isinstance(node, ast.Call) else node.func
    return node.id if isinstance(node, ast.Name) else None


def _annotation_names(annotation: ast.expr | None) -> set[str] | None:
    """The names an annotation mentions (None aside), or None if there is none."""
    if annotation is None:
        return None
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        try:
            annotation = ast.parse(annotation.value, mode="eval").body
        except SyntaxError:
            return set()
    names = set()
    for node in ast.walk(annotation):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
    return names - {"None"}


@dataclass
class _Index:
    """What the package defines, by name: its classes (and which are ours, i.e. not
    library subclasses), its functions returning a class of ours, each module's names
    that are ours."""

    modules: Mapping[str, Module]
    class_bases: dict[str, list[ast.expr]] = field(default_factory=dict)
    duplicate_classes: set[str] = field(default_factory=set)
    own_classes: set[str] = field(default_factory=set)
    returns_own: set[str] = field(default_factory=set)
    module_names: dict[str, set[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        returns: dict[str, list[ast.expr | None]] = {}
        for module in self.modules.values():
            for node in ast.walk(module.tree):
                if isinstance(node, ast.ClassDef):
                    if node.name in self.class_bases:
                        self.duplicate_classes.add(node.name)
                    self.class_bases.setdefault(node.name, []).extend(node.bases)
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    returns.setdefault(node.name, []).append(node.returns)
        changed = True
        while changed:
            changed = False
            for name, bases in self.class_bases.items():
                if name in self.own_classes or name in self.duplicate_classes:
                    continue
                if all(self._base_is_ours(base) for base in bases):
                    self.own_classes.add(name)
                    changed = True
        for name, annotations in returns.items():
            if all(self.is_own_annotation(annotation) for annotation in annotations):
                self.returns_own.add(name)
        for _ in range(3):  # re-exports of re-exports
            for module in self.modules.values():
                self.module_names[module.name] = self._own_module_names(module)

    def _base_is_ours(self, base: ast.expr) -> bool:
        name = _root_name(base)
        return name is not None and (name in _SAFE_BASES or name in self.own_classes)

    def is_own_annotation(self, annotation: ast.expr | None) -> bool:
        names = _annotation_names(annotation)
        return bool(names) and all(name in self.own_classes for name in names)  # type: ignore[union-attr]

    def _own_module_names(self, module: Module) -> set[str]:
        names = {node.name for node in module.tree.body
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        for node, _ in _with_kinds(module.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == module.name.split(".")[0]:
                        names.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(module, node)
                for alias in node.names:
                    if f"{base}.{alias.name}" in self.modules:
                        names.add(alias.asname or alias.name)
                    elif base in self.modules and alias.name in self.module_names.get(base, set()):
                        names.add(alias.asname or alias.name)
        for node in module.tree.body:
            if isinstance(node, ast.Assign) and self.is_own_value(node.value, lambda name: name in names):
                names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
            elif (isinstance(node, ast.AnnAssign) and node.value is not None and isinstance(node.target, ast.Name)
                  and self.is_own_value(node.value, lambda name: name in names)):
                names.add(node.target.id)
        return names

    def is_own_value(self, value: ast.expr, is_own_name: Callable[[str], bool]) -> bool:
        if isinstance(value, ast.Name):
            return is_own_name(value.id)
        if isinstance(value, (ast.Constant, ast.Dict, ast.List, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)):
            return True
        if isinstance(value, ast.IfExp):
            return self.is_own_value(value.body, is_own_name) and self.is_own_value(value.orelse, is_own_name)
        if isinstance(value, ast.Call):
            func = value.func
            if isinstance(func, ast.Name):
                if func.id in FRESH_CONSTRUCTORS:
                    return True
                return is_own_name(func.id) and (func.id in self.own_classes or func.id in self.returns_own)
            if isinstance(func, ast.Attribute):
                if func.attr in FRESH_CONSTRUCTORS or ast.unparse(func) in FRESH_CONSTRUCTORS:
                    return True
                if isinstance(func.value, ast.Name) and is_own_name(func.value.id):
                    return func.attr in self.own_classes or func.attr in self.returns_own
        return False


@dataclass
class _Scope:
    own: dict[str, bool]  # name -> every binding in this function is ours
    class_is_ours: bool | None  # the enclosing class of a method; None outside classes


class _Checker(ast.NodeVisitor):
    def __init__(self, index: _Index, module: Module) -> None:
        self.index = index
        self.module = module
        self.module_own = index.module_names[module.name]
        self.scopes: list[_Scope] = []
        self.self_attrs: list[set[str]] = []  # per enclosing class: attributes of self that are ours
        self.findings: list[Finding] = []

    # -- ownership --

    def is_own_name(self, name: str) -> bool:
        for scope in reversed(self.scopes):
            if name in scope.own:
                return scope.own[name]
        return name in self.module_own

    def is_own(self, node: ast.expr) -> bool:
        if isinstance(node, ast.Name):
            return self.is_own_name(node.id)
        if isinstance(node, ast.Call):  # state_of(session): a function of ours returning a class of ours
            return self.index.is_own_value(node, self.is_own_name)
        return (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
            and bool(self.self_attrs)
            and node.attr in self.self_attrs[-1]
            and self.is_own_name("self")
        )

    def flag(self, node: ast.AST, rule: str, expr: str) -> None:
        self.findings.append(Finding(self.module.rel, node.lineno, rule, expr))  # type: ignore[attr-defined]

    # -- scopes --

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for child in [*node.bases, *node.keywords, *node.decorator_list]:
            self.visit(child)
        ours = node.name in self.index.own_classes
        self.self_attrs.append(self._own_self_attributes(node))
        for child in node.body:
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._visit_function(child, ours)
            else:
                self.visit(child)
        self.self_attrs.pop()

    def _own_self_attributes(self, node: ast.ClassDef) -> set[str]:
        """The attributes of ``self`` that this class only ever sets to something ours
        (``self._mine = threading.local()``), and its fields annotated with ours."""
        verdicts: dict[str, list[bool]] = {}
        module_level = self.module_own.__contains__
        for child in node.body:
            if isinstance(child, ast.AnnAssign) and isinstance(child.target, ast.Name):
                verdicts.setdefault(child.target.id, []).append(self.index.is_own_annotation(child.annotation))
        for child in ast.walk(node):
            targets: list[ast.expr] = []
            own = False
            if isinstance(child, ast.Assign):
                targets, own = list(child.targets), self.index.is_own_value(child.value, module_level)
            elif isinstance(child, ast.AnnAssign):
                targets = [child.target]
                own = self.index.is_own_annotation(child.annotation) or (
                    child.value is not None and self.index.is_own_value(child.value, module_level)
                )
            elif isinstance(child, ast.AugAssign):
                targets = [child.target]
            while targets:
                target = targets.pop()
                if isinstance(target, (ast.Tuple, ast.List)):  # unpacked: not known to be ours
                    targets.extend(target.elts)
                    own = False
                elif isinstance(target, ast.Starred):
                    targets.append(target.value)
                elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                    verdicts.setdefault(target.attr, []).append(own)
        return {name for name, values in verdicts.items() if all(values)}

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._visit_function(node, None)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._visit_function(node, None)

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef, class_is_ours: bool | None) -> None:
        """``class_is_ours``: None for a plain function, else whether its class is ours."""
        for child in [*node.decorator_list, *node.args.defaults, *node.args.kw_defaults]:
            if child is not None:
                self.visit(child)
        scope = _Scope({}, class_is_ours)
        self.scopes.append(scope)
        self._bind(node, scope, method=class_is_ours is not None and not self._is_static(node))
        for child in node.body:
            self.visit(child)
        self.scopes.pop()

    def visit_Lambda(self, node: ast.Lambda) -> None:
        scope = _Scope({arg.arg: False for arg in ast.walk(node.args) if isinstance(arg, ast.arg)}, None)
        self.scopes.append(scope)
        self.visit(node.body)
        self.scopes.pop()

    @staticmethod
    def _is_static(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
        return any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)

    def _bind(self, node: ast.FunctionDef | ast.AsyncFunctionDef, scope: _Scope, method: bool) -> None:
        bindings: dict[str, list[bool]] = {}
        arguments = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
        for position, arg in enumerate(arguments):
            own = (method and position == 0) or arg.arg in ("self", "cls") or self.index.is_own_annotation(arg.annotation)
            bindings.setdefault(arg.arg, []).append(own)
        for arg in (node.args.vararg, node.args.kwarg):
            if arg is not None:
                bindings.setdefault(arg.arg, []).append(False)
        scope.own = {name: all(values) for name, values in bindings.items()}  # params first, for is_own_value
        for child in _own_body_nodes(node):
            if isinstance(child, ast.Assign):
                own = self.index.is_own_value(child.value, self.is_own_name)
                for target in child.targets:
                    _bind_target(target, own, bindings)
            elif isinstance(child, ast.AnnAssign):
                own = self.index.is_own_annotation(child.annotation) or (
                    child.value is not None and self.index.is_own_value(child.value, self.is_own_name)
                )
                _bind_target(child.target, own, bindings)
            elif isinstance(child, (ast.For, ast.AsyncFor, ast.comprehension)):
                _bind_target(child.target, False, bindings)
            elif isinstance(child, ast.withitem) and child.optional_vars is not None:
                _bind_target(child.optional_vars, False, bindings)
            elif isinstance(child, ast.NamedExpr):
                _bind_target(child.target, self.index.is_own_value(child.value, self.is_own_name), bindings)
            elif isinstance(child, ast.ExceptHandler) and child.name:
                bindings.setdefault(child.name, []).append(False)
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                for alias in child.names:
                    bindings.setdefault((alias.asname or alias.name).split(".")[0], []).append(False)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bindings.setdefault(child.name, []).append(True)
        scope.own = {name: all(values) for name, values in bindings.items()}

    # -- rules --

    def visit_Attribute(self, node: ast.Attribute) -> None:
        target = node.value
        ours = self.is_own(target)
        private = node.attr.startswith("_") and not (node.attr.startswith("__") and node.attr.endswith("__"))
        storing = isinstance(node.ctx, (ast.Store, ast.Del))
        if private and not ours:
            self.flag(node, "private-attribute", ast.unparse(node))
        elif storing and not ours:
            self.flag(node, "attribute-assignment", ast.unparse(node))
        elif storing and self._self_in_library_subclass(target):
            self.flag(node, "library-subclass-attribute", ast.unparse(node))
        if node.attr in FLASK_INTERNAL_TABLES and not ours:
            self.flag(node, "flask-internal-table", ast.unparse(node))
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            container = node.value
            while isinstance(container, ast.Subscript):
                container = container.value
            reported = isinstance(container, ast.Attribute) and (
                container.attr in FLASK_INTERNAL_TABLES
                or (container.attr.startswith("_") and not self.is_own(container.value))
            )
            if isinstance(container, ast.Attribute) and self._self_in_library_subclass(container.value):
                self.flag(node, "library-subclass-attribute", f"{ast.unparse(container)}[...]")
            elif not reported and not self._is_own_container(container):
                self.flag(node, "item-assignment", f"{ast.unparse(container)}[...]")
            if isinstance(container, ast.Attribute) and _mentions(container, FLASK_MUTATED_TABLES):
                self.flag(node, "flask-internal-table", f"{ast.unparse(container)}[...]")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("setattr", "delattr", "getattr", "hasattr") and node.args:
            obj, name = node.args[0], node.args[1] if len(node.args) > 1 else None
            literal = name.value if isinstance(name, ast.Constant) and isinstance(name.value, str) else None
            shown = f"{func.id}({ast.unparse(obj)}, {ast.unparse(name) if name is not None else ''})"
            ours = self.is_own(obj)
            if literal is not None and literal.startswith("_") and not literal.endswith("__") and not ours:
                self.flag(node, "private-attribute", f"{ast.unparse(obj)}.{literal}")
            elif func.id in ("setattr", "delattr") and not ours:
                self.flag(node, "attribute-assignment", shown)
            elif func.id in ("setattr", "delattr") and self._self_in_library_subclass(obj):
                self.flag(node, "library-subclass-attribute", shown)
            if literal in FLASK_INTERNAL_TABLES and not ours:
                self.flag(node, "flask-internal-table", shown)
        elif isinstance(func, ast.Attribute) and func.attr in ("__setattr__", "__delattr__") and node.args:
            if not self.is_own(node.args[0]) or self._self_in_library_subclass(node.args[0]):
                self.flag(node, "attribute-assignment", ast.unparse(func) + f"({ast.unparse(node.args[0])}, ...)")
        if isinstance(func, ast.Attribute) and func.attr in _MUTATORS and _mentions(func.value, FLASK_MUTATED_TABLES):
            self.flag(node, "flask-internal-table", ast.unparse(func))
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if not self._internal(alias.name) and any(_private(part) for part in alias.name.split(".")):
                self.flag(node, "private-import", f"import {alias.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or self._internal(node.module or "") or node.module == "__future__":
            return
        module = node.module or ""
        for alias in node.names:
            if any(_private(part) for part in module.split(".")) or _private(alias.name):
                self.flag(node, "private-import", f"from {module} import {alias.name}")

    # -- helpers --

    def _internal(self, dotted: str) -> bool:
        return dotted.split(".")[0] == self.module.name.split(".")[0]

    def _self_in_library_subclass(self, node: ast.expr) -> bool:
        return (
            isinstance(node, ast.Name)
            and node.id in ("self", "cls")
            and bool(self.scopes)
            and any(scope.class_is_ours is False for scope in self.scopes)
        )

    def _is_own_container(self, node: ast.expr) -> bool:
        if self.is_own(node):
            return True
        # self.attr[...] in a class of ours: what our class stores.
        return (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
            and any(scope.class_is_ours for scope in self.scopes)
        )


def _own_body_nodes(function: ast.FunctionDef | ast.AsyncFunctionDef) -> Iterator[ast.AST]:
    """The function's own statements and expressions, not those of nested functions,
    classes or lambdas (whose bindings are theirs); their names are yielded."""
    stack: list[ast.AST] = list(function.body)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        stack.extend(ast.iter_child_nodes(node))


def _bind_target(target: ast.expr, own: bool, bindings: dict[str, list[bool]]) -> None:
    if isinstance(target, ast.Name):
        bindings.setdefault(target.id, []).append(own)
    elif isinstance(target, (ast.Tuple, ast.List)):
        for element in target.elts:
            _bind_target(element, False, bindings)
    elif isinstance(target, ast.Starred):
        _bind_target(target.value, False, bindings)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _mentions(node: ast.expr, attributes: frozenset[str]) -> bool:
    return any(isinstance(each, ast.Attribute) and each.attr in attributes for each in ast.walk(node))


def library_reaches(modules: Mapping[str, Module]) -> list[Finding]:
    """Every finding of the rules above in every module, sorted by file and line."""
    index = _Index(modules)
    findings = []
    for module in modules.values():
        checker = _Checker(index, module)
        checker.visit(module.tree)
        findings.extend(checker.findings)
    return sorted(set(findings), key=lambda f: (f.rel, f.line, f.rule, f.expr))
