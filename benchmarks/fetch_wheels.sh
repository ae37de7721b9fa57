#!/usr/bin/env bash
# Wheels that the GPU machines' image lacks (it has jax, flax, optax, orbax, chex, absl, scipy,
# pillow, tqdm, ... but none of these), for its Python 3.12 on x86_64, into .whl/ (gitignored).
# Run it here (PyPI is reachable here, not there), then carry .whl to the device:
#   bash benchmarks/fetch_wheels.sh      # ~15 MB
#   run(command="bash benchmarks/gpu_step.sh", carry=[".whl"])
# gpu_step.sh installs them with --no-deps into a private folder only when an import fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
DEST=${DEST:-.whl}
mkdir -p "$DEST"
# Compiled: the wheel for the device's interpreter and platform.
pip download -q --no-deps --only-binary=:all: --dest "$DEST" \
  --python-version "$PY_VERSION" --implementation cp --platform manylinux2014_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
  grain==0.2.18 array-record==0.8.6 simplejpeg==1.9.0
# Pure Python (sdist-only ones are built into py3 wheels here).
pip wheel -q --no-deps --wheel-dir "$DEST" \
  ml_collections==1.1.0 tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 \
  googleapis-common-protos immutabledict==4.3.1 promise==2.3 toml==0.10.2 \
  portpicker==1.6.0 librosa==0.11.0 simple-parsing==0.1.9 docstring-parser tensorboardX==2.6.5
ls -la "$DEST"
du -sh "$DEST"
