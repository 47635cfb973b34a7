#!/usr/bin/env bash
# Runs the demo; extra arguments go to `python -m modeling_moe.demo`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m modeling_moe.demo "$@"
