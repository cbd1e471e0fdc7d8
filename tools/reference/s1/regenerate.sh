#!/usr/bin/env bash
# Regenerate tests/fixtures/fish-s1-tiny with the reference implementation, in one command:
#
#   bash tools/reference/s1/regenerate.sh [VENV_DIR]      (VENV_DIR defaults to ~/.cache/shoal-reference)
#
# Builds the reference venv first if it is not there (setup.sh), then runs make_fixture.py build into a fresh
# folder and swaps it in place of the old fixture, keeping the hand-written README.md. The reference clip is taken
# from the current fixture (reference.wav is input data, not output); without one, make_fixture.py speaks it with
# espeak-ng and sox. About 3-4 minutes on 2 CPU cores, most of it the determinism replays.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
venv=${1:-$HOME/.cache/shoal-reference}
target=$repo/tests/fixtures/fish-s1-tiny
fresh=$repo/tests/fixtures/.fish-s1-tiny.new

bash "$here/setup.sh" "$venv"

rm -rf "$fresh"
clip=()
if [[ -f $target/reference.wav ]]; then
    mkdir -p "$fresh.clip"
    cp "$target/reference.wav" "$fresh.clip/reference.wav"
    clip=(--clip "$fresh.clip/reference.wav")
fi
"$venv/bin/python" "$here/make_fixture.py" build --out "$fresh" "${clip[@]}"
rm -rf "$fresh.clip"
if [[ -f $target/README.md ]]; then cp "$target/README.md" "$fresh/README.md"; fi
rm -rf "$target"
mv "$fresh" "$target"
echo "fixture regenerated: $target ($(du -sh "$target" | cut -f1))"
