"""Channel reordering for block formats: block-quantization error of the reordered values.

For every site the reorder pass applies (linear inputs, K cache), the value is observed on a
held-out batch before and after the pass and fake-quantized in each block format along its
channel axis; the table gives MSE(before) / MSE(after) per site and format, and the op count
of the graph before and after (the permutation lives in the weights: no op is added).

Models: the synthetic TinyLlama / TinyBert of the tests, widened so MXFP4 blocks of 32 fit
inside a head (head size 64), with outlier channels spread over the blocks
(`tests/models.spread_channel_outliers`), and the real MiniLM (head size 32: only its
1536-wide FFN input can be reordered for blocks of 32; every site for BFP blocks of 8).

Run: python benchmarks/reorder_split.py  -> benchmarks/results/reorder_split.md

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

from models import TinyBert, TinyLlama, bert_inputs, llama_inputs, massive_channel_outliers  # noqa: E402

from qpass.formats import fake_quantize, get_format  # noqa: E402
from qpass.graph.fx import FxGraphView  # noqa: E402
from qpass.graph.fx_capture import capture, clone_graph_module  # noqa: E402
from qpass.pass_base import PassContext  # noqa: E402
from qpass.pass_manager import run_pass  # noqa: E402
from qpass.passes.reorder import Reorder, ReorderConfig, ReorderKey, ReorderMethod  # noqa: E402

FORMATS = ("mxfp4", "nvfp4", "bfp12", "mxint8")
RESULTS = Path(__file__).parent / "results"


OUTLIER_RATIO = 4.0  # a channel is an outlier when its held-out absmax exceeds 4x the median


def _channel_weights(view, site) -> torch.Tensor:
    """What an error on each channel costs downstream: the squared norm of the consumers' weights
    for that channel (linear inputs: input columns; K: the Q projection rows, GQA groups summed).
    A diagonal approximation of the consumer's output error (errors independent across channels).
    """
    total = torch.zeros(site.width, dtype=torch.float64)
    for const, axis in site.sinks:
        if len(const.shape) < 2:
            continue  # biases
        t = view.read(const).to(torch.float64)
        w = t.square().sum(dim=[d for d in range(t.dim()) if d != axis])
        total += w.reshape(site.width // site.period, -1, site.period).sum(1).reshape(-1)
    return total


def _consumer_matrices(view, site) -> list[torch.Tensor] | None:
    """[out, in] matrices of the linears that read the value itself (exact output error), or None
    where the value is not their input (K: Q K^T; V: attention mixes tokens before o_proj).
    """
    if site.what != "linear input" or site.period != site.width:
        return None
    mats = []
    for const, axis in site.sinks:
        if len(const.shape) == 2:
            mats.append(view.read(const).to(torch.float64).movedim(axis, -1))
    return mats


def _split_mse(x: torch.Tensor, spec, weights: torch.Tensor, mats) -> dict[str, float]:
    """MSE over all, normal and outlier channels; #outliers; consumer output error.

    Channels are classified on the value itself (absmax over tokens), which is invariant to
    the permutation, so the before/after sets are the same channels. 'filler_share': the part
    of the normal channels' error in blocks that hold an outlier. 'output' is the exact
    MSE of x_hat W^T - x W^T summed over the consumers where they read the value directly,
    else the diagonal estimate sum_c err_c ||w_c||^2.
    """
    flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
    diff = fake_quantize(x, spec).reshape(flat.shape).to(torch.float64) - flat
    err = diff.square().mean(0)
    absmax = flat.abs().amax(0)
    out = absmax > OUTLIER_RATIO * absmax.median()
    n = x.shape[-1]
    block = spec.group_size
    in_outlier_block = out.reshape(-1, block).any(1).repeat_interleave(block) if n % block == 0 else out
    filler = float(err[in_outlier_block & ~out].sum() / max(float(err[~out].sum()), 1e-30))
    if mats:
        output = sum(float((diff @ w.T).square().mean()) for w in mats)
    else:
        output = float((err * weights).sum())
    return {
        "all": float(err.sum() / n),
        "normal": float(err[~out].sum() / max(int((~out).sum()), 1)),
        "outlier": float(err[out].sum() / max(int(out.sum()), 1)) if out.any() else float("nan"),
        "n_out": int(out.sum()),
        "output": output,
        "filler_share": filler,
    }


def _quant_err(x: torch.Tensor, spec) -> torch.Tensor:
    """Per-column squared error summed over rows of x [rows, n] in blocks of the spec (zero-padded)."""
    pad = (-x.shape[-1]) % spec.group_size
    padded = torch.cat([x, x.new_zeros(*x.shape[:-1], pad)], -1)
    return (fake_quantize(padded, spec) - padded).square().sum(-2)[..., : x.shape[-1]]


def _bounds(x: torch.Tensor, spec, period: int) -> dict[str, float]:
    """Floors no permutation inside a period reaches, estimated on the held-out value itself.

    Normal floor: the normal channels quantized alone (sorted by RMS), as if no outlier existed;
    unreachable, since (-outliers mod block) normal channels must fill the last outlier block.
    Outlier floor: each outlier alone in a block (its own max sets the scale: its smallest error
    in every format here). All-channel floor: both together. 'outlier_active': how often an
    outlier entry exceeds OUTLIER_RATIO x its token's largest normal entry (it then sets the
    block scale and the normal channels in its block round to about zero).
    """
    flat = x.reshape(-1, x.shape[-1]).to(torch.float64)
    absmax = flat.abs().amax(0)
    out = absmax > OUTLIER_RATIO * absmax.median()
    normal_err = outlier_err = 0.0
    for h in range(flat.shape[1] // period):
        part, o = flat[:, h * period : (h + 1) * period], out[h * period : (h + 1) * period]
        normal = part[:, ~o]
        normal_err += float(_quant_err(normal[:, torch.argsort(-normal.square().mean(0))], spec).sum())
        outl = part[:, o]
        outlier_err += sum(float(_quant_err(outl[:, c : c + 1], spec).sum()) for c in range(outl.shape[1]))
    n_out, n, rows = int(out.sum()), flat.shape[1], flat.shape[0]
    normal_max = flat[:, ~out].abs().amax(1, keepdim=True)
    active = float((flat[:, out].abs() > OUTLIER_RATIO * normal_max).double().mean())
    return {
        "outlier_active": active,
        "normal_floor": normal_err / rows / max(n - n_out, 1),
        "all_floor": (normal_err + outlier_err) / rows / n,
    }


def _geo(values) -> float:
    vals = [v for v in values if v == v and v > 0]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else float("nan")


VARIANTS = (  # label, method, per head, key
    ("sort, absmax key", ReorderMethod.SORT, True, ReorderKey.ACTIVATION),
    ("sort", ReorderMethod.SORT, True, ReorderKey.RMS),
    ("balance", ReorderMethod.BALANCE, True, ReorderKey.RMS),
    ("sort, shared perm", ReorderMethod.SORT, False, ReorderKey.RMS),
)


def measure(name: str, model, batches, variant: tuple) -> list[dict]:
    """One row per format: per-kind geometric means of MSE(before)/MSE(after), op counts."""
    label, method, per_head, key = variant
    rows = []
    held_out = batches[-1]
    for fmt in FORMATS:
        spec = get_format(fmt)
        view = FxGraphView(clone_graph_module(capture(model, batches[0])))
        n_ops = len(list(view.ops()))
        rpass = Reorder(ReorderConfig(block=spec.group_size, method=method, per_head=per_head, key=key))
        sites = rpass.sites(view, PassContext()).found
        values = [s.value for s in sites]
        before = view.observe(values, held_out) if values else {}
        w_before = {s.label: (_channel_weights(view, s), _consumer_matrices(view, s)) for s in sites}
        result = run_pass(view, rpass, batches[:-1], PassContext(), verify=True)
        after = view.observe(values, held_out) if values else {}
        w_after = {s.label: (_channel_weights(view, s), _consumer_matrices(view, s)) for s in sites}
        applied = {n.site for n in result.plan.applied_sites}
        per_site = {}
        for s in sites:
            if s.label not in applied:
                continue
            b = _split_mse(before[s.value.name], spec, *w_before[s.label])
            a = _split_mse(after[s.value.name], spec, *w_after[s.label])
            row = {
                "outliers": b["n_out"],
                "width": s.width,
                "mse_before": b["all"],
                "mse_after": a["all"],
                "ratio_all": b["all"] / a["all"],
                "ratio_normal": b["normal"] / a["normal"],
                "ratio_outlier": b["outlier"] / a["outlier"] if b["n_out"] else float("nan"),
                "ratio_output": b["output"] / a["output"],
                "output_exact": w_before[s.label][1] is not None,
            }
            if b["n_out"]:
                bound = _bounds(before[s.value.name], spec, s.period)
                row["ceiling_normal"] = b["normal"] / bound["normal_floor"]
                row["filler_share_after"] = a["filler_share"]
                row["outlier_active"] = bound["outlier_active"]
                row["ceiling_all"] = b["all"] / bound["all_floor"]
                row["outlier_share_before"] = b["outlier"] * b["n_out"] / (b["all"] * s.width)
            per_site[f"{s.what}: {s.label}"] = row
        kinds: dict[str, list[dict]] = {}
        for site_label, r in per_site.items():
            kind = site_label.split(":")[0]
            if kind == "linear input" and r["outliers"] == 0:
                kind = "linear input (no outliers)"
            kinds.setdefault(kind, []).append(r)
        metrics = (
            "ratio_all",
            "ratio_normal",
            "ratio_outlier",
            "ratio_output",
            "ceiling_normal",
            "filler_share_after",
            "outlier_active",
            "ceiling_all",
            "outlier_share_before",
        )
        by_kind = {
            k: {m: _geo(r.get(m, float("nan")) for r in v) for m in metrics} | {"sites": len(v)}
            for k, v in kinds.items()
        }
        rows.append(
            {
                "model": name,
                "method": label,
                "format": fmt,
                "block": spec.group_size,
                "sites": len(per_site),
                "skipped": len(result.plan.skipped_sites),
                "by_kind": by_kind,
                "ops_before": n_ops,
                "ops_after": len(list(view.ops())),
                "verified_max_rel_err": result.max_rel_error,
                "per_site": per_site,
            }
        )
        summary = ", ".join(
            f"{k} {v['ratio_all']:.2f}/{v['ratio_normal']:.2f}/{v['ratio_output']:.2f}"
            for k, v in by_kind.items()
        )
        print(f"{name:>28} {label:>18} {fmt:>6}: {summary}", flush=True)
    return rows


def synthetic(factors=(20.0, 100.0)) -> list[tuple[str, torch.nn.Module, list]]:
    """LLaMA- and BERT-like graphs with head size 128 (4 MXFP4 blocks a head) and a 512-wide MLP
    (16 blocks), 4 outlier channels per K head and 4 of the 512 MLP channels
    (`tests/models.massive_channel_outliers`), at two outlier magnitudes.
    """
    out = []
    lb = [llama_inputs(dim=256, seed=i) for i in range(4)]
    bb = [tuple(bert_inputs(dim=256, seed=i).values()) for i in range(4)]
    for f in factors:
        torch.manual_seed(0)
        llama = massive_channel_outliers(TinyLlama(dim=256, hidden=512, heads=2, kv_heads=2), factor=f)
        torch.manual_seed(0)
        bert = massive_channel_outliers(TinyBert(dim=256, hidden=512, heads=2), factor=f)
        out += [(f"TinyLlama, 4 ch x{f:g}", llama, lb), (f"TinyBert, 4 ch x{f:g}", bert, bb)]
    return out


def minilm(n: int) -> tuple[str, torch.nn.Module, list]:
    from qpass import zoo

    embedder, tok = zoo.load_minilm_embedder()
    batches = zoo.minilm_batches(tok, zoo.sentences("calib", n), batch_size=16, max_len=64)
    batches += zoo.minilm_batches(tok, zoo.sentences("eval", 16), batch_size=16, max_len=64)
    return "MiniLM-L6", embedder, [{k: torch.from_numpy(v) for k, v in b.items()} for b in batches]


SPLIT_CONFIGS = (("int4", None), ("int4", 32), ("int2", 32))


def splitquant_rows(n_eval: int) -> list[dict]:
    """Held-out embedding agreement of RTN vs SplitQuant + RTN on MiniLM (weights only)."""
    import qpass
    from qpass import zoo

    embedder, tok = zoo.load_minilm_embedder()
    calib = zoo.minilm_batches(tok, zoo.sentences("calib", 16), batch_size=16, max_len=64)
    evals = zoo.minilm_batches(tok, zoo.sentences("eval", n_eval), batch_size=32, max_len=64)
    calib_t = zoo.torch_batches(calib)
    ref = zoo.embed_batches(embedder, evals)
    rows = []
    for fmt, group in SPLIT_CONFIGS:
        for passes in ([], [{"split_quant": {"parts": 3}}]):
            recipe = {"passes": passes, "weights": {"format": fmt, "group": group}, "target": "torch"}
            q = qpass.quantize(embedder, recipe, calib_t)
            agree = zoo.embedding_agreement(ref, zoo.embed_batches(q, evals))
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
        "MSE(before) / MSE(after) of each reordered value fake-quantized in the format's blocks",
        "along channels, on a held-out batch; geometric mean over the sites of a kind. Each cell:",
        "all channels / normal channels only / outlier channels only (a channel is an outlier when",
        f"its held-out absmax is above {OUTLIER_RATIO:g}x the median) / consumer output. 'Output' is the",
        "error downstream: for linear inputs the exact MSE of x_hat W^T against x W^T over the consumer",
        "linears; for the K cache (Q K^T) and V (attention mixes tokens before o_proj) a diagonal",
        "estimate, each channel's error times the squared norm of the consumers' weights for it (for",
        "K, the Q projection rows). (n) = sites. Ops: op count before/after.",
        "",
        "Which error: the issue's target is the block-quantization MSE of the reordered value, so",
        "every column is MSE(before)/MSE(after) and none replaces another. The all-channel MSE is the",
        "literal reading, but on outlier models it is the outliers' own error (see the outlier share",
        "below), which a permutation cannot lower: their block max, hence their scale, is their own.",
        "What reordering changes is the error of the normal channels that shared a block with an",
        "outlier, and that is also what the consumer pays for: the 'output' column (x_hat W^T vs",
        "x W^T) follows the normal column on the synthetic models, whose consumer weights for the",
        "outlier channels are divided by the outlier factor, as in LLMs where massive activations meet",
        "small weights. So the normal and output columns judge the pass; all-channel is reported too.",
        "",
        "Methods: 'sort' orders channels by calibrated RMS (the default key), outliers first and the",
        "smallest channels in the free slots of their last block; 'sort, absmax key' is the same by",
        "calibrated absmax (the previous default); 'balance' moves only the outliers; 'shared perm'",
        "uses one permutation for every head.",
        "",
        "Synthetic models (`tests/models.massive_channel_outliers`): head size 128 (4 MXFP4 blocks, 16",
        "BFP blocks a head), MLP width 512; 4 fixed random channels of the MLP's inner activation and",
        "4 per K head (different positions per head) multiplied by x20 or x100, the consumers' matching",
        "weights divided by the same factor (down_proj / fc2 columns, Q rows), so the function is the",
        "model's own. 'other linear inputs' are sites without injected outliers (attention output).",
        "",
        "| model | method | format | block | linear inputs (MLP) | K cache | other linear inputs | ops |",
        "|---|---|---|---:|---|---|---|---|",
    ]

    def cell(r: dict, kind: str) -> str:
        k = r["by_kind"].get(kind)
        if not k:
            return "—"
        return (
            f"{k['ratio_all']:.2f} / {k['ratio_normal']:.2f} / {k['ratio_outlier']:.2f} / "
            f"{k['ratio_output']:.2f} ({k['sites']})"
        )

    for r in rows:
        out.append(
            f"| {r['model']} | {r['method']} | {r['format']} | {r['block']} | {cell(r, 'linear input')} | "
            f"{cell(r, 'K cache')} | {cell(r, 'linear input (no outliers)')} | "
            f"{r['ops_before']}/{r['ops_after']} |"
        )
    out += [
        "",
        "## How far from the best any permutation can do ('sort', sites with outliers)",
        "",
        "Normal: measured ratio / ceiling, and the share of the normal channels' MSE after",
        "reordering that sits in the outlier blocks (the fillers). The normal ceiling is MSE(before)",
        "of the normal channels over their MSE quantized as if no outlier existed (alone, sorted by",
        "RMS): no permutation gets there, since (-outliers mod block) normal channels must fill the",
        "last outlier block and lose most of their value whenever an outlier sets the block scale.",
        "All: measured / ceiling, the ceiling adding to that normal floor each outlier quantized",
        "alone in its block (its own max sets the scale: its smallest error). 'outl. share' = the",
        "outlier channels' share of the all-channel MSE before reordering: while the outliers' own",
        "error stays, the all-channel ratio cannot pass 1 / share, and a permutation barely changes",
        "that error (MXFP4) or raises it (BFP, NVFP4: a bigger outlier in the same block).",
        "'active' = the fraction of (token, outlier channel) entries above",
        f"{OUTLIER_RATIO:g}x the token's largest normal entry: only then does the outlier set its block's",
        "scale, so before reordering the normal channels of an outlier block lose only that often.",
        "",
        "| model | format | MLP normal | MLP fillers | MLP all | MLP outl. share | MLP active "
        "| K normal | K fillers | K all | K outl. share |",
        "|---|---|---|---:|---|---:|---:|---|---:|---|---:|",
    ]

    def pair(k: dict | None, *ms: str) -> str:
        return "—" if not k else " / ".join(f"{k[m]:.2f}" for m in ms)

    def share(k: dict | None, m: str = "outlier_share_before") -> str:
        return "—" if not k else f"{k[m]:.2f}"

    for r in rows:
        if r["method"] != "sort":
            continue
        mlp, kc = r["by_kind"].get("linear input"), r["by_kind"].get("K cache")
        fill = "filler_share_after"
        out.append(
            f"| {r['model']} | {r['format']} | {pair(mlp, 'ratio_normal', 'ceiling_normal')} | "
            f"{share(mlp, fill)} | {pair(mlp, 'ratio_all', 'ceiling_all')} | {share(mlp)} | "
            f"{share(mlp, 'outlier_active')} | "
            f"{pair(kc, 'ratio_normal', 'ceiling_normal')} | {share(kc, fill)} | "
            f"{pair(kc, 'ratio_all', 'ceiling_all')} | "
            f"{share(kc)} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--calib", type=int, default=32, help="MiniLM calibration sentences")
    ap.add_argument("--eval", type=int, default=128, help="MiniLM held-out sentences (SplitQuant)")
    ap.add_argument("--no-split", action="store_true", help="keep the SplitQuant rows of the last run")
    args = ap.parse_args()
    models = synthetic() + ([] if args.no_minilm else [minilm(args.calib)])
    rows = []
    for name, model, batches in models:
        for variant in VARIANTS:
            rows += measure(name, model, batches, variant)
    if args.no_split and (RESULTS / "reorder_split.json").exists():
        split = json.loads((RESULTS / "reorder_split.json").read_text()).get("splitquant", [])
    else:
        split = [] if args.no_minilm else splitquant_rows(args.eval)
    text = to_markdown(rows) + (split_markdown(split, args.eval) if split else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reorder_split.json").write_text(json.dumps({"reorder": rows, "splitquant": split}, indent=1))
    (RESULTS / "reorder_split.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
