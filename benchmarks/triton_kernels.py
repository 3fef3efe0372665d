"""Kernel speed: the Triton kernels vs torch.matmul in fp16 on a GPU, and the lowered W8A8
MiniLM vs FP32 torch on CPU.

GPU section (runs where CUDA exists): M in {1, 16, 256, 4096}, K = N in {4096, 11008}; each
kernel's time (triton.testing.do_bench, median) vs torch.matmul fp16 at the same shape, with
TFLOP/s (GEMMs, 2*M*N*K) or GB/s (FWHT, read + write). Writes triton_kernels_gpu.{md,json},
naming the device.
CPU section: all-MiniLM-L6-v2 sentence embeddings at batch 32 (sentences from
qpass.zoo), FP32 torch vs qpass W8A8 GraphModules whose linears run torch._int_mm, and the same
models on the fake-quant reference path; median wall time per batch and cosine to FP32.
Writes triton_kernels_cpu.{md,json}.

    .venv/bin/python benchmarks/triton_kernels.py --section cpu
    .venv/bin/python benchmarks/triton_kernels.py --section gpu
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import qpass
from qpass import zoo
from qpass.graph.fx_capture import clone_graph_module
from qpass.lowering.torch_backend import LinearKernel, QuantLinear

OUT = Path(__file__).parent / "results"
GPU_M = (1, 16, 256, 4096)
GPU_KN = (4096, 11008)


# --------------------------------------------------------------------------- GPU
def _gpu_rows() -> list[dict]:
    import triton.testing

    from qpass.kernels.hadamard import hadamard_triton, kernel_supports
    from qpass.kernels.w4a16 import pack_int4, w4a16_triton
    from qpass.kernels.w8a8 import int8_gemm_triton, quantize_per_token_triton

    rows = []
    dev = "cuda"
    for kn in GPU_KN:
        k = n = kn
        w16 = torch.randn(k, n, device=dev, dtype=torch.float16)
        w8 = torch.randint(-127, 128, (k, n), device=dev, dtype=torch.int8)
        ws = torch.rand(n, device=dev) / 100
        group = 128
        codes = torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8)
        packed = pack_int4(codes.cpu(), symmetric=True).to(dev)
        scales = torch.rand(n, k // group if k % group == 0 else -(-k // group), device=dev) / 10
        signs = torch.ones(k, device=dev)
        for m in GPU_M:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            flops = 2 * m * n * k
            t_fp16 = triton.testing.do_bench(lambda x=x, w16=w16: torch.matmul(x, w16))
            q, sa = quantize_per_token_triton(x)
            t_gemm = triton.testing.do_bench(
                lambda q=q, sa=sa, w8=w8, ws=ws: int8_gemm_triton(q, sa, w8, ws, None, torch.float16)
            )
            t_w8a8 = triton.testing.do_bench(
                lambda x=x, w8=w8, ws=ws: int8_gemm_triton(
                    *quantize_per_token_triton(x), w8, ws, None, torch.float16
                )
            )
            t_w4 = triton.testing.do_bench(
                lambda x=x, p=packed, s=scales, g=group: w4a16_triton(x, p, s, None, None, g)
            )
            row = {"M": m, "K=N": kn, "fp16_ms": t_fp16, "fp16_tflops": flops / t_fp16 / 1e9}
            for name, t in (("w8a8_gemm", t_gemm), ("w8a8_with_quant", t_w8a8), ("w4a16", t_w4)):
                row[f"{name}_ms"] = t
                row[f"{name}_tflops"] = flops / t / 1e9
                row[f"{name}_speedup"] = t_fp16 / t
            if kernel_supports(k):
                t_h = triton.testing.do_bench(lambda x=x, signs=signs: hadamard_triton(x, signs))
                row["fwht_ms"] = t_h
                row["fwht_gbs"] = 2 * x.numel() * x.element_size() / t_h / 1e6
            rows.append(row)
            print(row, flush=True)
    return rows


def run_gpu() -> None:
    if not torch.cuda.is_available():
        print("gpu section: no CUDA device here; nothing measured")
        return
    device = torch.cuda.get_device_name()
    rows = _gpu_rows()
    meta = {"device": device, "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat()}
    (OUT / "triton_kernels_gpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Triton kernels vs torch.matmul fp16 on {device}", "", f"`{json.dumps(meta)}`", ""]
    lines.append("| M | K=N | fp16 ms | W8A8 GEMM ms (x) | W8A8+quant ms (x) | W4A16 ms (x) | FWHT GB/s |")
    lines.append("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fwht = f"{r['fwht_gbs']:.0f}" if "fwht_gbs" in r else "n/a (no kernel size)"
        lines.append(
            f"| {r['M']} | {r['K=N']} | {r['fp16_ms']:.4f} | {r['w8a8_gemm_ms']:.4f} ({r['w8a8_gemm_speedup']:.2f}) "
            f"| {r['w8a8_with_quant_ms']:.4f} ({r['w8a8_with_quant_speedup']:.2f}) "
            f"| {r['w4a16_ms']:.4f} ({r['w4a16_speedup']:.2f}) | {fwht} |"
        )
    (OUT / "triton_kernels_gpu.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- CPU
def _time_interleaved(fns: dict, batches, repeats: int) -> tuple[dict, dict, dict]:
    """Median wall and CPU (process) seconds per batch of each fn, run round-robin so load changes
    hit all of them alike, and each fn's outputs on the batches (from the last repeat).
    CPU time counts only this process's work, so it is the steadier figure on a shared machine.
    """
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    outs: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for fn in fns.values():
            fn(batches[0])  # warm-up
        for _ in range(repeats):
            for name in fns:
                outs[name] = []
            for b in batches:
                for name, fn in fns.items():
                    t, c = time.perf_counter(), time.process_time()
                    outs[name].append(fn(b))
                    cpu[name].append(time.process_time() - c)
                    wall[name].append(time.perf_counter() - t)
    med = statistics.median
    return (
        {n: med(v) for n, v in wall.items()},
        {n: med(v) for n, v in cpu.items()},
        {n: torch.cat(v) for n, v in outs.items()},
    )


def _force_reference(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel = LinearKernel.REFERENCE


def run_cpu(batch: int, n_batches: int, repeats: int, threads: int) -> None:
    torch.set_num_threads(threads)
    model, tok = zoo.load_minilm_embedder()
    calib = [
        {k: torch.from_numpy(v) for k, v in b.items()}
        for b in zoo.minilm_batches(tok, zoo.sentences("calib", 64), batch)
    ]
    evals = [
        {k: torch.from_numpy(v) for k, v in b.items()}
        for b in zoo.minilm_batches(tok, zoo.sentences("eval", batch * n_batches), batch)
    ]

    def call(m):
        return lambda b: m(**b)

    fns = {"FP32 torch (eager)": call(model)}
    for recipe in ("w8a8-dynamic", "w8a8-smooth"):
        kernel_model = qpass.quantize(
            model, recipe, calibration=calib[:2] if recipe == "w8a8-smooth" else calib[:1]
        )
        kernels = sorted({m.kernel.value for m in kernel_model.modules() if isinstance(m, QuantLinear)})
        ref_model = clone_graph_module(kernel_model)  # the same codes and scales, reference path
        _force_reference(ref_model)
        fns[f"qpass {recipe} (integer kernels: {', '.join(kernels)})"] = call(kernel_model)
        fns[f"qpass {recipe} (fake-quant reference)"] = call(ref_model)
    wall, cpu, outs = _time_interleaved(fns, evals, repeats)
    fp_out = outs["FP32 torch (eager)"]
    rows = []
    for name in fns:
        cos = torch.nn.functional.cosine_similarity(outs[name], fp_out)
        rows.append(
            {
                "model": name,
                "ms": 1e3 * wall[name],
                "cpu_ms": 1e3 * cpu[name],
                "cos_mean": float(cos.mean()),
                "cos_min": float(cos.min()),
            }
        )
    base, base_cpu = rows[0]["ms"], rows[0]["cpu_ms"]
    for r in rows:
        r["time_vs_fp32"] = r["ms"] / base
        r["cpu_vs_fp32"] = r["cpu_ms"] / base_cpu
    meta = {
        "cpu": platform.processor() or platform.machine(),
        "threads": threads,
        "batch": batch,
        "batches": n_batches,
        "repeats": repeats,
        "tokens_per_batch_max": max(int(b["input_ids"].shape[1]) for b in evals),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(),
    }
    (OUT / "triton_kernels_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# MiniLM (all-MiniLM-L6-v2) on CPU: qpass W8A8 lowered vs FP32 torch, batch 32",
        "",
        "`benchmarks/triton_kernels.py --section cpu`. Median wall time per batch of "
        f"{batch} sentences ({n_batches} batches x {repeats} repeats, models interleaved, {threads} threads); "
        "cosine of the "
        "sentence embeddings to FP32. No GPU was used; the machine was shared, so absolute times are "
        "upper bounds; CPU time (this process only) is the steadier figure.",
        "",
        f"`{json.dumps(meta)}`",
        "",
        "| model | CPU ms / batch | CPU time vs FP32 | wall ms / batch | wall vs FP32 | mean cos | min cos |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['cpu_ms']:.1f} | {r['cpu_vs_fp32']:.2f} | {r['ms']:.1f} | {r['time_vs_fp32']:.2f} "
            f"| {r['cos_mean']:.4f} "
            f"| {r.get('cos_min', 1.0):.4f} |"
        )
    (OUT / "triton_kernels_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", choices=("cpu", "gpu", "all"), default="all")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    if args.section in ("gpu", "all"):
        run_gpu()
    if args.section in ("cpu", "all"):
        run_cpu(args.batch, args.batches, args.repeats, args.threads)


if __name__ == "__main__":
    main()
