"""`examples/write_a_pass.py` runs as a user runs it (its own model, its pass registered and named in
a recipe) and its pass folds the three norms on both graph kinds, exactly.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "write_a_pass.py"


def test_write_a_pass_runs_by_recipe_name_on_fx_and_onnx(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-P", str(EXAMPLE)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith(("fx ", "onnx "))}
    assert set(lines) == {"fx", "onnx"}, proc.stdout
    for kind, line in lines.items():
        assert "fold_gamma: 3 sites, 2 skipped" in line, line
        fold_err = float(re.search(r"fold max rel err (\S+);", line).group(1))
        out_err = float(re.search(r"output rel err (\S+)$", line).group(1))
        assert fold_err < 1e-5, (kind, fold_err)
        assert out_err < 0.05, (kind, out_err)
