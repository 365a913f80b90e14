#!/usr/bin/env bash
# Make the peers' virtual environments for the benchmarks (their pins clash with ours):
#
#   .bench/img2dataset  img2dataset 1.47.0 (pins webdataset<0.3, albumentations<2, wandb)
#   .bench/openclip     open_clip_train 3.3.0 as it runs: webdataset 0.2.86 + pandas, with
#                       torch and open_clip_torch taken from our .venv (a .pth file), so the
#                       two trainers run on the very same torch build.
#
# Usage: bash bench/peers.sh   (idempotent; `make bench-peers` runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
mkdir -p .bench

if ! .bench/img2dataset/bin/python -c "import img2dataset" 2>/dev/null; then
  echo "peers: creating .bench/img2dataset (img2dataset==1.47.0)"
  "$PYTHON" -m venv .bench/img2dataset
  .bench/img2dataset/bin/pip install --quiet --upgrade pip
  .bench/img2dataset/bin/pip install --quiet "img2dataset==1.47.0"
fi

if ! .bench/openclip/bin/python -c "import open_clip_train.main, webdataset, pandas" 2>/dev/null; then
  echo "peers: creating .bench/openclip (open_clip_train from our open_clip_torch, webdataset==0.2.86)"
  "$PYTHON" -m venv .bench/openclip
  ours=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  theirs=$(.bench/openclip/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  # Appended to sys.path after the venv's own site-packages, so its webdataset 0.2.86 wins.
  echo "$ours" > "$theirs/webclip-main-venv.pth"
  .bench/openclip/bin/pip install --quiet --upgrade pip
  .bench/openclip/bin/pip install --quiet "webdataset==0.2.86" pandas braceexpand
fi
.bench/img2dataset/bin/python -c "import img2dataset, webdataset; print('peers: img2dataset ok, webdataset', webdataset.__version__)"
.bench/openclip/bin/python -c "import open_clip, webdataset; print('peers: open_clip_train', open_clip.__version__, 'webdataset', webdataset.__version__)"
