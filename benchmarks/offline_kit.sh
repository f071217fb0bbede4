#!/bin/bash
# Packs what the GPU checks (benchmarks/gpu_checks.sh) need on an offline CUDA machine whose Python (3.12) already has
# torch, transformers, accelerate and the scientific stack: every other dependency as a Python 3.12 wheel (bitsandbytes
# with its CUDA 13.0 and CPU libraries only, PuLP without its bundled CBC binaries), pycocoevalcap without its Java jars
# (that machine scores without Java), and the built-in model's cache without its weights (config and tokenizer: the
# checks draw random weights of its architecture there). Run it here, from the repository root, with the project's
# environment active; it writes KIT (default .kit), about 32 MB (grpcio and protobuf are 7 MB of it: leave them out where
# that machine's own meet Flower's pins, grpcio >= 1.70 and protobuf >= 5.28, < 7).
set -euo pipefail
kit=${1:-.kit}
mkdir -p "$kit/wheels" "$kit/site"
pins=$(pip list --format=freeze | grep -i -E '^(alembic|annotated[-_]types|bitsandbytes|cffi|cryptography|datasets|defusedxml|dill|dm[-_]tree|dp[-_]accounting|fastapi|flwr|flwr[-_]datasets|gguf|greenlet|grpcio|grpcio[-_]health[-_]checking|iterators|mako|multiprocess|opacus|opt[-_]einsum|peft|prompt[-_]toolkit|protobuf|pulp|pycparser|pycryptodome|pydantic|pydantic[-_]core|sqlalchemy|starlette|tomli|tomli[-_]w|typing[-_]inspection|uvicorn|wcwidth)==')
platforms=(--platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  --platform any -d "$kit/wheels" $pins
python3 - "$kit/wheels" <<'PY'
import glob, os, sys, zipfile
def strip(pattern, drop):
    for path in glob.glob(os.path.join(sys.argv[1], pattern)):
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if not drop(info.filename):
                    dst.writestr(info, src.read(info.filename))
        os.replace(path + ".tmp", path)
strip("bitsandbytes-*.whl", lambda n: n.startswith("bitsandbytes/libbitsandbytes_") and not n.endswith(("cuda130.so", "cpu.so")))
strip("pulp-*.whl", lambda n: n.startswith("pulp/solverdir/"))
PY
coco=$(python3 -c "import pycocoevalcap; print(list(pycocoevalcap.__path__)[0])")
rm -rf "$kit/site/pycocoevalcap" && cp -r "$coco" "$kit/site/" && rm -rf "$kit/site/pycocoevalcap/spice"
find "$kit/site/pycocoevalcap" -name '*.jar' -delete -o -name '*.gz' -delete
cache=$(python3 -c "from fedpipe_core.model import resolve_checkpoint; print(resolve_checkpoint('smollm2-135m'))")
tar cJf "$kit/smollm2-135m.tar.xz" -C "$(dirname "$cache")" --exclude model.safetensors "$(basename "$cache")"
du -sh "$kit"
