import pytest
import torch


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
