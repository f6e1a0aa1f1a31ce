"""What code a pipeline step depends on, for its cache key (`pipelines.dag`): a step re-runs when code it
can execute changes, and only then -- fixing a scorer must not re-train a 7B model.

A step names its code as roots (`Step.code`): functions (the step functions of `pipelines.steps`) and
module names. A function contributes its own source, the same-module definitions its body names (and
theirs, transitively), and the modules its body or those definitions import or name. A module
contributes its whole source and, transitively, every project module it imports -- at top level or
inside a function (a lazy import runs when the code calls it) -- and the `__init__` of every package
on the way (Python runs them on import). Imports under `if TYPE_CHECKING:` are skipped: they never run.

The analysis is static (the AST; nothing is imported), so it is cheap enough for `dpn pipeline plan` and
errs on the side of re-running: a module counts whole, whichever of its functions a step calls. What
it cannot see is a module loaded by a name computed at run time (`importlib.import_module(name)`);
`tests/test_robustness.py` checks that a scorer edit re-keys evaluation only and a model edit the
training, and that no project module imports `dpn`'s lazy exports (`from dpn import DPNConfig` loads
`dpn.configuration_dpn` through importlib, which the analysis cannot see).
Only the project's own packages (`PROJECT_PACKAGES`) count: library versions are pinned by the
install, not by the cache.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("dpn", "pipelines")

CodeRoot = Callable | str


@cache
def module_file(name: str) -> Path | None:
    """The source file of project module `name` (a package's `__init__.py`), or None when `name` is not a
    module of the project's packages."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"))


def _imports(node: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """The import statements anywhere in `node` (function bodies included), except under `if
    TYPE_CHECKING:`. Statements only hold statements in these fields, so expressions need no visit."""
    todo = [node]
    while todo:
        n = todo.pop()
        if isinstance(n, ast.Import | ast.ImportFrom):
            yield n
            continue
        for name in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(n, name, None)
            if isinstance(children, list):
                todo.extend(c for c in children if isinstance(c, ast.stmt | ast.excepthandler | ast.match_case)
                            and not _is_type_checking(c))


def _imported_modules(node: ast.Import | ast.ImportFrom, module: str, alias: ast.alias | None = None) -> list[str]:
    """Project modules an import statement inside `module` loads (the package parents included); with
    `alias`, those of that one imported name."""
    names = [alias] if alias is not None else node.names
    if isinstance(node, ast.Import):
        targets = [a.name for a in names]
    else:
        base = node.module or ""
        if node.level:  # relative: resolved against the importing module's package
            package = module.split(".")
            if module_file(module).name != "__init__.py":
                package = package[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        # `from X import Y`: Y may itself be a module (`from pipelines import tracking`).
        targets = [base] + [f"{base}.{a.name}" for a in names]
    found = []
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if module_file(name) is not None:
                found.append(name)
    return found


@cache
def _parse(path: Path, mtime_ns: int) -> ast.Module:
    return ast.parse(path.read_bytes(), filename=str(path))


def _tree(name: str) -> ast.Module:
    path = module_file(name)
    return _parse(path, path.stat().st_mtime_ns)


@cache
def _direct_imports(name: str, mtime_ns: int) -> tuple[str, ...]:
    """Project modules module `name` imports anywhere in its source (cached per version of the file)."""
    found: list[str] = []
    for node in _imports(_tree(name)):
        found.extend(_imported_modules(node, name))
    return tuple(dict.fromkeys(found))


def module_closure(names: Iterable[str]) -> set[str]:
    """The project modules `names` load when imported and run: themselves, every project module they
    import anywhere (transitively) and every package `__init__` on the way."""
    seen: set[str] = set()
    todo = [n for name in names for n in _with_parents(name)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_file(name)
        if path is None:
            continue
        seen.add(name)
        todo.extend(_direct_imports(name, path.stat().st_mtime_ns))
    return seen


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _without_annotations(tree: ast.Module) -> ast.Module:
    """`tree` without argument, return and variable annotations: under `from __future__ import
    annotations` they are strings that never run, so the names they mention are no dependency."""
    for n in ast.walk(tree):
        if isinstance(n, ast.arg):
            n.annotation = None
        elif isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef):
            n.returns = None
        elif isinstance(n, ast.AnnAssign):
            n.annotation = ast.Constant(None)
    return tree


def _global_names(tree: ast.Module) -> set[str]:
    """Names `tree` (a definition or a statement) reads from its module's namespace: the free names of
    every scope in it (`symtable` knows Python's scoping: a parameter or local that shadows a module-level
    name is not that name)."""
    import symtable

    names: set[str] = set()
    todo = [symtable.symtable(ast.unparse(_without_annotations(tree)), "<definition>", "exec")]
    while todo:
        table = todo.pop()
        for sym in table.get_symbols():
            if table.get_type() == "module" and sym.is_referenced() and not sym.is_imported():
                names.add(sym.get_name())
            elif table.get_type() != "module" and sym.is_global() and sym.is_referenced():
                names.add(sym.get_name())
        todo.extend(table.get_children())
    return names


@cache
def _top_level(module: str, mtime_ns: int) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(top-level definitions -> their source, imported names -> the project modules they load) of a
    module (cached per version of the file)."""
    lines = module_file(module).read_text().splitlines(keepends=True)
    defs: dict[str, str] = {}
    imports: dict[str, list[str]] = {}
    for node in _tree(module).body:
        source = "".join(lines[node.lineno - 1 : node.end_lineno])
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defs[node.name] = source
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Name):
                    defs[t.id] = source
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                bound = (alias.asname or alias.name).split(".")[0]
                imports.setdefault(bound, []).extend(_imported_modules(node, module, alias))
    return defs, imports


def _function_roots(fn: Callable) -> tuple[list[str], set[str]]:
    """(sources, modules) of a function: its source and that of the same-module definitions it reads,
    transitively, and the project modules those import or read."""
    module = fn.__module__
    source = textwrap.dedent(inspect.getsource(fn))
    if module_file(module) is None:  # e.g. a test's function: its own source is all we can key on
        return [source], set()
    defs, imports = _top_level(module, module_file(module).stat().st_mtime_ns)
    sources, modules = [source], set()
    todo, done = [source], set()
    while todo:
        src = textwrap.dedent(todo.pop())
        try:
            tree = ast.parse(src)
        except SyntaxError:  # a lambda: getsource gives the lines around it, not a statement
            continue
        for n in _imports(tree):  # imports inside the definition (lazy ones included)
            modules.update(_imported_modules(n, module))
        for name in sorted(_global_names(tree)):
            modules.update(imports.get(name, []))
            if name in defs and name not in done:
                done.add(name)
                sources.append(defs[name])
                todo.append(defs[name])
    return sources, module_closure(modules)


def code_key(roots: Iterable[CodeRoot]) -> tuple[str, list[str]]:
    """(sha256 hex, the modules it covers) of the code `roots` can run (see the module docstring)."""
    sources: list[str] = []
    modules: set[str] = set()
    for root in roots:
        if isinstance(root, str):
            if module_file(root) is None:
                raise ValueError(f"code root {root!r} is not a module of {PROJECT_PACKAGES}")
            modules |= module_closure([root])
        else:
            s, m = _function_roots(root)
            sources += s
            modules |= m
    h = hashlib.sha256()
    for s in sorted(set(sources)):
        h.update(b"fn\0" + s.encode() + b"\0")
    for name in sorted(modules):
        h.update(f"mod\0{name}\0".encode() + module_file(name).read_bytes())
    return h.hexdigest(), sorted(modules)


__all__ = ["PROJECT_PACKAGES", "code_key", "module_closure", "module_file"]
