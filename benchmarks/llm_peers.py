"""The peers' rows of the LLM benchmark (issue 18): the same model, token rows and measurements as
`llm_generate.py`, through torchao and llm-compressor. Runs in the peers' venv
(`benchmarks/peers_install.sh`), which never imports qpass; `llm_generate.py --peers` writes its
inputs (the FP32 model as a transformers folder, the held-out, prompt and calibration token rows)
and calls it. Standalone::

    /work/peers-venv/bin/python benchmarks/llm_peers.py smollm2 --data /work/peers-data

Rows (each from a fresh load of the FP32 folder):
- `fp32`: the peers' own baseline (transformers of this venv): should match qpass's FP32 row;
- `torchao int8-dynamic`: `quantize_(model, Int8DynamicActivationInt8WeightConfig())` (per-token
  symmetric int8 activations, per-channel int8 weights; every nn.Linear, the tied head included);
- `torchao int4 weight-only`: `Int4WeightOnlyConfig` has no CPU packing in torchao 0.18 (its
  formats are CUDA / XPU / NPU ones); the CPU route is the prototype
  `PrototypeInt4WeightOnlyConfig` (`Int4OpaqueTensor`, tinygemm `_weight_int4pack_mm_for_cpu`).
  The stock config is tried first and its failure recorded;
- `llm-compressor W4A16 GPTQ` and `W8A8` (SmoothQuant 0.8 + GPTQ, per-channel weights, dynamic
  per-token activations): `oneshot` on the same calibration rows, `save_pretrained(...,
  save_compressed=True)`, loaded back with `AutoModelForCausalLM.from_pretrained` (compressed-tensors),
  `ignore=["lm_head"]` as in llm-compressor's examples.
Results: benchmarks/results/llm_peers_<model>.{md,json}, the load average and peak RSS beside each row.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
import traceback
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_measure import CALIB_LEN, TABLE_HEADER, load_text, measure, table_row  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
# weight group per model: SmolLM2's hidden width 576 = 4.5 x 128 (llm-compressor raises in unflatten at
# 128; torchao silently skips every linear whose width 128 does not divide), so 64 there
GROUP = {"smollm2": 64, "qwen25": 128}
# torchao int4 last: its CPU prefill is the slowest
ROWS = ["fp32", "torchao-int8-dynamic", "llmc-w4a16-gptq", "llmc-w8a8", "torchao-int4-weight-only"]


def load_fp32(data: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(data / "fp32", dtype=torch.float32)
    model.config.use_cache = True
    return model.eval().requires_grad_(False)


def _linears(model) -> tuple[int, int, list[str]]:
    """(quantized nn.Linear weights, all nn.Linear, the float ones' names) after torchao."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    left = [n for n in names if type(model.get_submodule(n).weight.data) is torch.Tensor]
    return len(names) - len(left), len(names), left


def torchao_int8(data: Path, name: str) -> tuple[object, str]:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = load_fp32(data)
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    q, n, left = _linears(model)
    return model, f"Int8DynamicActivationInt8WeightConfig(); {q}/{n} linears quantized" + (
        f", float: {', '.join(left[:3])}" if left else ""
    )


def _forward_ok(model) -> None:
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))


def torchao_int4(data: Path, name: str, notes: list[str]) -> tuple[object, str]:
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    group = GROUP[name]
    model = load_fp32(data)
    try:  # the stock config, default (plain) packing
        quantize_(model, Int4WeightOnlyConfig(group_size=group))
        _forward_ok(model)
        cfg = f"Int4WeightOnlyConfig(group_size={group})"
    except Exception as e:  # noqa: BLE001  (recorded, then the CPU route)
        notes.append(f"`Int4WeightOnlyConfig(group_size={group})` (plain packing) on CPU: {_one_line(e)}")
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        del model
        model = load_fp32(data)
        quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=group))
        cfg = f"prototype PrototypeInt4WeightOnlyConfig(group_size={group}) (Int4OpaqueTensor, CPU tinygemm)"
    q, n, left = _linears(model)
    return model, f"{cfg}; {q}/{n} linears quantized" + (f", float: {', '.join(left[:3])}" if left else "")


def _llmc_recipe(kind: str, group: int):
    from llmcompressor.modifiers.quantization import GPTQModifier

    if kind == "w4a16":
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        scheme = QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(
                num_bits=4, type="int", symmetric=True, strategy="group", group_size=group
            ),
        )
        return [GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])], (
            f"GPTQModifier W4A16 (int4 symmetric, group {group}), ignore lm_head"
        )
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    return (
        [
            SmoothQuantModifier(smoothing_strength=0.8),
            GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
        ],
        "SmoothQuantModifier(0.8) + GPTQModifier W8A8 (int8 per-channel weights, dynamic per-token int8 "
        "activations), ignore lm_head",
    )


def llmc(data: Path, name: str, kind: str, calib: torch.Tensor, notes: list[str]) -> tuple[object, str]:
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(data / "fp32")
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})

    def run(group: int):
        model = load_fp32(data)
        recipe, cfg = _llmc_recipe(kind, group)
        oneshot(
            model=model,
            dataset=ds,
            recipe=recipe,
            max_seq_length=CALIB_LEN,
            num_calibration_samples=len(calib),
            shuffle_calibration_samples=False,
        )
        return model, cfg

    if kind == "w4a16" and GROUP[name] != 128:
        try:  # llm-compressor's W4A16 preset group, recorded where the widths refuse it
            model, cfg = run(128)
        except Exception as e:  # noqa: BLE001
            notes.append(f"llm-compressor W4A16 at group 128: {_one_line(e)}; group {GROUP[name]} used")
            gc.collect()
            model, cfg = run(GROUP[name])
    else:
        model, cfg = run(GROUP[name])
    out = data / f"llmc-{kind}"
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    del model
    gc.collect()
    fmt = json.loads((out / "config.json").read_text())["quantization_config"].get("format")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model.config.use_cache = True
    act = _acts_quantized(model)
    if kind == "w8a8" and not act:
        notes.append(
            "llm-compressor W8A8 loaded in transformers: the forward runs the decompressed int8 weights in float "
            "and does not quantize the activations (that is left to vLLM's kernels): its perplexity is W8A16's"
        )
    return (
        model,
        f"{cfg}; checkpoint format `{fmt}`, reloaded in transformers; activations quantized in forward: {act}",
    )


def _acts_quantized(model) -> bool:
    """Does the reloaded model's forward quantize a Linear's input (compare with a float matmul)?"""
    import torch.nn.functional as F

    lin = next(m for n, m in model.named_modules() if n.endswith("q_proj"))
    with torch.no_grad():
        _forward_ok(model)  # compressed-tensors decompresses on the first forward
        x = torch.randn(1, 3, lin.in_features) * 3
        return not torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def _peak_rss_gb() -> float:
    """Peak RSS of this process: VmHWM (ru_maxrss survives exec on Linux and would report the
    peak of llm_generate.py, the parent, when it runs this script).
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", choices=sorted(GROUP))
    ap.add_argument("--data", type=Path, default=Path("/work/peers-data"))
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    a = ap.parse_args()
    name, data = a.model, a.data / a.model
    torch.set_num_threads(2)
    torch.manual_seed(0)
    from safetensors.torch import load_file

    tokens = load_file(str(data / "tokens.safetensors"))
    eval_rows, prompt, calib = tokens["eval_rows"], tokens["prompt"], tokens["calib_rows"]
    versions = {
        p: version(p) for p in ("torch", "transformers", "torchao", "llmcompressor", "compressed-tensors")
    }
    results, notes = [], []
    for row in a.rows.split(","):
        t = time.perf_counter()
        rnotes: list[str] = []
        try:
            if row == "fp32":
                model, cfg = load_fp32(data), "transformers FP32 (the folder llm_generate.py wrote)"
            elif row == "torchao-int8-dynamic":
                model, cfg = torchao_int8(data, name)
            elif row == "torchao-int4-weight-only":
                model, cfg = torchao_int4(data, name, rnotes)
            elif row in ("llmc-w4a16-gptq", "llmc-w8a8"):
                model, cfg = llmc(data, name, "w4a16" if row == "llmc-w4a16-gptq" else "w8a8", calib, rnotes)
            else:
                msg = f"unknown row {row!r}: one of {ROWS}"
                raise ValueError(msg)  # noqa: TRY301  (recorded as the row's failure like any other)
            qtime = time.perf_counter() - t
            m = measure(model, eval_rows, prompt)
            res = {"row": row, "config": cfg, "quantize_s": qtime, **m}
            del model
        except Exception as e:  # noqa: BLE001  (a peer that fails is a result: recorded with its cause)
            traceback.print_exc()
            res = {"row": row, "error": _one_line(e), "loadavg": list(os.getloadavg())}
        gc.collect()
        res["peak_rss_gb"] = _peak_rss_gb()
        res["notes"] = rnotes
        notes += rnotes
        results.append(res)
        print(f"{name} {json.dumps(res)}", flush=True)
        write(name, versions, results, notes)  # after every row: a run stopped early keeps its rows


def write(name: str, versions: dict, results: list[dict], notes: list[str]) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / f"llm_peers_{name}.json").write_text(
        json.dumps({"model": name, "versions": versions, "rows": results}, indent=1) + "\n"
    )
    fp = next((r["perplexity"] for r in results if r["row"] == "fp32" and "perplexity" in r), None)
    lines = [
        f"# `benchmarks/llm_peers.py {name}` (the peers' venv)",
        "",
        f"Machine: {os.cpu_count()} CPU cores, no GPU, 2 threads, batch 1; load average after the run "
        f"{load_text()}. " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "Same token rows and measurement code (`lm_measure.py`) as `llm_generate.py`; vs FP32 is against this "
        "run's own FP32 row. Every row is a fresh load of the FP32 folder.",
        "",
        *TABLE_HEADER,
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | failed | {r['error']} | | | | |")
        else:
            lines.append(
                table_row(
                    r["row"],
                    r["quantize_s"],
                    r["perplexity"],
                    fp or r["perplexity"],
                    r["prefill_ms"],
                    r["decode_tok_s"],
                    r["decode_growth"],
                )
            )
    lines += [
        "",
        "| row | configuration | load after the row (1/5/15 min) | peak RSS so far GB |",
        "|---|---|---|---:|",
    ]
    for r in results:
        la = " / ".join(f"{x:.2f}" for x in r["loadavg"])
        lines.append(
            f"| {r['row']} | {r.get('config', r.get('error', ''))} | {la} | {r['peak_rss_gb']:.1f} |"
        )
    if notes:
        lines += ["", "Notes:", *(f"- {n}" for n in notes)]
    (OUT / f"llm_peers_{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
