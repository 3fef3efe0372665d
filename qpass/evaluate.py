"""Compare a quantized model with its FP original on data: what `qpass eval` prints.

Per output: mean and min cosine similarity per sample, relative error (||q - f|| / ||f|| over
all of the data), and, for classifier or LM-head outputs, top-1 agreement (argmax over the last
axis). For a causal LM (`Task.LM`: the data hold `input_ids`, an output holds next-token logits)
the perplexity of both models on the data. Positions that the data's `attention_mask` marks as
padding are left out of every number.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from qpass.calibration import MASK_KEYS
from qpass.data import leading_size, split_rows
from qpass.errors import CalibrationError, ConfigError, ModelLoadError
from qpass.threads import ort_session_options


class Task(enum.Enum):
    """What the model's outputs are; decides which metrics apply."""

    AUTO = "auto"  # top-1 only for outputs named like logits
    CLASSIFY = "classify"  # top-1 agreement on every output with a class axis (last)
    LM = "lm"  # next-token logits: top-1 agreement and perplexity


Runner = Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]


@dataclass
class Model:
    """A callable model with named inputs and outputs (ONNX Runtime session or torch module)."""

    name: str
    input_names: list[str]
    output_names: list[str]
    run: Runner


def onnx_model(path: str) -> Model:
    """An ONNX Runtime session on the CPU provider."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(path, ort_session_options(log_severity_level=3), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        msg = f"{path}: onnxruntime cannot load the model ({first})"
        raise ModelLoadError(msg) from None
    dtypes = {i.name: _ORT_DTYPES.get(i.type) for i in sess.get_inputs()}

    def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        cast = {k: v.astype(dtypes[k]) if dtypes.get(k) is not None else v for k, v in feeds.items()}
        return [np.asarray(y) for y in sess.run(None, cast)]

    return Model(path, list(dtypes), [o.name for o in sess.get_outputs()], run)


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def torch_model(name: str, module: torch.nn.Module, input_names: Sequence[str]) -> Model:
    """A torch module called with keyword inputs; its outputs flattened (pytree order)."""

    def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(**{k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()})
        leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return [t.detach().float().numpy() if t.is_floating_point() else t.numpy() for t in leaves]

    return Model(name, list(input_names), [], run)


@dataclass
class OutputMetrics:
    """How one output of the quantized model compares with the FP model's."""

    name: str
    cosine_mean: float
    cosine_min: float
    rel_error: float
    top1_agreement: float | None = None


@dataclass
class EvalResult:
    fp: str
    quant: str
    task: str
    samples: int
    outputs: list[OutputMetrics] = field(default_factory=list)
    perplexity_fp: float | None = None
    perplexity_quant: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A plain-text summary for people."""
        lines = [f"{self.samples} samples; {self.quant} vs {self.fp} (task: {self.task})"]
        lines.append(f"{'output':24s} {'cos mean':>9s} {'cos min':>9s} {'rel err':>9s} {'top-1':>7s}")
        for o in self.outputs:
            top1 = "—" if o.top1_agreement is None else f"{o.top1_agreement:.4f}"
            lines.append(
                f"{o.name[:24]:24s} {o.cosine_mean:9.5f} {o.cosine_min:9.5f} {o.rel_error:9.2e} {top1:>7s}"
            )
        if self.perplexity_fp is not None and self.perplexity_quant is not None:
            delta = 100 * (self.perplexity_quant / self.perplexity_fp - 1)
            lines.append(
                f"perplexity: FP {self.perplexity_fp:.3f}, quantized {self.perplexity_quant:.3f} ({delta:+.1f}%)"
            )
        return "\n".join(lines)


class _Accumulator:
    """Streams one output's batches into cosine / relative-error / top-1 sums."""

    def __init__(self, name: str, top1: bool) -> None:
        self.name, self.top1 = name, top1
        self.cosines: list[np.ndarray] = []
        self.diff2 = self.ref2 = 0.0
        self.agree = self.total = 0

    def update(self, ref: np.ndarray, got: np.ndarray, mask: np.ndarray | None) -> None:
        if ref.shape != got.shape:
            msg = f"output '{self.name}': the models disagree on its shape ({ref.shape} vs {got.shape})"
            raise ConfigError(msg)
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        keep = mask is not None and ref.ndim >= 3 and ref.shape[:2] == mask.shape
        if keep:  # zero the padded positions in both, so they count for nothing
            m = mask.reshape(*mask.shape, *([1] * (ref.ndim - 2))).astype(np.float64)
            ref64, got64 = ref64 * m, got64 * m
        a, b = ref64.reshape(len(ref64), -1), got64.reshape(len(got64), -1)
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        self.cosines.append(np.where(denom > 0, (a * b).sum(1) / np.maximum(denom, 1e-300), 1.0))
        self.diff2 += float(((a - b) ** 2).sum())
        self.ref2 += float((a**2).sum())
        if self.top1 and ref.ndim >= 2:
            same = ref.argmax(-1) == got.argmax(-1)
            valid = mask.astype(bool) if keep else np.ones(same.shape, dtype=bool)
            self.agree += int((same & valid).sum())
            self.total += int(valid.sum())

    def result(self) -> OutputMetrics:
        cos = np.concatenate(self.cosines)
        rel = math.sqrt(self.diff2 / self.ref2) if self.ref2 > 0 else 0.0
        top1 = self.agree / self.total if self.total else None
        return OutputMetrics(self.name, float(cos.mean()), float(cos.min()), rel, top1)


def token_nll(logits: np.ndarray, ids: np.ndarray, mask: np.ndarray | None) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[:, 1:] under logits[:, :-1], and the token count."""
    lg = torch.from_numpy(np.ascontiguousarray(logits[:, :-1])).float()
    target = torch.from_numpy(np.ascontiguousarray(ids[:, 1:])).long()
    nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), target.reshape(-1), reduction="none")
    if mask is not None:
        valid = torch.from_numpy(np.ascontiguousarray(mask[:, 1:])).reshape(-1) != 0
        nll = nll[valid]
    return float(nll.sum()), int(nll.numel())


def _mask(feeds: Mapping[str, np.ndarray]) -> np.ndarray | None:
    return next((np.asarray(feeds[k]) for k in MASK_KEYS if k in feeds), None)


def _lm_output(outputs: Sequence[np.ndarray], ids: np.ndarray) -> int:
    """Index of the next-token logits: rank 3 [batch, seq, vocab] with vocab above every token id."""
    for i, y in enumerate(outputs):
        if y.ndim == 3 and y.shape[:2] == ids.shape and y.shape[-1] > int(ids.max()):
            return i
    msg = (
        "--task lm: no output looks like next-token logits [batch, seq, vocab > max token id]; "
        f"output shapes: {[tuple(y.shape) for y in outputs]}"
    )
    raise ConfigError(msg)


def check_inputs(model: Model, chunk: Mapping[str, np.ndarray], origin: str) -> None:
    missing = sorted(set(model.input_names) - set(chunk))
    extra = sorted(set(chunk) - set(model.input_names))
    if missing or extra:
        problems = [f"missing '{m}'" for m in missing] + [f"unknown '{e}'" for e in extra]
        msg = f"{origin}: arrays {sorted(chunk)} do not match the inputs of {model.name} ({'; '.join(problems)})"
        raise CalibrationError(msg)


def _run(model: Model, feeds: Mapping[str, np.ndarray], index: int) -> list[np.ndarray]:
    try:
        return model.run(feeds)
    except Exception as exc:  # noqa: BLE001 - runtimes raise many types; name the model and batch
        shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        msg = f"{model.name} failed on batch {index} {shapes}: {type(exc).__name__}: {first}"
        raise ModelLoadError(msg) from None


def compare(
    fp: Model,
    quant: Model,
    chunks: Sequence[Mapping[str, np.ndarray]],
    *,
    task: Task = Task.AUTO,
    batch_size: int = 8,
    origin: str = "data",
    progress: bool = False,
) -> EvalResult:
    """Run both models over the data and compare their outputs."""
    from tqdm.auto import tqdm

    batches = []
    for chunk in chunks:
        check_inputs(fp, chunk, origin)
        check_inputs(quant, chunk, origin)
        batches += [{k: np.asarray(v) for k, v in b.items()} for b in split_rows(chunk, batch_size)]
    if not batches:
        msg = f"{origin}: no samples"
        raise CalibrationError(msg)
    accs: list[_Accumulator] | None = None
    nll = {"fp": [0.0, 0], "quant": [0.0, 0]}
    lm_index = None
    samples = 0
    for i, feeds in enumerate(tqdm(batches, desc="eval", unit="batch", disable=not progress, leave=False)):
        ref, got = _run(fp, feeds, i), _run(quant, feeds, i)
        if len(ref) != len(got):
            msg = f"{quant.name} has {len(got)} outputs, {fp.name} has {len(ref)}"
            raise ConfigError(msg)
        mask = _mask(feeds)
        if accs is None:
            names = fp.output_names or quant.output_names or [f"output_{i}" for i in range(len(ref))]
            if task is Task.LM:
                if "input_ids" not in feeds:
                    msg = f"--task lm: {origin} holds no 'input_ids' array"
                    raise ConfigError(msg)
                lm_index = _lm_output(ref, feeds["input_ids"])
            accs = [
                _Accumulator(n, task is Task.CLASSIFY or i == lm_index or "logit" in n.lower())
                for i, n in enumerate(names)
            ]
        for acc, r, g in zip(accs, ref, got, strict=True):
            if np.issubdtype(r.dtype, np.floating):
                acc.update(r, g, mask)
        if lm_index is not None:
            for key, outs in (("fp", ref), ("quant", got)):
                s, c = token_nll(outs[lm_index], feeds["input_ids"], mask)
                nll[key][0] += s
                nll[key][1] += c
        samples += leading_size(feeds) or 1
    assert accs is not None
    result = EvalResult(fp.name, quant.name, task.value, samples, [a.result() for a in accs if a.cosines])
    if lm_index is not None and nll["fp"][1]:
        result.perplexity_fp = math.exp(nll["fp"][0] / nll["fp"][1])
        result.perplexity_quant = math.exp(nll["quant"][0] / nll["quant"][1])
    return result
