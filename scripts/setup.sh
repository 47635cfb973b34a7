# Sourced by scripts/test.sh and scripts/demo.sh: installs modeling-moe, editable, into the repo's .venv and activates it.
# TORCH_SPEC is the torch installed first (default torch==2.13.0, the CPU build where pip finds it in a local wheel
# folder); TORCH_SPEC= keeps whatever torch .venv already has, e.g. a CUDA build.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ -x .venv/bin/python ]] || python3 -m venv .venv
source .venv/bin/activate

TORCH_SPEC="${TORCH_SPEC-torch==2.13.0}"
# Installing torch on its own first keeps the resolver from choosing a torch build for the package's requirements.
[[ -z "$TORCH_SPEC" ]] || python -m pip install -q "$TORCH_SPEC"
if ! python -m pip install -q -e ".[test,triton,math]"; then
    echo "setup.sh: triton could not be installed; continuing without it" >&2
    python -m pip install -q -e ".[test]"
fi
