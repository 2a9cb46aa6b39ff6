"""The package's import graph: no cycles, no import up the layer order, no torch.distributed in the model.

Every `import` statement of every module is read with `ast`, at module level and inside functions alike, so a
lazy import cannot hide an upward dependency. Another tree can be checked with
`DSV4_LAYERING_ROOT=/path/to/dsv4 pytest tests/test_layering.py`.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("DSV4_LAYERING_ROOT", Path(__file__).resolve().parents[1] / "dsv4"))
PACKAGE = "dsv4"

# Lowest first. A module may import from its own layer (packages of one layer must stay acyclic) or any layer
# below; never from a layer above.
LAYERS: list[tuple[tuple[str, ...], str]] = [
    (("errors", "config", "quant"), "the error base, plain data and number formats (with their byte records): no "
                                    "model or kernel knowledge"),
    (("ops",), "kernels and their references: tensors in, tensors out; they read the quant records"),
    (("cache",), "rows and compressor state kept between steps, stored as quant's records: no model code"),
    (("model",), "single-device math over a cache it is handed; builds one through cache"),
    (("checkpoint", "generate", "train", "info"), "things done with a built model: load, run, train, count"),
    (("distributed", "serve"), "placement of a built model over several devices; serving many requests on one"),
    (("posttrain",), "SFT, RL and distillation of a built model, with rollouts on the serving engine"),
    (("cli", "__main__", ""), "the thin shell and the public API (`dsv4/__init__.py`, named '' here)"),
]
RANK = {part: rank for rank, (parts, _) in enumerate(LAYERS) for part in parts}


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under root (a package's name is its __init__'s)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _known(name: str, modules: dict[str, Path]) -> str:
    """The longest prefix of dotted `name` that is a module of the package (`a.b.attr` -> `a.b`)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    if not parts:
        raise AssertionError(f"{name!r} names no module under {ROOT}")
    return ".".join(parts)


def imports_of(name: str, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(module of the package, line) for every import in module `name`, wherever it sits in the file. `from X
    import y` counts as an import of X.y where that is a module, else of X."""
    tree = ast.parse(modules[name].read_text(), filename=str(modules[name]))
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(_known(a.name, modules), node.lineno) for a in node.names
                    if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source != PACKAGE and not source.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                out.append((full if full in modules else _known(source, modules), node.lineno))
    return [(target, line) for target, line in out if target != name]


def import_graph(root: Path) -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    """modules, and graph[a][b] = the first line where module a imports module b."""
    modules = module_files(root)
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for m in modules:
        for target, line in imports_of(m, modules):
            graph[m].setdefault(target, line)
    return modules, graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                found.append(sorted(scc))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> str:
    """'dsv4.cache.layout' -> 'cache'; 'dsv4' (the package's __init__) -> ''."""
    return module.split(".")[1] if "." in module else ""


@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT)


def test_every_module_has_a_layer(graph):
    modules, _ = graph
    assert sorted({layer_of(m) for m in modules} - set(RANK)) == [], \
        f"modules outside the layer table {[parts for parts, _ in LAYERS]}: add them where they belong"


def test_no_import_cycles(graph):
    _, g = graph
    found = cycles(g)
    assert not found, "import cycles:\n" + "\n".join(
        " <-> ".join(scc) + ": " + ", ".join(f"{a} imports {b} (line {g[a][b]})"
                                               for a in scc for b in scc if b in g[a]) for scc in found)


def test_no_import_cycles_between_top_level_packages(graph):
    """Modules can avoid a cycle while their packages still form one (model.transformer -> cache.kv_cache ->
    model.compressor): importing any module runs its package's __init__, so the packages must be acyclic too."""
    _, g = graph
    packages: dict[str, dict[str, int]] = {}
    for a, targets in g.items():
        for b in targets:
            if layer_of(a) != layer_of(b):
                packages.setdefault(layer_of(a), {})[layer_of(b)] = 0
                packages.setdefault(layer_of(b), {})
    found = cycles(packages)
    assert not found, "import cycles between packages: " + "; ".join(
        " <-> ".join(scc) + " (" + ", ".join(f"{a} imports {b}" for a, bs in sorted(g.items()) for b in bs
                                          if layer_of(a) in scc and layer_of(b) in scc and layer_of(a) != layer_of(b))
        + ")" for scc in found)


def test_no_import_goes_up_the_layers(graph):
    _, g = graph
    upward = [f"{a} (layer {layer_of(a)!r}) imports {b} (layer {layer_of(b)!r}) at line {line}"
              for a, targets in sorted(g.items()) for b, line in targets.items()
              if RANK.get(layer_of(b), -1) > RANK.get(layer_of(a), len(LAYERS))]
    assert not upward, "imports up the layer order:\n" + "\n".join(upward)


def _mentions_torch_distributed(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            lines += [node.lineno for a in node.names if a.name.startswith("torch.distributed")]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module.startswith("torch.distributed") or \
                    (node.module == "torch" and any(a.name == "distributed" for a in node.names)):
                lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "distributed" and \
                isinstance(node.value, ast.Name) and node.value.id == "torch":
            lines.append(node.lineno)  # torch.distributed used through a plain `import torch`
    return lines


def test_model_never_uses_torch_distributed(graph):
    modules, _ = graph
    found = [f"{m} line {line}" for m, path in modules.items() if layer_of(m) == "model"
             for line in _mentions_torch_distributed(ast.parse(path.read_text()))]
    assert not found, "model/ is single-device math; torch.distributed belongs in dsv4.distributed: " + \
        ", ".join(found)


def test_the_graph_reader_sees_lazy_and_relative_imports(tmp_path):
    """The reader itself: a function-level relative import, an absolute one, a cycle and an upward import."""
    pkg = tmp_path / PACKAGE
    for d in ("model", "cache"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "transformer.py").write_text("def new_cache():\n    from ..cache import kv_cache\n")
    (pkg / "cache" / "kv_cache.py").write_text("import torch\nfrom dsv4.model.transformer import new_cache\n")
    modules, g = import_graph(pkg)
    assert g["dsv4.model.transformer"] == {"dsv4.cache.kv_cache": 2}
    assert g["dsv4.cache.kv_cache"] == {"dsv4.model.transformer": 2}
    assert cycles(g) == [["dsv4.cache.kv_cache", "dsv4.model.transformer"]]
    assert _mentions_torch_distributed(ast.parse("import torch\ntorch.distributed.barrier()")) == [2]
