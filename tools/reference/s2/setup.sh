#!/usr/bin/env bash
# Build a venv that runs the reference implementation of Fish Speech S2 (fish-speech 2.0.0, the GitHub commit
# pinned below) on CPU.
#
#   bash tools/reference/s2/setup.sh [VENV_DIR [FISH_SPEECH_CHECKOUT]]      (a few minutes; safe to rerun)
#
# VENV_DIR defaults to ~/.cache/shoal-reference-s2. fish-speech 2.0.0 is not on PyPI: it is installed editable,
# without its declared dependencies, from a local source tree. FISH_SPEECH_CHECKOUT names one; without it the tree
# is extracted (git archive) from the mirror at $FISH_SPEECH_MIRROR (default /work/.mirror/fishaudio+fish-speech/repo)
# into VENV_DIR/fish-speech. A checkout that is a git work tree must sit at the pinned commit.
#
# What goes in: CPU torch 2.13.0 (always pinned: an unpinned torch resolves to a multi-GB CUDA build), the
# reference's runtime dependencies at the versions pinned in requirements.txt (a complete closure, installed without
# resolving), fish-speech itself, and the CPU torchaudio stand-in shared with the S1 harness (../s1/torchaudio).
# A finished venv holds the marker file .reference-ready; regenerate.sh looks for it.
set -euo pipefail

fish_commit=3dd1f85c402ee6f0a17c2971d3b0dd8d881ca139
venv=${1:-$HOME/.cache/shoal-reference-s2}
checkout=${2:-}
mirror=${FISH_SPEECH_MIRROR:-/work/.mirror/fishaudio+fish-speech/repo}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
marker=$venv/.reference-ready

if [[ -f $marker ]]; then
    echo "reference venv already built: $venv"
    exit 0
fi

python=${PYTHON:-python3}
echo "building the S2 reference venv in $venv (python: $($python --version 2>&1))"
[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
install() { "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }

# The source tree of fish-speech at the pinned commit.
if [[ -z $checkout ]]; then
    if [[ ! -d $mirror ]]; then
        echo "no fish-speech checkout given and no mirror at $mirror:" >&2
        echo "  git clone https://github.com/fishaudio/fish-speech && git -C fish-speech checkout $fish_commit" >&2
        echo "  then: setup.sh $venv path/to/fish-speech" >&2
        exit 2
    fi
    checkout=$venv/fish-speech
    rm -rf "$checkout"
    mkdir -p "$checkout"
    git -C "$mirror" archive "$fish_commit" | tar -x -C "$checkout"
elif git -C "$checkout" rev-parse --git-dir >/dev/null 2>&1; then
    head=$(git -C "$checkout" rev-parse HEAD)
    if [[ $head != "$fish_commit" ]]; then
        echo "$checkout is at $head, not at the pinned commit $fish_commit" >&2
        exit 2
    fi
fi
checkout=$(cd "$checkout" && pwd)
grep -q '^version = "2.0.0"$' "$checkout/pyproject.toml" || { echo "$checkout is not fish-speech 2.0.0" >&2; exit 2; }

install --upgrade pip
install torch==2.13.0
# The pin list is a complete runtime closure of the reference, so it goes in without resolving dependencies:
# nothing outside it is pulled in (in particular no torchaudio and no second torch).
install --no-deps -r "$here/requirements.txt"
# fish-speech's pyproject lists only its top-level packages (fish_speech, tools); its version is static, so
# setuptools-scm needs no git metadata.
SETUPTOOLS_SCM_PRETEND_VERSION=2.0.0 install --no-deps --editable "$checkout"

# The torchaudio stand-in, copied into site-packages as a plain package.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$venv/bin/python" -m pip uninstall --quiet --yes torchaudio >/dev/null 2>&1 || true
rm -rf "$site/torchaudio"
mkdir -p "$site/torchaudio"
cp "$here"/../s1/torchaudio/*.py "$site/torchaudio/"

# Smoke test: everything the harness imports must import, with the CPU torch.
"$venv/bin/python" - <<'PY'
import torch, torchaudio, transformers
from fish_speech.inference_engine import TTSInferenceEngine  # noqa: F401
from fish_speech.models.dac.inference import load_model  # noqa: F401
from fish_speech.models.text2semantic.inference import launch_thread_safe_queue  # noqa: F401
from fish_speech.models.text2semantic.llama import DualARTransformer  # noqa: F401
from fish_speech.tokenizer import FishTokenizer  # noqa: F401
from fish_speech.utils.schema import ServeTTSRequest  # noqa: F401
assert torch.__version__.startswith("2.13.0") and not torch.version.cuda, torch.__version__
assert transformers.__version__ == "4.57.3", transformers.__version__
assert torchaudio.list_audio_backends() == ["soundfile"]
print("reference imports fine; torch", torch.__version__, "transformers", transformers.__version__)
PY

touch "$marker"
echo "reference venv ready: $venv"
