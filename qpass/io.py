"""Writing outputs safely: never over the input, always atomically (temp file + rename)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from qpass.errors import OutputPathError

EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB limit, with headroom
EXTERNAL_KEY = "qpass.external_data"  # ir.Model.meta: the source's external data files (absolute paths)


def check_output_path(out: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """The output path, after checking its folder exists and is writable and it is not an input."""
    out = Path(out)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        msg = f"{out}: output folder '{folder}' does not exist"
        raise OutputPathError(msg)
    if not os.access(folder, os.W_OK):
        msg = f"{out}: output folder '{folder}' is not writable"
        raise OutputPathError(msg)
    for inp in inputs:
        if out.resolve() == Path(inp).resolve():
            msg = f"{out}: the output path is the input model; choose another path (the input is never overwritten)"
            raise OutputPathError(msg)
    return out


@contextlib.contextmanager
def atomic_path(out: str | os.PathLike) -> Iterator[Path]:
    """A temp path beside `out` to write to; renamed over `out` only if the block finishes.

    Any exception (KeyboardInterrupt included) removes the temp file, so a reader of `out`
    sees the old file or the complete new one, never a partial write. The file gets the
    usual permissions (umask), not mkstemp's private 0600.
    """
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, out)
    except OSError as exc:  # disk full, file too large, permissions changed under us
        tmp_path.unlink(missing_ok=True)
        msg = f"{out}: cannot write the output ({exc.strerror or exc}); nothing was written"
        raise OutputPathError(msg) from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def external_data_name(out: str | os.PathLike) -> str:
    """The name of the external data file written beside a model saved at `out`."""
    return f"{Path(out).name}.data"


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def release_external(model: ir.Model) -> None:
    """Unmap every memory-mapped external weight (they are re-mapped on the next read)."""
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value.release()


def _has_external(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def _refuse_overwriting_sources(model: ir.Model, data_path: Path) -> None:
    """Never replace an input's external data file (its weights may even still be read lazily from it)."""
    target = data_path.resolve()
    sources = {Path(p).resolve() for p in model.meta.get(EXTERNAL_KEY, ())}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            sources.add(Path(tensor.path).resolve())
    if target in sources:
        msg = f"{data_path}: the output's external data file is the input model's data file; choose another name"
        raise OutputPathError(msg)


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """A temp folder beside `out` to fill; it takes `out`'s name only if the block finishes.

    An existing `out` is moved aside first and removed after the rename, so `out` is at every
    moment the old folder, the complete new one, or (between two renames) absent: never partial.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        msg = f"{out}: cannot write the output folder ({exc.strerror or exc}); nothing was written"
        raise OutputPathError(msg) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_onnx(
    model: onnx.ModelProto | ir.Model, out: str | os.PathLike, *, external_data: bool | None = None
) -> Path:
    """Write a model atomically. External data (one `<name>.data` file beside it) is used when asked,
    when the model is near protobuf's 2 GiB limit, or when its weights are already external.

    Both files are written into a private temp folder in the target folder, then renamed (data
    first, model last); an interrupted save leaves no partial file under either name. Weights
    are streamed tensor by tensor (onnx-ir), so a big model is never copied whole in memory.
    """
    out = Path(out)
    if isinstance(model, onnx.ModelProto) and not external_data:
        if external_data is False or model.ByteSize() <= EXTERNAL_DATA_THRESHOLD:
            with atomic_path(out) as tmp:
                onnx.save_model(model, str(tmp))
            return out
    irm = ir.serde.deserialize_model(model) if isinstance(model, onnx.ModelProto) else model
    if external_data is None:
        external_data = (
            bool(irm.meta.get(EXTERNAL_KEY))
            or _has_external(irm)
            or _initializer_bytes(irm) > EXTERNAL_DATA_THRESHOLD
        )
    data_name = external_data_name(out)
    if external_data:
        _refuse_overwriting_sources(irm, out.parent / data_name)
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        tmp_model = folder / out.name
        if external_data:
            try:
                ir.save(
                    irm,
                    tmp_model,
                    external_data=data_name,
                    size_threshold_bytes=1024,
                    max_in_flight_bytes=256 << 20,
                )
            finally:
                release_external(irm)
            os.chmod(folder / data_name, 0o666 & ~_umask())
            os.replace(folder / data_name, out.parent / data_name)
        else:
            ir.save(irm, tmp_model)
        os.chmod(tmp_model, 0o666 & ~_umask())
        os.replace(tmp_model, out)
    except OSError as exc:  # disk full, file too large, permissions changed under us
        msg = f"{out}: cannot write the output ({exc.strerror or exc}); nothing was written"
        raise OutputPathError(msg) from exc
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out
