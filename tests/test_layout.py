"""The package's shape: no import cycle (lazy imports included), nothing importable under a
top-level name other than ``hyperpass``, ``import hyperpass`` light, no path hacks."""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hyperpass"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: pathlib.Path, name: str, modules) -> set[str]:
    """hyperpass modules a module imports anywhere (top level or inside a function), each edge
    to the most specific module named (``from a.b import c``: a.b.c if it is a module)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]  # fmt: skip
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(name, stack):
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*stack, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_leaves_never_import_the_layers_above():
    """reference never imports the op, kernels or the compiler; kernels never the op or the
    compiler; the op never the compiler or the integrations; the compiler never the kernels."""
    forbidden = {
        "hyperpass.reference": ("hyperpass.op", "hyperpass.kernels", "hyperpass.compiler"),
        "hyperpass.kernels": ("hyperpass.op", "hyperpass.compiler", "hyperpass.integrations"),
        "hyperpass.op": ("hyperpass.compiler", "hyperpass.integrations"),
        "hyperpass.compiler": ("hyperpass.kernels", "hyperpass.integrations"),
        "hyperpass.config": ("hyperpass.",),
    }
    modules = _modules()
    for name, path in modules.items():
        for layer, banned in forbidden.items():
            if name == layer or name.startswith(layer + "."):
                bad = [d for d in _imports(path, name, modules) if d.startswith(banned)]
                assert not bad, f"{name} imports {bad}"


def test_every_module_imports_and_hyperpass_alone_is_light():
    names = sorted(n for n in _modules() if not n.endswith(("tensorrt", "exporter")))
    code = (
        "import sys, importlib\n"
        "import hyperpass\n"
        "assert 'hyperpass.kernels' not in sys.modules, 'import hyperpass imported the kernels'\n"
        "assert 'hyperpass.compiler.backend' not in sys.modules\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_only_hyperpass_is_a_top_level_name():
    """transformers imports whatever top-level ``kernels`` it finds (Hugging Face's kernel hub):
    no part of hyperpass may be importable under another name, from a checkout either."""
    for name in ("kernels", "reference", "compiler", "integrations", "op"):
        spec = importlib.util.find_spec(name)
        origin = pathlib.Path(spec.origin).resolve() if spec and spec.origin else None
        installed = origin is not None and "site-packages" in origin.parts  # a venv in the checkout
        assert origin is None or installed or ROOT not in origin.parents, (
            f"{name} importable from {origin}"
        )


def test_no_path_hacks():
    # ``hyperpass run`` puts the user's script folder first, as ``python script.py`` does
    allowed = {PACKAGE / "integrations" / "cli.py"}
    for folder in ("hyperpass", "benchmarks", "tools"):
        for path in set((ROOT / folder).rglob("*.py")) - allowed:
            text = path.read_text()
            assert "sys.path.insert" not in text and "__path__.append" not in text, path
