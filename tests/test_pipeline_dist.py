"""Sequential calibration across 2 gloo processes (`qpass.pipeline_dist`) against 1 process.

Two real processes (torch.distributed, gloo over localhost) each quantize the same tiny Llama with
half of the calibration batches; their X^T X are all-reduced block by block. Both ranks must
hold the same codes, and those must be the 1-process codes: the Hessians differ only by float64
summation order (about 1e-16), far below what moves a GPTQ rounding decision on this model.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import torch

CHILD = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_pipeline import RECIPE_GPTQ_SEQ, _codes, _model, _tokens
    import qpass
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    q = qpass.quantize(_model("llama-tied"), RECIPE_GPTQ_SEQ, _tokens(1, 4))
    torch.save(_codes(q), sys.argv[2])
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_give_the_one_process_codes(tmp_path):
    from test_pipeline import RECIPE_GPTQ_SEQ, _codes, _model, _tokens

    import qpass

    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=os.path.dirname(__file__), port=_free_port()))
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    procs = [
        subprocess.Popen([sys.executable, "-P", str(script), str(r), str(outs[r])], stderr=subprocess.PIPE)
        for r in range(2)
    ]
    one = _codes(qpass.quantize(_model("llama-tied"), RECIPE_GPTQ_SEQ, _tokens(1, 4)))
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-3000:]
    ranks = [torch.load(o) for o in outs]
    assert len(one) == 15 and ranks[0].keys() == ranks[1].keys() == one.keys()
    for name, codes in one.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.equal(ranks[0][name], codes), name
