"""The environment modules' import graph: the contract (envs.py) imports no environment, every
environment imports the contract, and no project module is imported inside a function to dodge a
cycle (docs/method.md §12)."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = {p.stem for p in ROOT.glob("*.py")}
ENV_MODULES = ("envs", "alfworld_engine", "worlds", "alfworld_env", "webshop", "searchqa", "environments")


def project_imports(module: str) -> tuple[set[str], set[str]]:
    """(project modules imported at the top level, project modules imported inside a function)."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    top, nested = set(), set()
    top_nodes = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = {node.module.split(".")[0]}
        else:
            continue
        (top if id(node) in top_nodes else nested).update(names & PROJECT)
    return top, nested


def test_environment_modules_import_one_way():
    graph = {m: project_imports(m) for m in ENV_MODULES}
    assert graph["envs"] == (set(), set())                      # the contract knows no environment
    for module, (top, nested) in graph.items():
        assert not nested, f"{module} imports {nested} inside a function"
    for env in ("alfworld_env", "webshop", "searchqa"):
        assert "envs" in graph[env][0]
    assert graph["environments"][0] == {"alfworld_env", "webshop", "searchqa"}
    assert graph["alfworld_engine"][0] == set()                 # the engine: textworld/alfworld only
    # no cycle: a depth-first walk over the top-level edges never meets a module on its own path
    def walk(module, path):
        assert module not in path, " -> ".join(path + (module,))
        for dep in graph.get(module, (set(),))[0]:
            walk(dep, path + (module,))
    for module in ENV_MODULES:
        walk(module, ())


def test_importing_the_contract_loads_no_engine():
    code = ("import sys, envs; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'textworld', 'alfworld', 'fast_downward', 'torch', 'webshop', 'searchqa', 'alfworld_env', 'worlds'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
