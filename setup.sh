#!/usr/bin/env bash
# Fresh-machine set-up: ffmpeg (Debian), a .venv with cavmae and its test extras at the CI-pinned versions,
# and a small example set of videos in example/videos (generated locally; no download).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v ffmpeg >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ffmpeg >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
.venv/bin/python -m tests.make_example example/videos
