"""dsv4.ops is the only seam between the model and its math: model code reaches the ops through their public
names, never through a backend, the dispatcher or a reference helper."""
import ast
import pathlib

import dsv4.ops

MODEL = pathlib.Path(dsv4.__file__).parent / "model"


def _absolute(module: str | None, level: int, package: str) -> str:
    """The absolute module of an `import` / `from ... import` in `package` (dsv4.model)."""
    if not level:
        return module or ""
    base = package.rsplit(".", level - 1)[0] if level > 1 else package
    return f"{base}.{module}" if module else base


def _violations(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    public = set(dsv4.ops.__all__)
    found, ops_names = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("dsv4.ops"):
                    found.append(f"line {node.lineno}: import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node.module, node.level, "dsv4.model")
            for a in node.names:
                if module == "dsv4" and a.name == "ops":
                    ops_names.add(a.asname or "ops")
                elif module == "dsv4.ops" and a.name in public:
                    continue
                elif module.startswith("dsv4.ops"):
                    found.append(f"line {node.lineno}: from {module} import {a.name}")
    for node in ast.walk(tree):  # ops.<name>: a public op or mode
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ops_names:
            if node.attr not in public:
                found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_model_code_uses_only_the_public_ops():
    files = sorted(MODEL.glob("*.py"))
    assert len(files) > 5
    bad = {p.name: v for p in files if (v := _violations(p))}
    assert not bad, f"model code reaching past dsv4.ops' public names: {bad}"


def test_the_check_sees_private_paths(tmp_path):
    """The check itself: each way of reaching past the public names is reported."""
    probe = tmp_path / "probe.py"
    probe.write_text("from .. import ops\nfrom ..ops.reference.rope import cos_sin\nfrom ..ops import dispatch\n"
                     "import dsv4.ops.triton\nfrom ..ops import rms_norm\ny = ops.rms_norm\nz = ops.dispatch\n")
    assert [v.split(":")[0] for v in _violations(probe)] == ["line 2", "line 3", "line 4", "line 7"]
