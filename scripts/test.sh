#!/usr/bin/env bash
# Runs the test suite; extra arguments go to pytest (e.g. `bash scripts/test.sh -k tokenization`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m pytest -q -x tests "$@"
