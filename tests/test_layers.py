"""The package's layering (issue 23): no import cycle between its modules, and no import from a lower layer to a
higher one. Layers, lowest first: the shared top-level modules (noise, rng, errors, files); models and data; the
certification library; training; jobs (which may import everything)."""

from __future__ import annotations

import ast
from pathlib import Path

import dmae_lightning

PACKAGE = Path(dmae_lightning.__file__).parent
LAYERS = {
    "noise": 0,
    "rng": 0,
    "errors": 0,
    "files": 0,
    "models": 1,
    "data": 1,
    "certification": 2,
    "training": 3,
    "jobs": 4,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The dmae_lightning modules a file imports (anywhere in it, TYPE_CHECKING blocks and functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dmae_lightning"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dmae_lightning"))
    return found


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return LAYERS[top]


GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_package_has_a_layer_and_a_docstring():
    for module in GRAPH:
        if module != "dmae_lightning":
            layer(module)  # KeyError: a new top-level module or package needs its place in LAYERS
    for init in PACKAGE.glob("*/__init__.py"):
        assert (ast.get_docstring(ast.parse(init.read_text())) or "").count(" ") > 20, (
            f"{init}: say what lives there"
        )


def test_no_import_from_a_lower_layer_to_a_higher_one():
    upward = [
        (m, i)
        for m, targets in GRAPH.items()
        if m != "dmae_lightning"
        for i in targets
        if i != "dmae_lightning" and layer(i) > layer(m)
    ]
    assert not upward, upward


def test_no_import_cycle():
    def resolve(
        target: str,
    ) -> str:  # "from pkg.mod import name" names a module; a package's name is its __init__
        return target if target in GRAPH else target.rsplit(".", 1)[0]

    edges = {
        m: {resolve(t) for t in targets if resolve(t) in GRAPH and resolve(t) != m}
        for m, targets in GRAPH.items()
    }
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in edges[module]:
            if state.get(target) == 1:
                raise AssertionError(" -> ".join([*path, module, target]))
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in edges:
        if module not in state:
            visit(module, [])


def test_global_rank_follows_lightning_s_order(monkeypatch):
    """Issue 23: inside a SLURM allocation Lightning's launcher starts its processes with SLURM_PROCID=0 inherited;
    LOCAL_RANK decides (as in Lightning's rank_zero), and a NODE_RANK > 0 node's first process is not rank 0."""
    from dmae_lightning.jobs.cluster import global_rank

    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert global_rank() == 0
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert global_rank() == 1
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")
    assert global_rank() != 0
    monkeypatch.setenv("RANK", "0")  # torchrun's global rank is the rank
    assert global_rank() == 0
