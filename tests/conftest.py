import importlib.util

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_cpu_thread():
    """Tiny shapes: one thread is fastest, and stays so when other jobs share the CPU (a busy OpenMP pool does not)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny preset (GPT-2 tokenizer), randomly initialised and saved with its modeling code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modeling_moe.presets import load_preset_config, preset_path

    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(load_preset_config("tiny")).save_pretrained(folder)
    AutoTokenizer.from_pretrained(preset_path("tiny")).save_pretrained(folder)
    return str(folder)


def route_jit_calls_to_interpreter(monkeypatch):
    """Triton decides at decoration time whether a @triton.jit function is interpreted, and triton is usually
    imported long before a test sets TRITON_INTERPRET=1 (torch._dynamo imports it), so its own jit'd library
    functions (tl.sum, tl.max, tl.cumsum, ...) are compiled-mode objects: calls to them from inside an interpreted
    kernel are routed to interpreted copies.

    Such a call patches the language module of the called function (tl.core for Triton's own) for the interpreter
    and never restores it; a kernel compiled later in the same process would then be built by the interpreter's
    builder. So the patch is taken here in a scope that is undone after the call."""
    from triton.runtime.interpreter import InterpretedFunction, _patch_lang
    from triton.runtime.jit import JITFunction

    interpreted = {}

    def call_interpreted(self, *args, **kwargs):
        if id(self) not in interpreted:  # (a JITFunction's hash is its cache key: not computable in here)
            interpreted[id(self)] = InterpretedFunction(self.fn)
        scope = _patch_lang(self.fn)
        try:
            return interpreted[id(self)](*args, **kwargs)
        finally:
            scope.restore()

    monkeypatch.setattr(JITFunction, "__call__", call_interpreted)


@pytest.fixture
def triton_device(monkeypatch):
    """Where the Triton kernels run: CUDA as it is, else the CPU through the interpreter (TRITON_INTERPRET=1)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    for forcing_the_reference in ("MLA_DECODE_REFERENCE", "CROSS_ENTROPY_REFERENCE", "MOE_ROUTER_REFERENCE",
                                  "ADAMW_REFERENCE"):
        monkeypatch.delenv(forcing_the_reference, raising=False)
    if torch.cuda.is_available():
        yield "cuda"
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    route_jit_calls_to_interpreter(monkeypatch)
    yield "cpu"
