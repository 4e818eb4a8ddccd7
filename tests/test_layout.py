"""The package's layering, read from its import statements (module level and inside functions).

Data flows one way (docs/architecture.md, "How it fits together"): raw files -> prepare ->
batches -> model -> checkpoint -> export -> serving. These tests keep the imports pointing the
same way, so a change to training cannot leak into serving and a model file stays free of
distributed code.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "twotower_rec"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _runs(node: ast.AST) -> list[ast.AST]:
    """The nodes under ``node`` that run: without ``if TYPE_CHECKING:`` blocks (imports for type
    hints only) and the package's lazy ``__getattr__`` (it imports the API when a user asks for
    one of its names, never on import)."""
    out, todo = [], [node]
    while todo:
        current = todo.pop()
        if isinstance(current, ast.If) and isinstance(current.test, ast.Name) and current.test.id == "TYPE_CHECKING":
            todo += current.orelse
            continue
        if isinstance(current, ast.FunctionDef) and current.name == "__getattr__":
            continue
        out.append(current)
        todo += list(ast.iter_child_nodes(current))
    return out


def _imports(node: ast.AST) -> set[str]:
    """The modules (of this package and others) that the statements under ``node`` import when
    they run; ``from a import b`` counts ``a.b`` when that is a module of this package."""
    found = set()
    for child in _runs(node):
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
    function-level imports, follow them, and leave out type-checking-only imports."""
    assert "twotower_rec.train.checkpoint" in _imports(_function("twotower_rec.api", "_load"))
    assert "twotower_rec.train.trainer" in _imports(_function("twotower_rec.api", "train"))
    assert "twotower_rec.distributed.sharding" in _closure({"twotower_rec.train.checkpoint"})
    assert "torchrec" in {m.split(".")[0] for m in _imports(_tree("twotower_rec.model.towers"))}
    assert "twotower_rec.config" not in _imports(_tree("twotower_rec.model.two_tower"))  # under TYPE_CHECKING
    assert "twotower_rec.api" not in _imports(_tree("twotower_rec"))  # the lazy __getattr__


def test_serving_imports_neither_training_nor_torchrec():
    """A serving host needs the export, torch, numpy, pandas and faiss; nothing here may pull in
    training code or TorchRec (which serving hosts do not install)."""
    allowed = {"twotower_rec", "twotower_rec.errors", "twotower_rec.atomic", "twotower_rec.data",
               "twotower_rec.data.features", "twotower_rec.data.ids",  # ids: re and numpy only
               "twotower_rec.data.query_inputs", "twotower_rec.evaluation", "twotower_rec.evaluation.topk"}
    serving = {m for m in MODULES if m.startswith("twotower_rec.serving")}
    reached = _closure(serving)
    assert reached - serving <= allowed, sorted(reached - serving - allowed)
    # twotower_rec/__init__.py's versions() imports torchrec when a checkpoint or export is written
    third_party = {m.split(".")[0] for module in reached - {"twotower_rec"} for m in _imports(_tree(module))}
    assert not third_party & {"torchrec", "fbgemm_gpu", "torchmetrics"}, third_party


def _module_imports(module: str) -> set[str]:
    """What ``module`` imports at module level (not inside its functions)."""
    found = set()
    for statement in _tree(module).body:
        if isinstance(statement, (ast.Import, ast.ImportFrom, ast.If)):
            found |= _imports(ast.Module(body=[statement], type_ignores=[]))
    return found


@pytest.mark.parametrize("where", [("twotower_rec.api", ("evaluate", "_load")),
                                   ("twotower_rec.api", ("export", "_load")),
                                   ("twotower_rec.cli", ("cmd_recommend",)), ("twotower_rec.cli", ("cmd_serve",))])
def test_evaluate_export_and_serve_use_nothing_of_training_but_checkpoint_loading(where):
    module, functions = where
    roots = _module_imports(module).union(*(_imports(_function(module, f)) for f in functions))
    training = {m for m in _closure(roots) if m.startswith("twotower_rec.train.")}
    # checkpoint loading: checkpoint.py and the file checksums and data fingerprint it checks
    assert training <= {"twotower_rec.train.checkpoint", "twotower_rec.train.integrity"}, sorted(training)


def test_the_cli_only_parses_calls_and_prints():
    """Verb logic lives in the Python API; the CLI reaches the package through it, the config
    and the serving and download code alone (and the thread policy, which must run before torch loads)."""
    allowed = {"twotower_rec.api", "twotower_rec.config", "twotower_rec.errors", "twotower_rec.serving.exported",
               "twotower_rec.serving.http_server", "twotower_rec.data.download", "twotower_rec.distributed.threads"}
    own = {m for m in _imports(_tree("twotower_rec.cli")) if m.startswith("twotower_rec.")}
    assert own <= allowed, sorted(own - allowed)


def test_model_files_hold_no_distributed_or_training_code():
    """Model files build tables on meta; only the factory hands a model to the sharder."""
    for module in (m for m in MODULES if m.startswith("twotower_rec.model.") and m != "twotower_rec.model.factory"):
        reached = _closure({module})
        banned = {m for m in reached if _stage(m) in ("distributed", "train", "losses", "evaluation", "export",
                                                       "serving")}
        assert not banned, (module, sorted(banned))


def test_model_files_import_nothing_of_the_data_layer_but_the_feature_spec():
    """The model takes its batches as they come (duck-typed) and re-keys KJTs itself
    (``model/kjt.py``): of the data layer only the feature spec crosses into it."""
    for module in (m for m in MODULES if m.startswith("twotower_rec.model.")):
        data = {m for m in _imports(_tree(module)) if m.startswith("twotower_rec.data")}
        assert data <= {"twotower_rec.data.features"}, (module, sorted(data))


_TASK_NAMES = {"retrieval", "pointwise", "next_item", "bpr"}


def _mode_branches(module: str, tree: ast.AST | None = None) -> list[str]:
    """Comparisons of the config's ``task`` (or a task's name) and ``isinstance`` tests on a
    batch class in ``module``: the branches on the training mode that only tasks/ may hold."""
    found = []
    for node in _runs(tree or _tree(module)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr in ("task", "examples") for s in sides) or any(
                    isinstance(s, ast.Constant) and s.value in _TASK_NAMES | {"in_batch_softmax", "sequences"}
                    for s in sides):
                found.append(f"{module}:{node.lineno}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance"
                and len(node.args) == 2 and re.search(r"Batch\b", ast.unparse(node.args[1]))):
            found.append(f"{module}:{node.lineno}")
    return found


def test_no_module_but_the_tasks_and_the_config_branches_on_the_training_mode():
    outside = [m for m in MODULES if not m.startswith("twotower_rec.tasks") and m != "twotower_rec.config"]
    assert not [line for m in outside for line in _mode_branches(m)]
    # the reader sees such branches where there are some
    sample = ast.parse('if cfg.task == "pointwise":\n    pass\nif isinstance(batch, WindowBatch):\n    pass\n'
                       'x = loss.name != "in_batch_softmax"\n')
    assert len(_mode_branches("sample", sample)) == 3


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


def _undocumented_arguments() -> list[str]:
    """Public functions and methods of the package that take arguments but whose docstring has
    no ``Args:`` section. Exempt: ``forward`` (its shapes are in the class docstring), the CLI's
    argparse plumbing, a dataclass's generated ``__init__``, and a method overriding one its base
    class documents with ``Args:``."""
    import importlib
    import inspect

    missing = []
    for module_name in sorted(MODULES):
        if module_name == "twotower_rec.cli" or module_name.endswith("__main__"):
            continue
        module = importlib.import_module(module_name)
        functions = [(None, f) for f in vars(module).values()
                     if inspect.isfunction(f) and f.__module__ == module_name]
        for cls in (c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == module_name):
            if not cls.__name__.startswith("_"):
                functions += [(cls, f) for name, f in vars(cls).items() if inspect.isfunction(f)
                              or isinstance(f, (classmethod, staticmethod))]
        for cls, f in functions:
            f = getattr(f, "__func__", f)
            name = f.__name__
            if (name.startswith("_") and name != "__init__") or name == "forward":
                continue
            parameters = [p for p in inspect.signature(f).parameters if p not in ("self", "cls")]
            if not parameters or "Args:" in (inspect.getdoc(f) or ""):
                continue
            if name == "__init__" and f.__code__.co_filename == "<string>":
                continue  # a dataclass's own: its fields are documented where they are declared
            inherited = cls is not None and any("Args:" in (getattr(getattr(base, name, None), "__doc__", "") or "")
                                                for base in cls.__mro__[1:])
            if not inherited:
                missing.append(f"{module_name}.{cls.__name__ + '.' if cls else ''}{name}")
    return missing


def test_public_functions_document_their_arguments():
    assert not _undocumented_arguments()
