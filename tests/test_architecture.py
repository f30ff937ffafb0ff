"""The house rules: one import namespace, imports that run one way, self-contained step bodies."""

import ast
import builtins
import shutil
import subprocess
import symtable
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
#: Layers, bottom up: a module may import from its own layer and those below, never above.
LAYERS = [
    ("core", ("fineserve", "fineserve.core")),
    ("serving", ("fineserve.serving",)),
    ("components", ("fineserve.components",)),
    ("pipelines", ("fineserve.pipelines",)),
    ("cli", ("fineserve.cli", "fineserve.__main__")),
]
#: Modules of the steps: no step imports another step's module.
STEP_MODULES = {
    f"fineserve.components.{name}"
    for name in (
        "download",
        "tokenization",
        "training",
        "evaluation",
        "registration",
        "gate",
        "deploy",
        "canary_analysis",
    )
}
BARE_NAMES = ("components", "pipelines", "serving")


def package_dirs(root: Path) -> dict[str, Path]:
    """Each package of the distribution → its folder, as pyproject.toml maps them."""
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = config["package-dir"]
    folders = {}
    for package in config["packages"]:
        base = max((p for p in mapped if package == p or package.startswith(p + ".")), key=len)
        rest = package[len(base) :].lstrip(".").replace(".", "/")
        folders[package] = root / mapped[base] / rest
    return folders


def modules(root: Path) -> dict[str, Path]:
    """Every module of the distribution, by import name."""
    found = {}
    for package, folder in package_dirs(root).items():
        for path in folder.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def layer_of(module: str) -> int:
    """The index in LAYERS of the most specific layer that holds ``module``."""
    best, depth = 0, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > depth:
                best, depth = index, len(prefix)
    return best


def imported_names(path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, function-local ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from fineserve.components import download` imports the module `download`
            submodules = [f"{node.module}.{a.name}" for a in node.names]
            submodules = [name for name in submodules if name in known]
            found += [(node.lineno, name) for name in submodules or [node.module]]
    return found


def import_violations(root: Path) -> list[str]:
    """Every import that runs upward, crosses between steps, or uses a bare top-level name."""
    known = modules(root)
    problems = []
    for module, path in sorted(known.items()):
        for line, name in imported_names(path, set(known)):
            where = f"{path.relative_to(root)}:{line}"
            if name.split(".")[0] in BARE_NAMES:
                problems.append(f"{where}: imports {name!r}; use fineserve.{name}")
            if name not in known:
                continue
            if layer_of(name) > layer_of(module):
                problems.append(
                    f"{where}: {module} ({LAYERS[layer_of(module)][0]}) imports {name} "
                    f"({LAYERS[layer_of(name)][0]}), a layer above it"
                )
            if module in STEP_MODULES and name in STEP_MODULES and name != module:
                problems.append(f"{where}: step {module} imports another step's module {name}")
    return problems


def test_imports_run_one_way():
    assert import_violations(ROOT) == []


@pytest.mark.parametrize(
    ("file", "planted", "expected"),
    [
        ("fineserve/core/artifacts.py", "from fineserve.serving import engine", "a layer above"),
        ("serving/engine.py", "import fineserve.components.decorator", "a layer above"),
        ("components/evaluation.py", "from fineserve.pipelines import parameters", "above"),
        ("pipelines/parameters.py", "from fineserve.cli import main", "a layer above"),
        ("components/registration.py", "from fineserve.components import training", "step"),
        ("serving/batcher.py", "from components.download import download", "use fineserve."),
    ],
)
def test_a_planted_bad_import_is_caught(tmp_path, file, planted, expected):
    copy = tmp_path / "tree"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "local_outputs"))
    target = copy / file
    target.write_text(target.read_text() + f"\n\ndef planted():\n    {planted}\n")
    problems = import_violations(copy)
    assert len(problems) == 1 and expected in problems[0], problems
    assert problems[0].startswith(f"{file}:")


def test_the_distribution_installs_only_the_fineserve_namespace(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("fineserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"fineserve"}
    for module in ("components/download.py", "pipelines/training_pipeline.py", "core/registry.py"):
        assert f"fineserve/{module}" in names
    assert "fineserve/serving/__main__.py" in names  # the image's ENTRYPOINT module

    # installed (not editable), away from the source tree: the ENTRYPOINT module starts
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
        + [str(wheel)],
        check=True,
        capture_output=True,
    )
    probe = (
        "import runpy, sys, fineserve.serving.entrypoint as e; print(e.__file__); "
        "sys.argv = ['x', '--help']; runpy.run_module('fineserve.serving', run_name='__main__')"
    )
    shown = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(str(target))
    assert "--model_dir" in shown.stdout


@pytest.fixture(scope="module")
def step_sources(tmp_path_factory) -> dict[str, str]:
    """The Python source KFP inlines for each step in the compiled pipeline."""
    out = tmp_path_factory.mktemp("ir") / "training.yaml"
    subprocess.run(
        [sys.executable, "-m", "fineserve", "compile", "-o", str(out)], check=True, timeout=120
    )
    executors = yaml.safe_load(out.read_text())["deploymentSpec"]["executors"]
    return {name: spec["container"]["command"][-1] for name, spec in executors.items()}


def test_step_bodies_import_only_the_fineserve_namespace(step_sources):
    for executor, source in step_sources.items():
        tree = ast.parse(source)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in BARE_NAMES, f"{executor} imports {name}"


def _unresolved_globals(source: str) -> set[str]:
    """Names a step's code reads as globals that its inlined module does not define."""
    namespace: dict = {}
    exec(compile(source, "ephemeral_component.py", "exec"), namespace)
    missing = set()
    tables = list(symtable.symtable(source, "ephemeral_component.py", "exec").get_children())
    while tables:
        table = tables.pop()
        tables += table.get_children()
        for symbol in table.get_symbols():
            if symbol.is_global() and symbol.is_referenced():
                name = symbol.get_name()
                if name not in namespace and not hasattr(builtins, name):
                    missing.add(name)
    return missing


def test_step_bodies_are_self_contained(step_sources):
    """KFP runs only the function's own source: a module-level name it uses is a NameError."""
    assert {name: _unresolved_globals(src) for name, src in step_sources.items()} == {
        name: set() for name in step_sources
    }


def test_a_body_that_leans_on_its_module_is_caught():
    source = "from kfp.dsl import *\n\ndef step(model: Output[Model]):\n    Path(model.path)\n"
    assert _unresolved_globals(source) == {"Path"}
