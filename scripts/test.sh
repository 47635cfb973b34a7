#!/usr/bin/env bash
# Runs the test suite; extra arguments go to pytest (e.g. `bash scripts/test.sh -k tokenization` or
# `bash scripts/test.sh tests/test_tokenization.py`). Without a path pytest runs setup.cfg's testpaths, tests/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m pytest -q -x "$@"
