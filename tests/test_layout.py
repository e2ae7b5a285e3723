"""The package's data flow goes one way (ir -> analysis -> passes -> plan -> backends -> api / cli): checked on
the import statements themselves, those inside functions included."""

from __future__ import annotations

import ast
import pathlib

import graphprune

ROOT = pathlib.Path(graphprune.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """graphprune module -> the graphprune modules it imports (anywhere in the file)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    found: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", "") == "TYPE_CHECKING" for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # annotations only, never run
                continue
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")
                if node.level:
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:  # `from . import rules` names a module
                    candidate = f"{target}.{alias.name}"
                    targets.add(candidate if candidate in modules else target)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        found[name] = {t for t in targets if t in modules and t != name}
    return found


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, stack = set(), [start]
    while stack:
        for nxt in graph.get(stack.pop(), ()):
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return False


def test_layers_import_only_layers_before_them():
    imports = _imports()
    # the plan is data: passes build it, backends read it
    order = ["graphprune.ir", "graphprune.analysis", "graphprune.plan", "graphprune.passes", "graphprune.backends"]
    for name, targets in imports.items():
        layer = next((i for i, prefix in enumerate(order) if name == prefix or name.startswith(prefix + ".")), None)
        if layer is None:
            continue
        for target in targets:
            later = next((i for i, prefix in enumerate(order) if target.startswith(prefix)), -1)
            assert later <= layer, f"{name} imports {target}, a later stage"


def test_rules_do_not_import_the_engine_that_calls_them():
    imports = _imports()
    for name, targets in imports.items():
        if name.startswith("graphprune.analysis.rules"):
            assert "graphprune.analysis.channels" not in targets, name


def test_no_import_cycles_between_modules():
    # a package importing its own modules is a registry filling itself (analysis/rules), not a dependency
    imports = {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in _imports().items()}
    for name, targets in imports.items():
        for target in targets:
            if not name.startswith(target + "."):
                assert not _reaches(imports, target, name), f"{name} -> {target} -> ... -> {name}"
