#!/usr/bin/env bash
# Runs the test suite; extra arguments go to pytest (e.g. `bash scripts/test.sh -k tokenization` or
# `bash scripts/test.sh tests/test_tokenization.py`). Without a path pytest runs setup.cfg's testpaths, tests/.
# TEST_WORKERS (default 2, the CI machine's cores) test processes share the tests (pytest-xdist; work stealing, as a
# few tests take minutes); TEST_WORKERS=0 runs them in this process. The ten slowest tests are listed at the end
# (CI has 20 minutes: trim those first).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m pytest -q -x -n "${TEST_WORKERS:-2}" --dist worksteal --durations=10 "$@"
