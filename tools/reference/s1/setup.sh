#!/usr/bin/env bash
# Build a venv that runs the reference implementation of Fish Speech S1, PyPI fish-speech==0.1.0, on CPU.
#
#   bash tools/reference/s1/setup.sh VENV_DIR        (about 2.5 GB and a few minutes; safe to rerun)
#
# What goes in: CPU torch 2.13.0 (always pinned: an unpinned torch resolves to a multi-GB CUDA build), the
# reference's runtime dependencies at the versions pinned in requirements.txt, fish-speech 0.1.0 itself without
# its declared dependencies, and the CPU torchaudio stand-in from ./torchaudio. A finished venv holds the marker
# file .reference-ready; `shoal bench` and regenerate.sh look for it.
set -euo pipefail

venv=${1:?usage: setup.sh VENV_DIR}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
marker=$venv/.reference-ready

if [[ -f $marker ]]; then
    echo "reference venv already built: $venv"
    exit 0
fi

python=${PYTHON:-python3}
echo "building the reference venv in $venv (python: $($python --version 2>&1))"
[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
install() { "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }

install --upgrade pip
install torch==2.13.0
# The pin list is a complete runtime closure of the reference, so it goes in without resolving dependencies:
# nothing outside it is pulled in (in particular no torchaudio and no second torch).
install --no-deps -r "$here/requirements.txt"
install --no-deps fish-speech==0.1.0

# The torchaudio stand-in, copied into site-packages as a plain package.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$venv/bin/python" -m pip uninstall --quiet --yes torchaudio >/dev/null 2>&1 || true
rm -rf "$site/torchaudio"
mkdir -p "$site/torchaudio"
cp "$here"/torchaudio/*.py "$site/torchaudio/"

# fish_speech.models.dac.modded_dac calls pyrootutils.setup_root(__file__, indicator=".project-root") when it is
# imported; the search walks up from the package, so a marker in site-packages satisfies it.
touch "$site/.project-root"

# Smoke test: everything the harness imports must import, with the CPU torch.
"$venv/bin/python" - <<'PY'
import torch, torchaudio
from fish_speech.inference_engine import TTSInferenceEngine  # noqa: F401
from fish_speech.models.dac.inference import load_model  # noqa: F401
from fish_speech.models.text2semantic.inference import launch_thread_safe_queue  # noqa: F401
from fish_speech.models.text2semantic.llama import DualARTransformer  # noqa: F401
assert torch.__version__.startswith("2.13.0") and not torch.version.cuda, torch.__version__
assert torchaudio.list_audio_backends() == ["soundfile"]
print("reference imports fine; torch", torch.__version__)
PY

touch "$marker"
echo "reference venv ready: $venv"
