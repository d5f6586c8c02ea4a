"""Arrows point down: every `ftray` import (module level or inside a function) goes to the importer's
own layer or a lower one (docs/architecture.md: cli → train/tune/serve → methods → models/data →
storage/config). Read from the source with `ast`; nothing is imported."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "ftray"

# Module prefix → layer; the longest prefix that matches a module wins. A module may import its own layer
# or a lower one. A new package or top-level module must be placed here (the test says so).
LAYERS = {
    # Paths, on-disk formats and specs; metrics that are pure functions of numbers (no model, no Ray).
    "ftray.storage": 0,
    "ftray.yamlspec": 0,
    "ftray.config": 0,
    "ftray.runs": 0,  # the run-folder contract: models.load resolves run folders through it
    "ftray.metrics": 0,
    "ftray.progress": 0,  # the one "is this a terminal" decision behind every phase's progress bar
    # models below data: data tokenizes with the tokenizer models/ loads (and its chat template).
    "ftray.models": 1,
    "ftray.data": 2,
    # The verifiable rewards of rollouts: pure functions the feedback methods call.
    "ftray.rlhf": 3,
    "ftray.methods": 4,
    # The Ray layer, ordered within: serve loads what train wrote without importing train; train's driver
    # deploys the reward app (rlhf.served → serve); tune drives train; `ftray eval` runs a method's
    # evaluation on a finished run (and shares the loop's, issue 19 item 7).
    "ftray.serve": 5,
    "ftray.rlhf.served": 5,  # a Ray Serve client and deployer: Serve's layer, not the methods'
    "ftray.train": 6,
    "ftray.tune": 7,
    "ftray.eval": 7,
    "ftray.cli": 8,
    "ftray.__main__": 8,
}

# Upward arrows that are still there, each with what removes it. The test fails when one is gone too,
# so that this set only shrinks.
KNOWN: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PKG.parent / rel).with_suffix(".py").exists() or (PKG.parent / rel / "__init__.py").exists()


def imports(module: str, source: str, is_package: bool = False) -> list[tuple[str, int]]:
    """(imported ftray module, line) for every import statement in `source`, wherever it stands."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "ftray"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: against this module's package
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "ftray":
                continue
            for a in node.names:  # `from ftray import storage` imports the module ftray.storage
                sub = f"{base}.{a.name}"
                out.append((sub if _is_module(sub) else base, node.lineno))
    return list(dict.fromkeys(out))  # `from m import a, b` is one arrow


def layer(module: str) -> int | None:
    keys = [k for k in LAYERS if module == k or module.startswith(k + ".")]
    return LAYERS[max(keys, key=len)] if keys else None


def upward(module: str, source: str, is_package: bool = False) -> list[tuple[str, str, int]]:
    """(importer, imported, line) for each import that points to a higher layer."""
    mine = layer(module)
    return [
        (module, target, line)
        for target, line in imports(module, source, is_package)
        if target != "ftray" and layer(target) is not None and layer(target) > mine
    ]


def _sources():
    for path in sorted(PKG.rglob("*.py")):
        yield path, module_name(path)


@functools.cache
def _all_upward() -> dict[tuple[str, str], list[str]]:
    found: dict[tuple[str, str], list[str]] = {}
    for path, mod in _sources():
        if mod == "ftray":
            continue
        for a, b, line in upward(mod, path.read_text(encoding="utf-8"), path.name == "__init__.py"):
            found.setdefault((a, b), []).append(f"{path.relative_to(PKG.parent)}:{line}")
    return found


def test_every_module_has_a_layer():
    missing = [mod for _, mod in _sources() if mod != "ftray" and layer(mod) is None]
    assert not missing, f"place these in tests/test_layers.py LAYERS: {missing}"


def test_imports_point_down():
    found = _all_upward()
    bad = [
        f"{where}: {a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
        for (a, b), wheres in sorted(found.items())
        if (a, b) not in KNOWN
        for where in wheres
    ]
    assert not bad, "imports that point up the layers:\n" + "\n".join(bad)


def test_known_upward_imports_are_still_there():
    gone = sorted(KNOWN - set(_all_upward()))
    assert not gone, f"fixed: remove {gone} from KNOWN in tests/test_layers.py"


@pytest.mark.parametrize(
    "module, source, expected",
    [
        ("ftray.models.tiny", "def f():\n    from ftray.data.encode import IGNORE\n", [("ftray.data.encode", 2)]),
        ("ftray.methods.x", "import ftray.eval.evaluate as e\n", [("ftray.eval.evaluate", 1)]),
        ("ftray.methods.x", "from ftray import cli\n", [("ftray.cli", 1)]),
        ("ftray.data.x", "from ..train import loop\n", [("ftray.train.loop", 1)]),
        ("ftray.train.x", "from ftray import storage\nfrom ftray.methods import get_method\n", []),
    ],
)
def test_checker_finds_upward_imports(module, source, expected):
    assert [(b, line) for _, b, line in upward(module, source)] == expected
