"""Mutation testing of the state machine and the four provider adapters, on SQLite only.

For each module the script makes small wrong edits (mutants) to its syntax tree, one at a time,
and runs the tests that execute the edited line. A mutant the tests notice (a failure, an error
or a hang) is killed; one they pass is a survivor, a behaviour no test pins down. The script
prints per module the number of mutants, killed, survived and the score (killed / mutants), then
lists the survivors as `file:line: original -> mutant`.

    .venv/bin/python bench/mutation.py                          # every module listed in MODULES
    .venv/bin/python bench/mutation.py ipn/providers/cubepay.py
    .venv/bin/python bench/mutation.py cubepay transitions -j 2

How it runs, and why so:
- One pytest session collects the tests once, with coverage on, so the project and the test
  modules are imported once. The script's plugin then replaces pytest's test loop.
- A forked child runs every test once with one coverage context per test: that maps each line
  to the tests that run it, fastest first. A line run only at import time (module level, class
  bodies) maps to all the module's tests. A mutant on a line no test runs is a survivor without
  running anything.
- Each mutant is compiled from the edited tree in memory: the checkout is never written to and
  nothing is copied. A forked child swaps the mutant's function bodies into the imported module
  (`__code__`, so a class in a registry or a bound method sees them too), updates its tables in
  place, rebinds its other names, and runs the line's tests through pytest's own runtest
  protocol, stopping at the first failure.
- Tests: the module's own fast tests on SQLite (`-k "not postgresql"`, no `postgres`, `worker` or
  `fault` marker). Tests that start processes would not see the mutant anyway.
- A mutant still running after a timeout (three times the mapping run, at least 20 s) is killed.

Mutations: comparison operators (`==`/`!=`, `<`/`<=`, `>`/`>=`, `in`/`not in`, `is`/`is not`),
`and`/`or`, `not x` -> `x`, arithmetic (`+`/`-`, `*`/`/`, `//` -> `/`, `%` -> `*`, augmented
too), `True`/`False`, numbers +1, strings `"s"` -> `"XXsXX"`, `return x` -> `return None`,
`break`/`continue`, and one element dropped from a literal set, list, tuple or dict whose items
are plain names or constants (tables such as `FORWARD`). Not mutated: docstrings, annotations,
`if TYPE_CHECKING:` blocks, arguments to logging calls, the sentences of a
`raise` (strings with a space, f-strings), and lines marked `# pragma: no mutate`.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import enum
import functools
import os
import select
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, FunctionType, ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FAST = ["-k", "not postgresql", "-m", "not postgres and not worker and not fault"]
SHARED_TESTS = [
    "tests/test_transitions.py",
    "tests/test_processing.py",
    "tests/test_reconcile.py",
    "tests/test_payments.py",
]
MODULES: dict[str, list[str]] = {
    "ipn/transitions.py": ["tests/providers", *SHARED_TESTS],
    "ipn/providers/cubepay.py": ["tests/providers/test_cubepay.py", *SHARED_TESTS],
    "ipn/providers/bitcoinpaygate.py": ["tests/providers/test_bitcoinpaygate.py", *SHARED_TESTS],
    "ipn/providers/coinbarpay.py": ["tests/providers/test_coinbarpay.py", *SHARED_TESTS],
    "ipn/providers/cryptoprocessing.py": [
        "tests/providers/test_cryptoprocessing.py",
        *SHARED_TESTS,
    ],
    "ipn/events/outbox.py": ["tests/events", "tests/test_transitions.py"],
    # Receiving: routing, the body cap, and `success` only for a stored row.
    "ipn/callbacks.py": [
        "tests/test_receiving.py",
        "tests/test_accounts.py",
        "tests/test_metrics.py",
    ],
    "ipn/events/delivery.py": ["tests/events"],
    # Accounts: reading the accounts file, and a callback verified by a replaced secret.
    "ipn/config.py": ["tests/test_accounts_config.py", "tests/test_accounts.py"],
    # The keep-alive transport under every status query, against a real HTTP/1.1 server.
    "ipn/providers/transport.py": ["tests/providers/test_transport.py"],
    "ipn/providers/base.py": [
        "tests/providers",
        "tests/test_accounts_config.py",
        "tests/test_accounts.py",
        "tests/test_processing.py",
    ],
}
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


@dataclass(frozen=True)
class Site:
    line: int
    original: str
    mutant: str


class Mutator(ast.NodeTransformer):
    """Walks a module's tree in a fixed order, numbering every place it could mutate; with a
    `target` it applies that one mutation and leaves the rest of the tree as it was."""

    def __init__(self, source: str, target: int | None = None) -> None:
        self.source = source
        self.lines = source.splitlines()
        self.target = target
        self.sites: list[Site] = []
        self.in_raise = 0

    def _take(self, node: ast.AST, mutant: str) -> bool:
        line = getattr(node, "lineno", 0)
        if 0 < line <= len(self.lines) and "pragma: no mutate" in self.lines[line - 1]:
            return False
        if self.target is not None:  # applying: only the count matters
            self.sites.append(Site(line, "", ""))
            return len(self.sites) - 1 == self.target
        self.sites.append(Site(line, " ".join(self._segment(node).split()), mutant))
        return False

    def _segment(self, node: ast.AST) -> str:
        """The node's source text (ast.get_source_segment, without re-splitting the source)."""
        try:
            first, last = node.lineno - 1, node.end_lineno - 1  # type: ignore[attr-defined,operator]
            start, end = node.col_offset, node.end_col_offset  # type: ignore[attr-defined]
        except AttributeError:
            return ast.unparse(node)
        lines = [line.encode() for line in self.lines[first : last + 1]]
        if len(lines) == 1:
            return lines[0][start:end].decode()
        return b"\n".join([lines[0][start:], *lines[1:-1], lines[-1][:end]]).decode()

    # Places not to mutate.
    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return node  # a docstring
        return self.generic_visit(node)

    def visit_Raise(self, node: ast.Raise) -> ast.AST:
        # Sentences in an exception are for people; the rest of a raise is mutated.
        self.in_raise += 1
        try:
            return self.generic_visit(node)
        finally:
            self.in_raise -= 1

    def visit_arg(self, node: ast.arg) -> ast.AST:
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        node.args = self.visit(node.args)
        node.decorator_list = [self.visit(d) for d in node.decorator_list]
        node.body = self._visit_body(node.body)
        return node

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if node.value is not None:
            node.value = self.visit(node.value)
        return node

    def visit_If(self, node: ast.If) -> ast.AST:
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return node
        return self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return node
        return self.generic_visit(node)

    def _visit_body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        out = []
        for stmt in body:
            new = self.visit(stmt)
            out.append(new)
        return out

    # Mutations. Children first, then the node's own alternatives, in a fixed order.
    def visit_Call(self, node: ast.Call) -> ast.AST:
        func = node.func
        if (
            isinstance(func, ast.Attribute)
            and func.attr in LOG_METHODS
            and isinstance(func.value, ast.Name)
            and "log" in func.value.id.lower()
        ):
            return node
        if isinstance(func, ast.Name) and func.id == "cast" and node.args:
            node.args[1:] = [self.visit(a) for a in node.args[1:]]
            return node  # the first argument is a type
        return self.generic_visit(node)

    SWAP_COMPARE: dict[type[ast.cmpop], type[ast.cmpop]] = {
        ast.Eq: ast.NotEq,
        ast.NotEq: ast.Eq,
        ast.Lt: ast.LtE,
        ast.LtE: ast.Lt,
        ast.Gt: ast.GtE,
        ast.GtE: ast.Gt,
        ast.In: ast.NotIn,
        ast.NotIn: ast.In,
        ast.Is: ast.IsNot,
        ast.IsNot: ast.Is,
    }
    SWAP_BINOP: dict[type[ast.operator], type[ast.operator]] = {
        ast.Add: ast.Sub,
        ast.Sub: ast.Add,
        ast.Mult: ast.Div,
        ast.Div: ast.Mult,
        ast.FloorDiv: ast.Div,
        ast.Mod: ast.Mult,
    }

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        for i, op in enumerate(node.ops):
            swap = self.SWAP_COMPARE.get(type(op))
            if swap is None:
                continue
            new = copy.copy(node)
            new.ops = [*node.ops[:i], swap(), *node.ops[i + 1 :]]
            if self._take(node, ast.unparse(new)):
                return new
        return node

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        new = copy.copy(node)
        new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        if self._take(node, ast.unparse(new)):
            return new
        return node

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, ast.Not) and self._take(node, ast.unparse(node.operand)):
            return node.operand
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        swap = self.SWAP_BINOP.get(type(node.op))
        if swap is not None:
            new = copy.copy(node)
            new.op = swap()
            if self._take(node, ast.unparse(new)):
                return new
        return node

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        self.generic_visit(node)
        swap = self.SWAP_BINOP.get(type(node.op))
        if swap is not None:
            new = copy.copy(node)
            new.op = swap()
            if self._take(node, ast.unparse(new)):
                return new
        return node

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.AST:
        if self.in_raise:
            node.values = [
                self.visit(v) if isinstance(v, ast.FormattedValue) else v for v in node.values
            ]
            return node
        # The literal parts of an f-string are one mutation: the whole string marked.
        node.values = [
            self.visit(v) if isinstance(v, ast.FormattedValue) else v for v in node.values
        ]
        new = ast.JoinedStr(values=[ast.Constant("XX"), *node.values, ast.Constant("XX")])
        if self._take(node, ast.unparse(new)):
            return ast.copy_location(new, node)
        return node

    def visit_FormattedValue(self, node: ast.FormattedValue) -> ast.AST:
        node.value = self.visit(node.value)
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        value = node.value
        replacement: Any
        if isinstance(value, bool):
            replacement = not value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            replacement = value + 1
        elif isinstance(value, str):
            if self.in_raise and " " in value:
                return node
            replacement = f"XX{value}XX"
        elif isinstance(value, bytes):
            replacement = b"XX" + value + b"XX"
        else:
            return node
        new = ast.copy_location(ast.Constant(replacement), node)
        if self._take(node, ast.unparse(new)):
            return new
        return node

    def visit_Return(self, node: ast.Return) -> ast.AST:
        self.generic_visit(node)
        value = node.value
        if value is None or (isinstance(value, ast.Constant) and value.value is None):
            return node
        new = ast.copy_location(ast.Return(value=ast.Constant(None)), node)
        if self._take(node, "return None"):
            return new
        return node

    def visit_Break(self, node: ast.Break) -> ast.AST:
        if self._take(node, "continue"):
            return ast.copy_location(ast.Continue(), node)
        return node

    def visit_Continue(self, node: ast.Continue) -> ast.AST:
        if self._take(node, "break"):
            return ast.copy_location(ast.Break(), node)
        return node

    @staticmethod
    def _plain(node: ast.AST | None) -> bool:
        return isinstance(node, ast.Constant | ast.Name | ast.Attribute)

    def _drop_items(self, node: ast.Set | ast.List | ast.Tuple) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node, ast.List | ast.Tuple) and not isinstance(node.ctx, ast.Load):
            return node
        if not node.elts or not all(self._plain(e) for e in node.elts):
            return node
        for i in range(len(node.elts)):
            new = copy.copy(node)
            new.elts = node.elts[:i] + node.elts[i + 1 :]
            if isinstance(new, ast.Set) and not new.elts:
                mutant: ast.AST = ast.Call(ast.Name("set", ast.Load()), [], [])
            else:
                mutant = new
            if self._take(node, ast.unparse(mutant)):
                return ast.copy_location(mutant, node)
        return node

    visit_Set = _drop_items  # type: ignore[assignment]
    visit_List = _drop_items  # type: ignore[assignment]
    visit_Tuple = _drop_items  # type: ignore[assignment]

    def visit_Dict(self, node: ast.Dict) -> ast.AST:
        self.generic_visit(node)
        if not node.keys or not all(self._plain(k) for k in node.keys):
            return node
        for i in range(len(node.keys)):
            new = copy.copy(node)
            new.keys = node.keys[:i] + node.keys[i + 1 :]
            new.values = node.values[:i] + node.values[i + 1 :]
            key = ast.unparse(node.keys[i])  # type: ignore[arg-type]
            if self._take(node, f"{{...}} without {key}"):
                return new
        return node


def sites(source: str) -> list[Site]:
    mutator = Mutator(source)
    mutator.visit(ast.parse(source))
    return mutator.sites


def mutant_code(source: str, path: Path, index: int) -> CodeType:
    mutator = Mutator(source, target=index)
    tree = ast.fix_missing_locations(mutator.visit(ast.parse(source)))
    return compile(tree, str(path), "exec")


def _patch(old: Any, new: Any) -> bool:
    """Gives the object the rest of the process already holds the mutant's behaviour; False when
    it cannot be done in place (the caller rebinds the name instead)."""
    if isinstance(old, FunctionType) and isinstance(new, FunctionType):
        if old.__code__.co_freevars != new.__code__.co_freevars:
            return False
        old.__code__ = new.__code__
        old.__defaults__ = new.__defaults__
        old.__kwdefaults__ = new.__kwdefaults__
        return True
    if isinstance(old, property) and isinstance(new, property):
        pairs = [(old.fget, new.fget), (old.fset, new.fset), (old.fdel, new.fdel)]
        return all(a is b or _patch(a, b) for a, b in pairs)
    if isinstance(old, staticmethod | classmethod) and type(old) is type(new):
        return _patch(old.__func__, new.__func__)
    if isinstance(old, functools.cached_property) and isinstance(new, functools.cached_property):
        return _patch(old.func, new.func)
    if hasattr(old, "__wrapped__") and hasattr(new, "__wrapped__"):
        return _patch(old.__wrapped__, new.__wrapped__)
    if isinstance(old, type) and isinstance(new, type) and not issubclass(old, enum.Enum):
        for key, value in new.__dict__.items():
            if key in ("__dict__", "__weakref__", "__doc__"):
                continue
            current = old.__dict__.get(key, _ABSENT)
            if current is value or (current is not _ABSENT and _patch(current, value)):
                continue
            try:
                setattr(old, key, value)
            except (AttributeError, TypeError):
                pass
        return True
    return False


_ABSENT = object()


def apply_mutant(module: ModuleType, code: CodeType) -> None:
    """Runs the mutant's code in a fresh namespace and moves what differs into the imported
    module: function bodies are swapped in place (so every reference to them, a class in a
    registry, a bound method, sees the mutant), mutable tables are updated in place, other
    names rebound."""
    namespace: dict[str, Any] = {
        "__name__": module.__name__,
        "__file__": module.__file__,
        "__package__": module.__package__,
        "__spec__": module.__spec__,
    }
    exec(code, namespace)
    for key, new in namespace.items():
        if key.startswith("__") and key.endswith("__"):
            continue
        old = module.__dict__.get(key, _ABSENT)
        if old is new or (old is not _ABSENT and _patch(old, new)):
            continue
        if type(old) is type(new) and isinstance(old, dict):
            old.clear()
            old.update(new)
        elif type(old) is type(new) and isinstance(old, list | set):
            old.clear()
            old.extend(new) if isinstance(old, list) else old.update(new)
        else:
            module.__dict__[key] = new


def fork_child(body: Any) -> int:
    """Runs `body()` in a forked child, output discarded; returns the child's pid. The child's
    exit code is what `body` returns (71 when it raises)."""
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        code = int(body())
    except BaseException:  # any escape is a failed run, reported by its exit code
        code = 71
    finally:
        os._exit(code)


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def run_items(items: Sequence[Any], on_report: Any = None) -> int:
    """Runs the collected items in this process as pytest would, fixtures shared between
    neighbours; stops at the first failure. 1 if one failed, else 0."""
    failed = False

    class Watch:
        def pytest_runtest_logreport(self, report: Any) -> None:
            nonlocal failed
            if on_report is not None:
                on_report(report)
            if report.failed:
                failed = True

    if not items:
        return 0
    config = items[0].config
    config.pluginmanager.register(Watch(), "mutation-watch")
    for i, item in enumerate(items):
        nextitem = items[i + 1] if i + 1 < len(items) else None
        config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
        if failed:
            return 1
    return 0


@dataclass
class Result:
    module: str
    mutants: int = 0
    killed: int = 0
    timeouts: int = 0
    survivors: list[Site] = field(default_factory=list)
    uncovered: int = 0
    seconds: float = 0.0

    @property
    def score(self) -> float:
        return 100.0 * self.killed / self.mutants if self.mutants else 100.0


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


class Driver:
    """pytest plugin that replaces the test loop: after collection (the project imported, under
    coverage), one forked child runs every test once with a coverage context per test; then one
    forked child per mutant runs the tests of the mutated line."""

    def __init__(
        self, relpaths: Sequence[str], cov: Any, workdir: Path, jobs: int, verbose: bool
    ) -> None:
        self.relpaths, self.cov, self.workdir = relpaths, cov, workdir
        self.jobs, self.verbose = jobs, verbose
        self.results: list[Result] = []
        self.error: str | None = None
        self.mapped_seconds = 0.0
        self.seconds: dict[str, float] = {}

    def pytest_runtestloop(self, session: Any) -> bool:
        if session.testsfailed:
            self.error = "collecting the tests failed"
            return True
        by_line = self.map_lines(session.items)
        if by_line is None:
            return True
        for relpath in self.relpaths:
            self.results.append(self.run_module(relpath, session.items, by_line[relpath]))
        return True

    def map_lines(self, items: list[Any]) -> dict[str, dict[int, list[Any]]] | None:
        import json

        import coverage

        times = self.workdir / "seconds.json"
        started = time.monotonic()

        def body() -> int:
            seconds: dict[str, float] = {}

            def on_report(report: Any) -> None:
                seconds[report.nodeid] = seconds.get(report.nodeid, 0.0) + report.duration
                if report.when == "teardown":
                    self.cov.switch_context("")

            class Contexts:
                def pytest_runtest_setup(self, item: Any) -> None:
                    cov.switch_context(item.nodeid)

            cov = self.cov
            items[0].config.pluginmanager.register(Contexts(), "mutation-contexts")
            code = run_items(items, on_report)
            self.cov.stop()
            self.cov.save()
            times.write_text(json.dumps(seconds))
            return code

        pid = fork_child(body)
        self.cov.stop()  # the parent's own data (collection) is not saved; the child's is
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        self.mapped_seconds = time.monotonic() - started
        if code != 0:
            self.error = f"the unmutated tests fail (exit {code}); run them with pytest to see"
            return None
        seconds = json.loads(times.read_text())
        self.seconds = seconds
        data = coverage.CoverageData(basename=self.cov.config.data_file)
        data.read()
        by_id = {item.nodeid: item for item in items}
        found: dict[str, dict[int, list[Any]]] = {}
        for relpath in self.relpaths:
            found[relpath] = {}
            for line, contexts in data.contexts_by_lineno(str(ROOT / relpath)).items():
                ids = sorted(set(contexts), key=lambda t: seconds.get(t, 0.0))
                found[relpath][line] = [by_id.get(i, i) for i in ids]
        print(f"tests mapped to lines ({self.mapped_seconds:.0f} s)", flush=True)
        self.timeout = max(20.0, 3 * self.mapped_seconds)
        return found

    def run_module(self, relpath: str, items: list[Any], by_line: dict[int, list[Any]]) -> Result:
        path = ROOT / relpath
        source = path.read_text()
        module = sys.modules[module_name(relpath)]
        own = tuple(str(ROOT / t) for t in MODULES[relpath])
        module_items = sorted(
            (i for i in items if str(i.path).startswith(own)),
            key=lambda i: self.seconds.get(i.nodeid, 0.0),
        )
        result = Result(relpath)
        started = time.monotonic()
        found = sites(source)
        result.mutants = len(found)
        queue: Iterator[tuple[int, Site]] = iter(enumerate(found))
        running: dict[int, tuple[Site, float, int]] = {}
        reported = 0

        def start(index: int, site: Site) -> None:
            selected = tests_for(site.line, by_line)
            if "" in selected:
                selected = module_items  # run at import time: every test depends on it
            selected = [i for i in selected if not isinstance(i, str)]
            if not selected:
                result.uncovered += 1
                result.survivors.append(site)
                return
            code = mutant_code(source, path, index)

            def body() -> int:
                apply_mutant(module, code)
                # Nobody reads a killed mutant's traceback; formatting one costs most of a kill.
                from _pytest.nodes import Node

                Node._repr_failure_py = lambda self, excinfo, style=None: "killed"  # type: ignore[method-assign,assignment,misc]
                return run_items(selected)

            running[fork_child(body)] = (site, time.monotonic(), len(selected))

        while True:
            while len(running) < self.jobs:
                nxt = next(queue, None)
                if nxt is None:
                    break
                start(*nxt)
            if not running:
                break
            for pid, (site, since, count) in list(running.items()):
                finished, status = os.waitpid(pid, os.WNOHANG)
                if finished:
                    code: int | None = os.waitstatus_to_exitcode(status)
                elif time.monotonic() - since > self.timeout:
                    kill(pid)
                    code = None
                else:
                    continue
                del running[pid]
                if code is None:
                    result.killed += 1
                    result.timeouts += 1
                elif code == 0:
                    result.survivors.append(site)
                else:
                    result.killed += 1
                if self.verbose:
                    verdict = {None: "timeout", 0: "SURVIVED"}.get(code, "killed")
                    took = time.monotonic() - since
                    print(
                        f"  {relpath}:{site.line}: {verdict} ({count} tests, {took:.1f} s): "
                        f"{site.mutant}",
                        flush=True,
                    )
            select.select([], [], [], 0.005)
            done = result.killed + len(result.survivors)
            if done >= reported + 50:
                reported = done
                print(f"  {relpath}: {done}/{result.mutants}", flush=True)
        result.survivors.sort(key=lambda s: s.line)
        result.seconds = time.monotonic() - started
        print(
            f"{relpath}: {result.mutants} mutants, {result.killed} killed, "
            f"{len(result.survivors)} survived, score {result.score:.1f}% "
            f"({result.seconds:.0f} s)",
            flush=True,
        )
        return result


# A constant spread over several lines (a tuple of field names) runs as one instruction on its
# statement's first line: a site on a later line takes the tests of the line above it that ran.
STATEMENT_SPAN = 20


def tests_for(line: int, by_line: dict[int, list[Any]]) -> list[Any]:
    for candidate in range(line, max(0, line - STATEMENT_SPAN), -1):
        if candidate in by_line:
            return by_line[candidate]
    return []


def resolve(names: Sequence[str]) -> list[str]:
    if not names:
        return list(MODULES)
    chosen = []
    for name in names:
        matches = [m for m in MODULES if m == name or Path(m).stem == Path(name).stem]
        if not matches:
            sys.exit(f"unknown module {name!r}; choose from: {', '.join(MODULES)}")
        chosen.extend(m for m in matches if m not in chosen)
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="paths or names (default: all of MODULES)")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="mutants run at once")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every verdict")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    args = parser.parse_args(argv)
    modules = resolve(args.modules)
    if args.list:
        for relpath in modules:
            for site in sites((ROOT / relpath).read_text()):
                print(f"{relpath}:{site.line}: {site.original} -> {site.mutant}")
        return 0
    import coverage
    import pytest

    os.chdir(ROOT)
    started = time.monotonic()
    tests = sorted({t for relpath in modules for t in MODULES[relpath]})
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        cov = coverage.Coverage(
            data_file=str(Path(tmp) / "lines.coverage"),
            include=[str(ROOT / m) for m in modules],
            config_file=False,
        )
        driver = Driver(modules, cov, Path(tmp), args.jobs, args.verbose)
        cov.start()
        args_ = [*tests, *FAST, "-o", "addopts=", "-p", "no:cacheprovider", "-p", "no:terminal"]
        code = pytest.main([*args_, "-W", "ignore"], plugins=[driver])
        cov.stop()
    if driver.error or code not in (0, 5):
        print(driver.error or f"pytest exited {code}", file=sys.stderr)
        return 1
    results = driver.results
    print()
    print(f"{'module':40} {'mutants':>8} {'killed':>7} {'survived':>9} {'score':>7}")
    for r in results:
        print(f"{r.module:40} {r.mutants:8} {r.killed:7} {len(r.survivors):9} {r.score:6.1f}%")
    print(f"total time {time.monotonic() - started:.0f} s")
    for r in results:
        if not r.survivors:
            continue
        print(f"\nsurvivors in {r.module} ({r.uncovered} on lines no test runs):")
        for site in r.survivors:
            print(f"  {r.module}:{site.line}: {site.original} -> {site.mutant}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
