#!/usr/bin/env bash
# Regenerate tests/fixtures/fish-s2-tiny with the reference implementation, in one command:
#
#   bash tools/reference/s2/regenerate.sh [VENV_DIR [FISH_SPEECH_CHECKOUT]]   (VENV_DIR: ~/.cache/shoal-reference-s2)
#
# Builds the reference venv first if it is not there (setup.sh, which takes the same arguments), then runs
# make_fixture.py build into a fresh folder and swaps it in place of the old fixture, keeping the hand-written
# README.md and the folder's .gitignore. reference.wav is input data, not output: it is taken from the current
# fixture, or from tests/fixtures/fish-s1-tiny when there is none (reference_b.wav is derived from it). About 2
# minutes on 2 CPU cores, most of it loading the codec in the determinism replays.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
venv=${1:-$HOME/.cache/shoal-reference-s2}
target=$repo/tests/fixtures/fish-s2-tiny
fresh=$repo/tests/fixtures/.fish-s2-tiny.new

bash "$here/setup.sh" "$venv" ${2:+"$2"}

clip=$target/reference.wav
[[ -f $clip ]] || clip=$repo/tests/fixtures/fish-s1-tiny/reference.wav
rm -rf "$fresh" "$fresh.clip"
mkdir -p "$fresh.clip"
cp "$clip" "$fresh.clip/reference.wav"
"$venv/bin/python" "$here/make_fixture.py" build --out "$fresh" --clip "$fresh.clip/reference.wav"
rm -rf "$fresh.clip"
for keep in README.md .gitignore; do
    if [[ -f $target/$keep ]]; then cp "$target/$keep" "$fresh/$keep"; fi
done
rm -rf "$target"
mv "$fresh" "$target"
echo "fixture regenerated: $target ($(du -sh "$target" | cut -f1))"
