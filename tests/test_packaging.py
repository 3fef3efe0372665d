"""The installed distribution: one package, `qpass`, with the top-level folders passes/, lowering/
and kernels/ inside it. Run from a folder outside the checkout, so the repository root cannot
shadow what pip installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-P", "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


def test_subpackages_install_under_qpass(tmp_path):
    out = _run(
        "import qpass.passes, qpass.lowering, qpass.kernels; "
        "print(qpass.passes.__file__); print(qpass.lowering.__file__); print(qpass.kernels.__file__)",
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    files = [Path(line) for line in out.stdout.split()]
    assert [f.parent.name for f in files] == ["passes", "lowering", "kernels"]


@pytest.mark.parametrize("name", ["passes", "lowering", "kernels"])
def test_generic_top_level_names_are_not_ours(tmp_path, name):
    """`import passes` etc. fail, or find another distribution (Hugging Face ships `kernels`)."""
    out = _run(f"import {name}; print({name}.__file__)", tmp_path)
    if out.returncode == 0:
        assert Path(out.stdout.strip()).resolve().parent != ROOT / name, out.stdout
    else:
        assert "ModuleNotFoundError" in out.stderr


def test_dynamo_lists_the_qpass_backend(tmp_path):
    out = _run("import torch._dynamo; print('qpass' in torch._dynamo.list_backends())", tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
