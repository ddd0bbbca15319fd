"""The package's import structure: no import circles, and no import from a lower layer to a higher one.

The layers, lowest first, are written here and nowhere else; each subpackage's ``__init__`` docstring says in words
what it may import. A module may import modules of its own layer and of every layer below it. Every import
counts, also those inside functions, since a lazy import hides a dependency without removing it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nnunet_compress"

# lowest first; a name is a top-level module (errors.py) or a subpackage (tucker/)
LAYERS = ["errors", "settings", "costs", "progress",  # foundation: no nnU-Net, no method
          "tucker", "pruning", "distillation",    # the methods' maths: pure torch (+ tensorly)
          "inference",                            # CPU engine and torch fallback
          "budgets",                              # budgets in seconds: cost model, timings, calibration
          "network",                              # CompressedUNet, the class compressed plans name
          "nnunet",                               # every nnU-Net-facing adapter
          "evaluation",                           # metrics, statistics, reports, profiles
          "workflows",                            # model folder in -> model folder out
          "auto",                                 # the search over workflows (nnunet-compress auto)
          "totalseg",                             # TotalSegmentator homes
          "demo",                                 # the synthetic pipeline
          "cli"]                                  # the command line


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Package modules that `name` imports anywhere in its source (parents' __init__ included)."""
    out = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            parts = target.split(".")
            for i in range(2, len(parts) + 1):  # importing a.b.c runs a.b's __init__ first
                candidate = ".".join(parts[:i])
                if candidate in known and candidate != name:
                    out.add(candidate)
    return out


def unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported_modules(name, path, known) for name, path in known.items()}


def test_every_module_belongs_to_a_layer():
    missing = sorted({unit(m) for m in modules()} - set(LAYERS) - {None})
    assert not missing, f"add {missing} to LAYERS (in the right place) and describe it in its __init__ docstring"


def test_no_import_runs_upward():
    rank = {u: i for i, u in enumerate(LAYERS)}
    upward = [f"{src} -> {dst}" for src, targets in graph().items() for dst in sorted(targets)
              if unit(src) and unit(dst) and rank[unit(dst)] > rank[unit(src)]]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_circles():
    edges = graph()
    index, low, on_stack, stack, circles, counter = {}, {}, set(), [], [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_each_subpackage_says_what_it_owns():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc.split()) >= 20, f"{init} needs a docstring saying what the subpackage owns and may import"


def failures_in_a_fresh_interpreter(setup: str, items: str, load: str) -> str:
    """Run `load` for each item of `items` in a new interpreter (after `setup`); the failures, one line each."""
    script = "\n".join([
        "import importlib, importlib.util, pathlib, sys, traceback", setup, "failed = []", f"for item in {items}:",
        "    try:", f"        {load}", "    except Exception:",
        "        failed.append(str(item) + ': ' + traceback.format_exc().strip().splitlines()[-1])",
        "print('\\n'.join(failed))"])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    return proc.stdout.strip() or (proc.stderr[-2000:] if proc.returncode else "")


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    """Each module imported first, with no other module of the package loaded before it: an import-order circle
    that only shows up for one entry point fails here (heavy third-party packages stay loaded, for speed)."""
    names = [m for m in modules() if not m.endswith("__main__")]
    forget = "[sys.modules.pop(m) for m in list(sys.modules) if m.split('.')[0] == 'nnunet_compress']"
    failed = failures_in_a_fresh_interpreter("", repr(names), f"{forget}; importlib.import_module(item)")
    assert not failed, f"modules that fail to import on their own:\n{failed}"


def test_every_benchmark_script_imports():
    """The benchmarks live outside the package and no unit test runs them: an import moved inside the package must
    not leave one of them broken until someone measures (their main() does not run on import). Each is imported
    as `python -m benchmarks.NAME` runs it: a module of the package `benchmarks`, from the repository root."""
    repo = PACKAGE.parent
    names = [f"benchmarks.{p.stem}" for p in sorted((repo / "benchmarks").glob("*.py")) if p.stem != "__init__"]
    failed = failures_in_a_fresh_interpreter(f"sys.path.insert(0, {str(repo)!r})", repr(names),
                                             "importlib.import_module(item)")
    assert not failed, f"benchmark scripts that fail to import:\n{failed}"


# ---- outside the layers: the trainers, and the CLI's own rule ---------------------------------------------------

TRAINERS = PACKAGE.parent / "trainers"
TRAINER_CEILING = "nnunet"  # trainers are nnU-Net glue: they import the adapters and every layer below, no workflow


def test_trainers_import_only_the_nnunet_glue_and_below():
    known, rank = modules(), {u: i for i, u in enumerate(LAYERS)}
    upward = [f"trainers/{path.name} -> {dst}" for path in sorted(TRAINERS.glob("*.py"))
              for dst in sorted(imported_modules(f"trainers.{path.stem}", path, known))
              if unit(dst) and rank[unit(dst)] > rank[TRAINER_CEILING]]
    assert not upward, f"trainers import above {TRAINER_CEILING!r} (move what they need down):\n" + "\n".join(upward)


CLI_MAX_LINES = 120
# nnU-Net, the engines and the tensor maths are called by the workflows a command calls, never by the command itself
CLI_FORBIDDEN = ("torch", "nnunetv2", "openvino", "nncf", "tensorly", "numpy",
                 "nnunet_compress.inference", "nnunet_compress.budgets", "nnunet_compress.network")


def test_cli_modules_parse_validate_and_call_a_workflow():
    """Every CLI module is short and imports no framework or engine: a command parses, validates and calls one
    workflow function, so its logic can be used (and tested) without the command line."""
    problems = []
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        source = path.read_text()
        if len(source.splitlines()) > CLI_MAX_LINES:
            problems.append(f"{path.name}: {len(source.splitlines())} lines (at most {CLI_MAX_LINES})")
        for node in ast.walk(ast.parse(source)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            problems += [f"{path.name} imports {name}" for name in names
                         if any(name == f or name.startswith(f + ".") for f in CLI_FORBIDDEN)]
    assert not problems, "CLI modules doing a workflow's work:\n" + "\n".join(problems)


def test_every_subpackage_ships_in_the_wheel():
    """pyproject.toml lists the packages explicitly: a subpackage missing there imports in a checkout and fails
    after `pip install .`."""
    import tomllib
    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    missing = sorted(f"nnunet_compress.{init.parent.name}" for init in PACKAGE.glob("*/__init__.py")
                     if f"nnunet_compress.{init.parent.name}" not in listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"


def test_nothing_imports_the_benchmarks():
    """`benchmarks` is the top layer: it may import anything from the package, and neither the package nor the
    trainers import it (it is not in the wheel, and a benchmark changes with what it measures)."""
    repo = PACKAGE.parent
    importers = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(repo / "trainers").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            if any(n.split(".")[0] == "benchmarks" for n in names):
                importers.append(f"{path.relative_to(repo)}:{node.lineno}")
    assert not importers, "imports of benchmarks from the package or the trainers:\n" + "\n".join(importers)
