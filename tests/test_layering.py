"""The one-way data flow of DESIGN.md: the layers below ``ops`` (Triton kernels, the reference) import nothing
from above them. Checked on the source, so a stray import fails here before it becomes a circular one."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def sparsekern_imports(path: Path, package: str) -> set[str]:
    """The sparsekern modules a file imports (relative imports resolved against ``package``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "sparsekern" or m.startswith("sparsekern.")}


@pytest.mark.parametrize("path", sorted((ROOT / "triton_kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_import_only_the_reference(path):
    """Kernel modules may take constants and checks from ``sparsekern.reference``, nothing else of the package (the
    loops that drive them live in ``prune/``, and ``ops`` dispatches to them)."""
    imports = sparsekern_imports(path, "sparsekern.triton_kernels")
    above = {m for m in imports if not m.startswith(("sparsekern.reference", "sparsekern.triton_kernels"))}
    assert not above, f"{path.name} imports {sorted(above)} from above the op layer"


@pytest.mark.parametrize("path", sorted((ROOT / "sparsekern" / "reference").glob("*.py")), ids=lambda p: p.name)
def test_reference_imports_only_itself(path):
    imports = sparsekern_imports(path, "sparsekern.reference")
    above = {m for m in imports if not m.startswith("sparsekern.reference")}
    assert not above, f"reference/{path.name} imports {sorted(above)}"


def test_the_check_sees_an_upward_import(tmp_path):
    stray = tmp_path / "stray.py"
    stray.write_text("from sparsekern.prune.sparsegpt_loop import blocked_prune\nfrom ..prune import REGISTRY\n")
    assert sparsekern_imports(stray, "sparsekern.triton_kernels") == {"sparsekern.prune.sparsegpt_loop",
                                                                      "sparsekern.prune"}
