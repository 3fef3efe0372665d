"""Channel reordering for block formats: block-quantization error of the reordered values.

For every site the reorder pass applies (linear inputs, K cache), the value is observed on a
held-out batch before and after the pass and fake-quantized in each block format along its
channel axis; the table gives MSE(before) / MSE(after) per site and format, and the op count
of the graph before and after (the permutation lives in the weights: no op is added).

Models: the synthetic TinyLlama / TinyBert of the tests, widened so MXFP4 blocks of 32 fit
inside a head (head size 64), with outlier channels spread over the blocks
(`tests/models.spread_channel_outliers`), and the real MiniLM (head size 32: only its
1536-wide FFN input can be reordered for blocks of 32; every site for BFP blocks of 8).

Run: PYTHONPATH=. python benchmarks/reorder_split.py  -> benchmarks/results/reorder_split.md

SplitQuant: MiniLM with weight-only RTN (INT4 per row, INT2 in groups of 32, the embedding
table left FP), with and without the split_quant pass; held-out sentence-embedding cosine
against FP32 (`zoo.embedding_agreement`), torch target.
LLM.int8 decomposition is measured in benchmarks/decompose.py.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from models import TinyBert, TinyLlama, bert_inputs, llama_inputs, spread_channel_outliers  # noqa: E402

from passes.base import PassContext  # noqa: E402
from passes.reorder import Reorder, ReorderConfig, ReorderMethod  # noqa: E402
from qpass.formats import fake_quantize, get_format, mse  # noqa: E402
from qpass.graph.fx import FxGraphView, capture, clone_graph_module  # noqa: E402
from qpass.pass_manager import run_pass  # noqa: E402

FORMATS = ("mxfp4", "nvfp4", "bfp12", "mxint8")
RESULTS = Path(__file__).parent / "results"


def measure(name: str, model, batches, method: ReorderMethod) -> list[dict]:
    """One row per (format): geometric-mean and per-site MSE ratios, op counts."""
    rows = []
    held_out = batches[-1]
    for fmt in FORMATS:
        spec = get_format(fmt)
        view = FxGraphView(clone_graph_module(capture(model, batches[0])))
        n_ops = len(list(view.ops()))
        rpass = Reorder(ReorderConfig(block=spec.group_size, method=method))
        sites, _ = rpass._sites(view)
        values = [s.value for s in sites]
        before = view.observe(values, held_out) if values else {}
        result = run_pass(view, rpass, batches[:-1], PassContext(), verify=True)
        after = view.observe(values, held_out) if values else {}
        applied = {n.site for n in result.plan.applied_sites}
        per_site = {}
        for s in sites:
            if s.label not in applied:
                continue
            errs = [
                float(mse(t[s.value.name], fake_quantize(t[s.value.name], spec))) for t in (before, after)
            ]
            per_site[f"{s.what}: {s.label}"] = errs[0] / errs[1]
        geo = (
            math.exp(sum(math.log(r) for r in per_site.values()) / len(per_site))
            if per_site
            else float("nan")
        )
        kinds = {}
        for label, r in per_site.items():
            kinds.setdefault(label.split(":")[0], []).append(r)
        rows.append(
            {
                "model": name,
                "method": method.value,
                "format": fmt,
                "block": spec.group_size,
                "sites": len(per_site),
                "skipped": len(result.plan.skipped_sites),
                "geo_mean_ratio": geo,
                "by_kind": {k: math.exp(sum(map(math.log, v)) / len(v)) for k, v in kinds.items()},
                "best": max(per_site.values(), default=float("nan")),
                "worst": min(per_site.values(), default=float("nan")),
                "ops_before": n_ops,
                "ops_after": len(list(view.ops())),
                "verified_max_rel_err": result.max_rel_error,
                "per_site": per_site,
            }
        )
        print(f"{name:>22} {method.value:>7} {fmt:>6}: {len(per_site)} sites, geo {geo:.2f}x", flush=True)
    return rows


def synthetic() -> list[tuple[str, torch.nn.Module, list]]:
    torch.manual_seed(0)
    llama = spread_channel_outliers(TinyLlama(dim=128, hidden=256, heads=2, kv_heads=1), factor=16.0)
    torch.manual_seed(0)
    bert = spread_channel_outliers(TinyBert(dim=256, hidden=512, heads=4), factor=16.0)
    lb = [llama_inputs(dim=128, seed=i) for i in range(4)]
    bb = [tuple(bert_inputs(dim=256, seed=i).values()) for i in range(4)]
    return [("TinyLlama+outliers", llama, lb), ("TinyBert+outliers", bert, bb)]


def minilm(n: int) -> tuple[str, torch.nn.Module, list]:
    from qpass import zoo

    embedder, tok = zoo.load_minilm_embedder()
    batches = zoo.minilm_batches(tok, zoo.sentences("calib", n), batch_size=16, max_len=64)
    batches += zoo.minilm_batches(tok, zoo.sentences("eval", 16), batch_size=16, max_len=64)
    return "MiniLM-L6", embedder, [{k: torch.from_numpy(v) for k, v in b.items()} for b in batches]


SPLIT_CONFIGS = (("int4", None), ("int4", 32), ("int2", 32))


def splitquant_rows(n_eval: int) -> list[dict]:
    """Held-out embedding agreement of RTN vs SplitQuant + RTN on MiniLM (weights only)."""
    import numpy as np

    import qpass
    from qpass import zoo

    embedder, tok = zoo.load_minilm_embedder()
    calib = zoo.minilm_batches(tok, zoo.sentences("calib", 16), batch_size=16, max_len=64)
    evals = zoo.minilm_batches(tok, zoo.sentences("eval", n_eval), batch_size=32, max_len=64)
    calib_t = [{k: torch.from_numpy(v) for k, v in b.items()} for b in calib]
    evals_t = [{k: torch.from_numpy(v) for k, v in b.items()} for b in evals]

    def embed(model) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([model(**b) for b in evals_t]).numpy()

    ref = embed(embedder)
    rows = []
    for fmt, group in SPLIT_CONFIGS:
        for passes in ([], [{"split_quant": {"parts": 3}}]):
            recipe = {"passes": passes, "weights": {"format": fmt, "group": group}, "target": "torch"}
            q = qpass.quantize(embedder, recipe, calib_t)
            agree = zoo.embedding_agreement(ref, embed(q))
            rows.append(
                {
                    "weights": fmt + (f" g{group}" if group else " per row"),
                    "method": "SplitQuant + RTN" if passes else "RTN",
                    **agree,
                }
            )
            print(rows[-1], flush=True)
    return rows


def split_markdown(rows: list[dict], n_eval: int) -> str:
    out = [
        "",
        f"## SplitQuant vs RTN on MiniLM-L6 ({n_eval} held-out sentences, weights only, torch target)",
        "",
        "| weights | method | mean cos | min cos | NN agree |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['weights']} | {r['method']} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | "
            f"{r['nn_agreement']:.3f} |"
        )
    return "\n".join(out) + "\n"


def to_markdown(rows: list[dict]) -> str:
    out = [
        "# Channel reordering for block formats (`benchmarks/reorder_split.py`)",
        "",
        "MSE(before) / MSE(after) of each reordered value (linear inputs, K cache) fake-quantized",
        "in the format's blocks along channels, on a held-out batch; geometric mean over sites.",
        "Ops before/after: graph op count (the permutation is folded into weights).",
        "",
        "| model | method | format | block | sites | linear inputs | K cache | worst..best | ops before/after |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lin = r["by_kind"].get("linear input", float("nan"))
        kc = r["by_kind"].get("K cache", float("nan"))
        out.append(
            f"| {r['model']} | {r['method']} | {r['format']} | {r['block']} | {r['sites']} | {lin:.2f}x | "
            f"{kc:.2f}x | {r['worst']:.2f}..{r['best']:.2f} | {r['ops_before']}/{r['ops_after']} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--calib", type=int, default=32, help="MiniLM calibration sentences")
    ap.add_argument("--eval", type=int, default=128, help="MiniLM held-out sentences (SplitQuant)")
    args = ap.parse_args()
    models = synthetic() + ([] if args.no_minilm else [minilm(args.calib)])
    rows = []
    for name, model, batches in models:
        for method in ReorderMethod:
            rows += measure(name, model, batches, method)
    split = [] if args.no_minilm else splitquant_rows(args.eval)
    text = to_markdown(rows) + (split_markdown(split, args.eval) if split else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reorder_split.json").write_text(json.dumps({"reorder": rows, "splitquant": split}, indent=1))
    (RESULTS / "reorder_split.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
