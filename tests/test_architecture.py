"""The house rules of ARCHITECTURE.md, checked: the library does not import the command line, and imports
point one way (latentmill -> curate, filters, train; filters -> curate; train -> curate)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the packages' folders and what each may import of latentmill (besides the foundations below)
MAY_IMPORT = {
    "curate": {"latentmill.curate"},
    "filters": {"latentmill.curate", "latentmill.filters"},
    "train": {"latentmill.curate", "latentmill.train"},
}
# modules that import nothing of latentmill's packages, so every package may use them
FOUNDATIONS = {"latentmill.errors", "latentmill.schema", "latentmill.devices"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, those inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_library_packages_import_only_downstream(package):
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in _imports(path):
            if module == "click" or module.startswith("click."):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports click")
            if not module.startswith("latentmill") or module in FOUNDATIONS:
                continue
            if not any(module == ok or module.startswith(ok + ".") for ok in MAY_IMPORT[package]):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_foundations_import_nothing_of_the_packages():
    for module in FOUNDATIONS:
        path = ROOT / "latentmill" / (module.split(".")[-1] + ".py")
        imported = [m for _, m in _imports(path) if m.startswith("latentmill")]
        assert set(imported) <= FOUNDATIONS, f"{path.name} imports {imported}"


def test_stage_modules_load_without_click():
    code = (
        "import sys\n"
        "import latentmill.curate.encode, latentmill.filters.score, latentmill.train.loop\n"
        "print('click' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_every_file_the_docs_and_docstrings_cite_exists():
    """README.md, ARCHITECTURE.md and the code name files of the repository (`curate/encode.py`,
    `ARCHITECTURE.md`): each must exist."""
    import re

    cited = re.compile(
        r"(?<![\w./-])((?:latentmill|curate|filters|train|tests|bench|recipes)/[\w/.-]+\.(?:py|yaml|md)|[A-Z]+\.md)"
    )
    sources = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", ROOT / "BENCHMARKS.md"]
    sources += [p for package in (*MAY_IMPORT, "latentmill") for p in (ROOT / package).rglob("*.py")]
    missing = []
    for source in sources:
        for name in set(cited.findall(source.read_text())):
            if not (ROOT / name).exists():
                missing.append(f"{source.relative_to(ROOT)} cites {name}")
    assert not missing, "\n".join(missing)
