"""The code's shape, as the developers' guide states it: layers, sizes, and the imports of pegasus_dist/.

- the wings import one way (pyproject's import-linter contract);
- no module over 400 lines and no function over 60;
- no import of a dependency's private modules;
- every third-party import is declared in pyproject's [project] dependencies.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from processes import REPO, run_bounded

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PACKAGE = REPO / "pegasus_dist"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# Private modules that do not start with "_": W&B's record format (wandb.proto.*), not its API.
PRIVATE_MODULES = ("wandb.proto",)


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names imported from it) of each absolute import of ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


def third_party(module: str) -> bool:
    top = module.split(".")[0]
    return top not in sys.stdlib_module_names and top not in ("pegasus_dist", "__future__")


def test_the_wings_import_one_way():
    # `lint-imports --no-cache` in this process, on the pegasus_dist that tests import. Not through
    # importlinter.cli.lint_imports, which would first reset logging (dictConfig), silencing every
    # logger that later tests read with caplog.
    import importlinter.cli  # noqa: F401 - configures import-linter's adapters
    from importlinter.application.use_cases import lint_imports

    assert lint_imports(config_filename=str(REPO / "pyproject.toml"), cache_dir=None, no_logo=True), \
        "an import runs against the layers of pyproject's [tool.importlinter] (output above)"


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in modules()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_over_60_lines():
    long = {}
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # from `def` to its last line, docstring included
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(REPO)}:{node.lineno} {node.name}"] = lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_private_module_of_a_dependency_is_imported():
    private = []
    for path in modules():
        for line, module, names in imports(path):
            if not third_party(module):
                continue
            parts = [*module.split("."), *names]
            if any(p.startswith("_") for p in parts) or module.startswith(PRIVATE_MODULES):
                private.append(f"{path.relative_to(REPO)}:{line} {module} {names or ''}".strip())
    assert not private, f"imports of a dependency's private modules or names: {private}"


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {_normal(Requirement(spec).name) for spec in project["dependencies"]}


def test_every_third_party_import_is_a_declared_dependency():
    # Import names to the distributions that install them (PIL: pillow, yaml: pyyaml, ...),
    # as the installed packages' metadata says.
    providers = importlib.metadata.packages_distributions()
    undeclared = {}
    for path in modules():
        for line, module, _ in imports(path):
            top = module.split(".")[0]
            if not third_party(module):
                continue
            dists = {_normal(d) for d in providers.get(top, [top])}
            if not dists & declared():
                undeclared.setdefault(f"{top} ({', '.join(sorted(dists))})", []).append(
                    f"{path.relative_to(REPO)}:{line}")
    assert not undeclared, f"imported but not in pyproject's [project] dependencies: {undeclared}"


def test_the_checks_see_what_they_check():
    """The walk finds the package's modules and imports, and the rules catch what they name."""
    assert len(modules()) > 20 and PACKAGE / "training" / "loop.py" in modules()
    found = {module for path in modules() for _, module, _ in imports(path)}
    assert {"torch", "accelerate", "PIL", "yaml", "pegasus_dist.config"} <= found
    assert "PIL" not in declared() and "pillow" in declared() and "pyyaml" in declared()
    assert not third_party("os.path") and not third_party("pegasus_dist.data") and third_party("PIL.Image")


@pytest.mark.process
def test_a_rank_starts_without_importing_torchvision_or_wandb():
    """torchvision's import brings torch._dynamo: 2 s of a command's start-up on 2 cores (the training
    loop's imports: 4.7 s with it, 2.7 s without; a training rank loads torch._dynamo later all the
    same, when torch's Optimizer takes its parameters). Only the grids' PNGs and the official
    archives' md5 use it, and import it where they do. wandb (0.5 s) is imported by the process that
    starts a W&B run, not by the other ranks or a run with W&B off. The CLI loads torch only in a
    command that needs it: `pegasus-dist --help` answered in 3.2 s with it, 0.5-0.8 s without."""
    code = ("import sys\n"
            "def heavy(): return sorted(m for m in sys.modules if m in ('torch', 'torchvision', "
            "'torch._dynamo', 'wandb'))\n"
            "import pegasus_dist.cli\n"
            "print(heavy())\n"
            "import pegasus_dist.training.loop\n"
            "print(heavy())\n"
            "import torchvision.utils\n"
            "print(heavy())\n")  # what the check would have seen before
    done = run_bounded([sys.executable, "-c", code], timeout=120)
    assert done.stdout.splitlines() == ["[]", "['torch']", "['torch', 'torch._dynamo', 'torchvision']"], \
        done.stdout[-3000:]
