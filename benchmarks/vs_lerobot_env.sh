#!/usr/bin/env bash
# LeRobot's environment for benchmarks/vs_lerobot.py (outside the repository; nothing from it is committed).
# Usage: bash benchmarks/vs_lerobot_env.sh [ENV_DIR]        (default /work/lerobot_envs/v3)
# Python >= 3.12 from the machine image's pyenv; LeRobot 0.6.1 with --no-deps, the requirements its dataset
# code needs (tests/data/lerobot/setup_envs.sh, which this extends) plus what its pi0 / SmolVLA policies import,
# and the torch vlablocks uses (2.14.1), so both sides run the same kernels.
set -euo pipefail
ENV_DIR="${1:-/work/lerobot_envs/v3}"
HERE="$(cd "$(dirname "$0")" && pwd)"
if [[ ! -x "$ENV_DIR/bin/python" ]]; then
  bash "$HERE/../tests/data/lerobot/setup_envs.sh" v3 "$(dirname "$ENV_DIR")"
  if [[ "$(basename "$ENV_DIR")" != v3 ]]; then mv "$(dirname "$ENV_DIR")/v3" "$ENV_DIR"; fi
fi
# the policies import transformers (PaliGemma, Gemma, SmolVLM); this version made the committed figures
"$ENV_DIR/bin/pip" install "transformers==5.5.4"
"$ENV_DIR/bin/python" -c "import lerobot, torch, transformers; print('LeRobot', lerobot.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
