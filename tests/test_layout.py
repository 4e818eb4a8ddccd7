"""The package's layering, read from its import statements (module level and inside functions).

Data flows one way (README, "How it fits together"): raw files -> prepare -> batches -> model
-> checkpoint -> export -> serving. These tests keep the imports pointing the same way, so a
change to training cannot leak into serving and a model file stays free of distributed code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "twotower_rec"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(node: ast.AST) -> set[str]:
    """The modules (of this package and others) that the statements under ``node`` import;
    ``from a import b`` counts ``a.b`` when that is a module of this package."""
    found = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Import):
            found.update(alias.name for alias in child.names)
        elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
            found.add(child.module)
            found.update(f"{child.module}.{a.name}" for a in child.names if f"{child.module}.{a.name}" in MODULES)
    return found


def _tree(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text())


def _closure(roots: set[str]) -> set[str]:
    """Every module of this package reachable from ``roots`` through imports (packages on the
    way count: importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py``)."""
    seen, todo = set(), [r for r in roots if r in MODULES]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        todo += [m for m in (_imports(_tree(module)) | parents) if m in MODULES and m not in seen]
    return seen


def _stage(module: str) -> str:
    """``twotower_rec.train.trainer`` -> ``train``; the root package -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _function(module: str, name: str) -> ast.FunctionDef:
    return next(n for n in ast.walk(_tree(module)) if isinstance(n, ast.FunctionDef) and n.name == name)


def test_the_import_reader_sees_real_imports():
    """The checks below are only as good as this reader: it must find module-level and
    function-level imports, and follow them."""
    assert "twotower_rec.train.checkpoint" in _imports(_function("twotower_rec.cli", "cmd_evaluate"))
    assert "twotower_rec.train.trainer" in _imports(_function("twotower_rec.cli", "cmd_train"))
    assert "twotower_rec.distributed.sharding" in _closure({"twotower_rec.train.checkpoint"})
    assert "torchrec" in {m.split(".")[0] for m in _imports(_tree("twotower_rec.model.towers"))}


def test_serving_imports_neither_training_nor_torchrec():
    """A serving host needs the export, torch, numpy, pandas and faiss; nothing here may pull in
    training code or TorchRec (which serving hosts do not install)."""
    allowed = {"twotower_rec", "twotower_rec.errors", "twotower_rec.atomic", "twotower_rec.data",
               "twotower_rec.data.features",
               "twotower_rec.data.sequences", "twotower_rec.evaluation", "twotower_rec.evaluation.topk"}
    serving = {m for m in MODULES if m.startswith("twotower_rec.serving")}
    reached = _closure(serving)
    assert reached - serving <= allowed, sorted(reached - serving - allowed)
    # twotower_rec/__init__.py's versions() imports torchrec when a checkpoint or export is written
    third_party = {m.split(".")[0] for module in reached - {"twotower_rec"} for m in _imports(_tree(module))}
    assert not third_party & {"torchrec", "fbgemm_gpu", "torchmetrics"}, third_party


@pytest.mark.parametrize("verb", ["cmd_evaluate", "cmd_export", "cmd_recommend", "cmd_serve"])
def test_evaluate_export_and_serve_use_nothing_of_training_but_checkpoint_loading(verb):
    reached = _closure(_imports(_function("twotower_rec.cli", verb)))
    training = {m for m in reached if m.startswith("twotower_rec.train.")}
    assert training <= {"twotower_rec.train.checkpoint"}, sorted(training)


def test_model_files_hold_no_distributed_or_training_code():
    """Model files build tables on meta; only the factory hands a model to the sharder."""
    for module in (m for m in MODULES if m.startswith("twotower_rec.model.") and m != "twotower_rec.model.factory"):
        reached = _closure({module})
        banned = {m for m in reached if _stage(m) in ("distributed", "train", "losses", "evaluation", "export",
                                                       "serving")}
        assert not banned, (module, sorted(banned))


def test_data_does_not_import_later_stages():
    for module in (m for m in MODULES if m.startswith("twotower_rec.data")):
        later = {m for m in _closure({module}) if _stage(m) in (
            "model", "train", "losses", "evaluation", "export", "serving", "distributed")}
        assert not later, (module, sorted(later))


def test_user_facing_errors_are_defined_in_one_module():
    defined = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                defined.setdefault(node.name, []).append(module)
    for name, modules in defined.items():
        assert len(modules) == 1, (name, modules)
    outside = {name for name, modules in defined.items() if modules != ["twotower_rec.errors"]}
    assert outside <= {"RequestError"}, outside  # the HTTP server's status-carrying exception
