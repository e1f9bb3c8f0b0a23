#!/usr/bin/env bash
# Build the two LeRobot virtual environments used by generate.py (outside the repo).
# Usage: bash tests/data/lerobot/setup_envs.sh [v3|v21|all] [ENV_ROOT]   (default: all /work/lerobot_envs)
# Needs only PyPI. LeRobot itself is installed with --no-deps; its run-time requirements for the dataset
# code are listed explicitly below (taken from `importlib.metadata.requires("lerobot")`, trimmed to what
# lerobot.datasets imports). The exact versions that produced the committed fixtures are in
# requirements-v3.txt / requirements-v21.txt next to this file (pip freeze).
set -euo pipefail
WHICH="${1:-all}"
ENV_ROOT="${2:-/work/lerobot_envs}"
PY312="${PY312:-/root/.pyenv/versions/3.12.1/bin/python}"
PY311="${PY311:-/root/.pyenv/versions/3.11.7/bin/python}"
mkdir -p "$ENV_ROOT"

if [[ "$WHICH" == v3 || "$WHICH" == all ]]; then
  # LeRobot 0.6.1 (writes codebase_version v3.0). Requires Python >= 3.12.
  "$PY312" -m venv "$ENV_ROOT/v3"
  P="$ENV_ROOT/v3/bin/pip"
  "$P" install --no-deps lerobot==0.6.1
  # lerobot 0.6.1 pins torch<2.12 / torchvision<0.27 but works with 2.14.1 / 0.29.1 for the dataset code.
  # On PyPI this is the CUDA build (~3 GB with nvidia-* wheels); it runs fine on CPU.
  "$P" install torch==2.14.1 torchvision==0.29.1
  "$P" install "numpy>=2.0,<2.3" "Pillow>=10,<13" "setuptools>=71,<82" "datasets>=4.8,<5" "pandas>=2,<3" \
    "pyarrow>=21,<30" "av>=15,<16" "jsonlines>=4,<5" "einops>=0.8,<0.9" "draccus>=0.11.6,<0.12" \
    "huggingface-hub>=1.6,<2" "requests>=2.32,<3" "safetensors>=0.4.3,<1" "packaging>=24.2,<26" \
    "termcolor>=2.4,<4" "tqdm>=4.66,<5" "gymnasium>=1.1.1,<2" "opencv-python-headless>=4.9,<4.14"
  # torchcodec is deliberately NOT installed (needs system FFmpeg shared libs); LeRobot falls back to PyAV.
fi

if [[ "$WHICH" == v21 || "$WHICH" == all ]]; then
  # LeRobot 0.3.3 (writes codebase_version v2.1).
  "$PY311" -m venv "$ENV_ROOT/v21"
  P="$ENV_ROOT/v21/bin/pip"
  "$P" install --no-deps lerobot==0.3.3
  # torch 2.7.1 / torchvision 0.22.1 are required: LeRobot 0.3.3's "pyav" backend decodes through
  # torchvision.io.VideoReader, which newer torchvision (>= 0.24) no longer has.
  "$P" install torch==2.7.1 torchvision==0.22.1
  "$P" install "numpy<2.3" "Pillow<12" "setuptools<81" "datasets>=2.19,<=3.6.0" "huggingface-hub>=0.34.2,<1.0" \
    "av>=14.2,<16" "jsonlines>=4" "packaging>=24.2" "draccus==0.10.0" "einops>=0.8" "deepdiff>=7.0.1,<9" \
    "imageio[ffmpeg]>=2.34,<3" "termcolor>=2.4,<4" "gymnasium>=0.29.1,<1.0" "opencv-python-headless>=4.9,<4.14" \
    "pandas>=2,<3" pyarrow "safetensors>=0.4.3"
fi
