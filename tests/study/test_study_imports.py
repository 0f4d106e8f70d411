"""The study's modules import one way (each only from those above it in ORDER), at their top, with no sys.path
edits; nothing else in hycam imports the study."""

import ast
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.fast  # a second: the structure is checked with every quick edit

STUDY = REPO / "hycam" / "study"
ORDER = ["methods", "runs", "layout", "settings", "checkout", "base_model", "commands", "sweep", "study", "plan",
         "paired", "flattening", "claims", "report", "__main__"]
"""The study's modules, each importing only modules before it."""


def imported(tree: ast.Module) -> set[str]:
    """Every module an import statement anywhere in `tree` names, `from a import b` as both a and a.b."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def study_imports(file: Path) -> set[str]:
    """The modules of hycam.study that `file` imports (a flat package: the first name after `hycam.study.`)."""
    prefix = "hycam.study."
    return {name[len(prefix):].split(".")[0] for name in imported(ast.parse(file.read_text()))
            if name.startswith(prefix)}


def test_every_module_of_the_study_is_in_the_order():
    assert sorted(file.stem for file in STUDY.glob("*.py") if file.stem != "__init__") == sorted(ORDER)


def test_each_module_imports_only_modules_above_it():
    for position, name in enumerate(ORDER):
        later = study_imports(STUDY / f"{name}.py") - set(ORDER[:position])
        assert not later, f"hycam/study/{name}.py imports {sorted(later)}, which are not above it in ORDER"


def test_the_package_init_imports_nothing():
    """Importing any module of the study runs hycam/study/__init__.py first: an import there would loop back."""
    assert imported(ast.parse((STUDY / "__init__.py").read_text())) == set()


def test_imports_sit_at_the_top_of_each_module():
    """No import inside a function or class: none can hide a cycle or a late dependency."""
    for file in STUDY.glob("*.py"):
        tree = ast.parse(file.read_text())
        nested = [node.lineno for outer in ast.walk(tree) if isinstance(outer, (ast.FunctionDef, ast.ClassDef))
                  for node in ast.walk(outer) if isinstance(node, (ast.Import, ast.ImportFrom))]
        assert nested == [], f"{file.name}: imports inside a function or class at lines {nested}"


def test_no_sys_path_edits_in_the_study_or_the_scripts():
    for file in [*STUDY.glob("*.py"), *(REPO / "scripts").glob("*.py")]:
        tree = ast.parse(file.read_text())
        edits = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "path"
                 and isinstance(node.value, ast.Name) and node.value.id == "sys"]
        assert edits == [], f"{file.relative_to(REPO)} touches sys.path at lines {edits}"


def test_nothing_else_in_hycam_imports_the_study():
    outside = [file for file in (REPO / "hycam").rglob("*.py") if STUDY not in file.parents]
    users = [file.relative_to(REPO) for file in outside if any(
        name == "hycam.study" or name.startswith("hycam.study.") for name in imported(ast.parse(file.read_text())))]
    assert users == []
