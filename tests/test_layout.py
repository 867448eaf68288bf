"""The house plan, enforced on the source (issue 40): which layer may import which, no private
name imported across modules, no import cycle, and the lab (``experiments/``) outside the package.

Read from the files with :mod:`ast`, imports inside functions included: a lazy import is still a
dependency, and a cycle through one is still a cycle a newcomer has to untangle."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"runtime": "coformer.runtime", "calibration": "coformer.calibration", "compiler": "coformer.compiler",
            "tools": "coformer.tools"}
# Each layer may import the ones listed (and itself): the device runtime needs nothing above it.
ALLOWED = {"runtime": set(), "calibration": {"runtime"}, "compiler": {"runtime", "calibration"},
           "tools": {"runtime", "calibration", "compiler"}}


def _modules() -> dict[str, Path]:
    mods = {}
    for top, name in PACKAGES.items():
        for f in (REPO / top).rglob("*.py"):
            parts = f.relative_to(REPO / top).with_suffix("").parts
            mods[".".join((name, *parts)).removesuffix(".__init__")] = f
    return mods


def _imports(path: Path):
    """(line, imported module, name or None) for every import in the file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, None
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                yield node.lineno, node.module, a.name


def _layer(module: str):
    return next((top for top, name in PACKAGES.items() if module == name or module.startswith(name + ".")), None)


def test_each_layer_imports_only_the_layers_below_it_and_nothing_imports_the_lab():
    bad = []
    for mod, path in _modules().items():
        mine = _layer(mod)
        for line, target, _ in _imports(path):
            theirs = _layer(target)
            if target.split(".")[0] == "experiments" or (theirs and theirs != mine and theirs not in ALLOWED[mine]):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_private_name_is_imported_across_modules():
    bad = [f"{path.relative_to(REPO)}:{line} imports {name} from {target}"
           for mod, path in _modules().items() for line, target, name in _imports(path)
           if target.startswith("coformer.") and target != mod and name and name.startswith("_")
           and not name.startswith("__")]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        for _, target, name in _imports(path):
            full = f"{target}.{name}" if name else target
            dep = full if full in mods else target if target in mods else None
            if dep and dep != mod:
                graph[mod].add(dep)
    # Tarjan's strongly connected components: any with more than one module is a cycle
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_lab_is_not_installed():
    """experiments/ holds the one-off report scripts; setup.cfg ships only the product."""
    cfg = (REPO / "setup.cfg").read_text()
    assert "experiments" not in cfg
    assert (REPO / "experiments" / "README.md").is_file()


def test_every_subcommand_of_both_commands_has_a_module_and_a_function_that_runs_it():
    """``coformer`` and ``coformer-runtime`` are assembled from one module per command
    (``tools/commands``, ``runtime/commands``): a parser registered without the function that
    runs it would fail only when a user types that command."""
    import argparse

    from coformer.runtime.cli import build_parser as runtime_parser
    from coformer.runtime.commands import COMMANDS as RUNTIME_COMMANDS
    from coformer.tools.cli import build_parser as tools_parser
    from coformer.tools.commands import COMMANDS as TOOLS_COMMANDS

    for build, modules, want in ((tools_parser, TOOLS_COMMANDS, {"quickstart", "compile", "profile-kit", "serve",
                                                                  "fit-predictor", "profile-stats", "testbed",
                                                                  "bench"}),
                                 (runtime_parser, RUNTIME_COMMANDS, {"central", "worker", "infer", "time", "profile",
                                                                     "benchmark", "build-engines", "doctor", "verify",
                                                                     "keys", "sign"})):
        sub = next(a for a in build()._actions if isinstance(a, argparse._SubParsersAction))
        assert set(sub.choices) == want
        for name, p in sub.choices.items():
            run = p.get_default("run")
            assert callable(run) and run.__module__ in {m.__name__ for m in modules}, name


def test_the_runtime_branches_on_no_strategy_name():
    """Strategies are plug-ins (``runtime/strategies/``): the central node, the worker and the
    manifest read a strategy's facts, never its name. A comparison with a registered name
    anywhere else in the runtime would be one more place a new strategy has to be added."""
    from coformer.runtime.strategies import STRATEGIES

    names = set(STRATEGIES)
    bad = []
    for path in (REPO / "runtime").rglob("*.py"):
        if "strategies" in path.relative_to(REPO / "runtime").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            for side in (node.left, *node.comparators):
                consts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                hit = [c.value for c in consts if isinstance(c, ast.Constant) and c.value in names]
                if hit:
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno} compares with {hit}")
    assert not bad, "\n".join(bad)


def test_every_strategy_has_both_halves():
    """A strategy is a runtime plug-in (``runtime/strategies``) and a builder
    (``compiler/strategies.py``): one listed in a table without the other would compile bundles
    nothing serves, or serve bundles nothing compiles. Each entry must also resolve."""
    from coformer.compiler.strategies import COMPILERS, compiler_for
    from coformer.runtime.strategies import STRATEGIES, strategy_class
    from coformer.runtime.strategies.base import Strategy

    assert set(COMPILERS) == set(STRATEGIES)
    for name in STRATEGIES:
        assert issubclass(strategy_class(name), Strategy) and strategy_class(name).name == name
        assert callable(compiler_for(name))


def test_no_function_over_80_lines_in_the_compiler_calibration_or_runtime():
    """Issue 40: a function a newcomer must read whole fits on a screen or two; a longer one is
    split into steps of one idea each (docstring included in the count)."""
    long = []
    for top in ("compiler", "calibration", "runtime"):
        for f in sorted((REPO / top).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > 80:
                        long.append(f"{f.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_the_manifest_is_assembled_in_one_place():
    """Every bundle's manifest, whatever its strategy, is made by ``compiler/bundle.StagedBundle``
    (checksums, signature, the atomic rename); a builder only supplies its fields."""
    makers = []
    for top in PACKAGES:
        for f in sorted((REPO / top).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Manifest"
                        or isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "Manifest"):
                    makers.append(f"{f.relative_to(REPO)}:{node.lineno}")
    assert len(makers) == 1 and makers[0].startswith("compiler/bundle.py:"), makers
