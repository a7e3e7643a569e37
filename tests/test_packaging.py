"""triton_kernels/ must be importable as sparsekern.triton_kernels, and never as a top-level package
(Triton's project ships its own `triton_kernels`)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_kernels_package_is_the_repo_folder():
    import sparsekern.triton_kernels as kernels

    assert Path(kernels.__file__).resolve().parent == REPO / "triton_kernels"


def _run_outside_repo(code: str) -> subprocess.CompletedProcess:
    # cwd outside the repo and no PYTHONPATH: only what is installed is importable.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, timeout=120)


def test_installed_package_maps_kernels_and_no_top_level_triton_kernels():
    code = (
        "import importlib.util, sparsekern.triton_kernels as k; print(k.__file__); "
        "s = importlib.util.find_spec('triton_kernels'); print(s.origin if s else None)"
    )
    result = _run_outside_repo(code)
    if "No module named 'sparsekern'" in result.stderr:
        pytest.skip("sparsekern is not installed (only importable from the source tree): pip install -e .")
    assert result.returncode == 0, result.stderr
    kernels_file, top_level_origin = (Path(p) for p in result.stdout.split())
    editable = kernels_file.parent == REPO / "triton_kernels"
    regular = kernels_file.parent.parent.name == "sparsekern"  # site-packages/sparsekern/triton_kernels
    assert editable or regular, kernels_file
    # A top-level triton_kernels may exist (Triton's own package), but it must not be ours.
    if str(top_level_origin) != "None":
        assert not top_level_origin.resolve().is_relative_to(REPO)


def test_uninstalled_source_tree_maps_kernels():
    """From the repo root with no install at all (the editable finder removed), the same import works."""
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
        f"sys.path.insert(0, {str(REPO)!r}); "
        "import sparsekern.triton_kernels as k; print(k.__file__)"
    )
    result = _run_outside_repo(code)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).parent == REPO / "triton_kernels"


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    """Build a wheel from a copy of the packaging inputs (the tree stays clean) and check its layout."""
    src = tmp_path / "src"
    for folder in ("sparsekern", "triton_kernels", "csrc"):  # csrc: the native extension's sources
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("sparsekern-0.1.0-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top_level = zf.read("sparsekern-0.1.0.dist-info/top_level.txt").decode().split()
        entry_points = zf.read("sparsekern-0.1.0.dist-info/entry_points.txt").decode()
    assert "sparsekern/triton_kernels/__init__.py" in names
    assert "sparsekern/formats/bitmap.py" in names
    assert not [n for n in names if n.endswith("dispatch_table.json")]  # measured per GPU into the user's cache
    assert not [n for n in names if n.startswith("triton_kernels/")]
    assert top_level == ["sparsekern"]
    assert "sparsekern = sparsekern.cli:main" in entry_points
