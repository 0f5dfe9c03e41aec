#!/usr/bin/env bash
# Installs what sparsetrain needs on a fresh Debian machine with Python 3.10+:
# the real Fashion-MNIST data (Debian's dataset-fashion-mnist), the CPU build of torch, and the package itself
# with its optional training, data, test, export and ONNX (onnx, onnxruntime) dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
# torch 2.13.0 is pinned here (not in pyproject) so pip takes the CPU wheel; any torch >= 2.3 works.
python -m pip install -q torch==2.13.0 -e ".[all]"
