"""The static latent cache (modeling_moe/cache_moe.py) through generate(): what `cache_implementation="static"` builds,
the same tokens as the dynamic cache (greedy and sampled, stopping criteria, left-padded batches), its size per token,
and a compiled decode step without graph breaks (what CUDA graphs need)."""

import pytest
import torch
from transformers import CompileConfig, StoppingCriteria, StoppingCriteriaList

from modeling_moe import modeling_moe
from modeling_moe.cache_moe import MoELatentStaticLayer, MoEStaticCache, MoEStaticLayer
from modeling_moe.modeling_moe import CACHE_FIELD

from .helpers import gqa_config, seeded_model, small_config

PROMPTS = [[5, 17, 33, 8, 61, 12], [44, 9, 70], [7, 81, 23, 23]]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def left_padded(prompts, device="cpu"):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def cache_of(output):
    return getattr(output, CACHE_FIELD)


@pytest.mark.parametrize("make_config", [small_config, gqa_config], ids=["mla", "gqa"])
def test_static_generate_matches_dynamic_and_each_prompt_alone(make_config):
    model = seeded_model(make_config(), dtype=torch.float32)
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    dynamic = model.generate(ids, attention_mask=mask, **kwargs)
    out = model.generate(
        ids, attention_mask=mask, cache_implementation="static", return_dict_in_generate=True, **kwargs
    )
    cache = cache_of(out)
    assert type(cache) is MoEStaticCache
    layer_class = MoELatentStaticLayer if make_config is small_config else MoEStaticLayer
    assert all(type(layer) is layer_class for layer in cache.layers)
    assert out.sequences.tolist() == dynamic.tolist()
    width = ids.shape[1]
    for row, prompt in zip(out.sequences, PROMPTS):  # fresh static caches of other lengths, reused compile sizes
        alone = model.generate(torch.tensor([prompt]), cache_implementation="static", **kwargs)
        assert row[width:].tolist() == alone[0, len(prompt):].tolist()


def test_static_cache_is_reused_across_calls_when_it_fits():
    """A second call with the same batch size writes into the first call's buffers (same addresses: captured CUDA
    graphs replay) and generates what a fresh cache generates; another batch size, or reuse_static_cache=False,
    gets a new cache."""
    model = seeded_model(small_config(), dtype=torch.float32)
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static",
                  return_dict_in_generate=True)
    first = model.generate(ids, attention_mask=mask, **kwargs)
    pointers = [layer.keys.data_ptr() for layer in cache_of(first).layers]
    second = model.generate(ids.flip(0), attention_mask=mask.flip(0), **kwargs)
    assert cache_of(second) is cache_of(first)
    assert [layer.keys.data_ptr() for layer in cache_of(second).layers] == pointers
    model.reuse_static_cache = False
    fresh = model.generate(ids.flip(0), attention_mask=mask.flip(0), **kwargs)
    assert cache_of(fresh) is not cache_of(second)
    assert second.sequences.tolist() == fresh.sequences.tolist()
    model.reuse_static_cache = True
    other = model.generate(ids[:2], attention_mask=mask[:2], **kwargs)
    assert cache_of(other) is not cache_of(second)
    assert other.sequences.tolist() == fresh.sequences.flip(0)[:2].tolist()


def test_copies_leave_the_kept_cache_behind():
    """copy.deepcopy after a static generate copies the weights, not the cache the model keeps for its next call
    (TRL deep-copies models into reference models); the copy builds its own and generates the same tokens."""
    import copy

    model = seeded_model(small_config(), dtype=torch.float32)
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static")
    expected = model.generate(ids, attention_mask=mask, **kwargs)
    kept = model._static_cache
    copied = copy.deepcopy(model)
    assert getattr(copied, "_static_cache", None) is None and model._static_cache is kept
    assert copied.generate(ids, attention_mask=mask, **kwargs).tolist() == expected.tolist()
    assert copied._static_cache is not kept


class StopOnToken(StoppingCriteria):
    """Stops each sequence once it emits `token` (a per-sequence criterion: the others go on)."""

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_generation_config_switch_with_sampling_and_stopping_criteria():
    model = seeded_model(small_config(), dtype=torch.float32)
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.8, pad_token_id=0)

    def sample(**extra):
        torch.manual_seed(1234)
        return model.generate(ids, return_dict_in_generate=True, **kwargs, **extra)

    dynamic = sample().sequences
    stop = int(dynamic[0, ids.shape[1] + 2])  # row 0 stops after 3 new tokens; the others keep going
    criteria = StoppingCriteriaList([StopOnToken(stop)])
    dynamic_stopped = sample(stopping_criteria=criteria).sequences

    model.generation_config.cache_implementation = "static"
    static = sample()
    assert type(cache_of(static)) is MoEStaticCache
    assert static.sequences.tolist() == dynamic.tolist()
    static_stopped = sample(stopping_criteria=criteria).sequences
    assert static_stopped.tolist() == dynamic_stopped.tolist()
    assert static_stopped[0, ids.shape[1] + 3:].eq(0).all()  # padded after its stop token


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_latent_cache_bytes_per_token(dtype):
    """(kv_lora_rank + qk_rope_head_dim) x layers x dtype size per token, preallocated for max_cache_len tokens."""
    config = small_config()
    model = seeded_model(config, dtype=dtype)
    cache = MoEStaticCache(config, max_cache_len=20)
    ids = torch.randint(3, 97, (3, 5))
    with torch.no_grad():
        model(ids, use_cache=True, **{CACHE_FIELD: cache})
    per_token = (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * dtype.itemsize
    assert cache.bytes_per_token() == per_token
    for layer in cache.layers:
        assert layer.latent.shape == (3, 1, 20, config.kv_lora_rank) and layer.latent.dtype == dtype
        assert layer.k_rope.shape == (3, 1, 20, config.qk_rope_head_dim)
    allocated = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert allocated == 3 * 20 * per_token


def test_early_initialized_cache_is_filled_in_place():
    """Buffers allocated before the prefill (as a graph capture needs) keep their addresses through generate()."""
    config = small_config()
    model = seeded_model(config, dtype=torch.float32)
    ids, mask = left_padded(PROMPTS)
    cache = MoEStaticCache(config, max_cache_len=16)
    cache.early_initialization(batch_size=3, dtype=torch.float32, device="cpu")
    assert all(layer.latent.shape == (3, 1, 16, config.kv_lora_rank) for layer in cache.layers)
    assert not cache.has_cached_tokens(0)
    addresses = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers]
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = model.generate(ids, **kwargs, **{CACHE_FIELD: cache})
    assert with_cache.tolist() == model.generate(ids, **kwargs).tolist()
    assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers] == addresses
    assert cache.has_cached_tokens(0) and int(cache.get_seq_length()) == ids.shape[1] + 5
    cache.reset()
    assert not cache.has_cached_tokens(0) and int(cache.get_seq_length()) == 0


@pytest.mark.parametrize("make_config", [small_config, gqa_config], ids=["mla", "gqa"])
def test_a_user_cache_too_short_for_generate_is_a_clear_error(make_config):
    """A cache the caller built holds prompt + max_new_tokens - 1 positions or generate() refuses it before the
    prefill, naming both lengths (it used to fail with an index error at the first decode step past its end)."""
    config = make_config()
    model = seeded_model(config, dtype=torch.float32)
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    needed = ids.shape[1] + 6 - 1
    with pytest.raises(ValueError, match=f"needs {needed} cache positions.*max_cache_len={needed - 1}.*"
                                         f"max_cache_len >= {needed}"):
        model.generate(ids, **kwargs, **{CACHE_FIELD: MoEStaticCache(config, max_cache_len=needed - 1)})
    exact = model.generate(ids, **kwargs, **{CACHE_FIELD: MoEStaticCache(config, max_cache_len=needed)})
    assert exact.tolist() == model.generate(ids, **kwargs).tolist()


def test_a_forward_longer_than_the_cache_is_a_clear_error():
    """A prefill with more tokens than the cache holds names both lengths, before any layer writes."""
    config = small_config()
    model = seeded_model(config, dtype=torch.float32)
    cache = MoEStaticCache(config, max_cache_len=4)
    with pytest.raises(ValueError, match="this forward needs 6 cache positions.*max_cache_len=4"):
        model(torch.randint(3, 97, (2, 6)), use_cache=True, **{CACHE_FIELD: cache})
    assert not cache.has_cached_tokens(0)


def test_compiled_decode_step_has_no_graph_break():
    """generate()'s own compiled decode step (what it captures in CUDA graphs on a GPU), here with fullgraph=True on
    the CPU through the eager backend: no data-dependent branch or shape in the step, the same tokens."""
    model = seeded_model(small_config(), dtype=torch.float32)
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    compile_config = CompileConfig(backend="eager", fullgraph=True, mode=None)
    compile_config._compile_all_devices = True  # generate() compiles on GPUs only otherwise
    static = model.generate(ids, cache_implementation="static", compile_config=compile_config, **kwargs)
    assert hasattr(model, "_compiled_call")
    assert static.tolist() == model.generate(ids, **kwargs).tolist()


class HostEvent:
    """`torch.Event` for the CPU, where every op has finished when it returns: recording and waiting are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args):
        pass

    def synchronize(self):
        HostEvent.waits += 1


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_deferred_stop_check_gives_the_same_tokens(monkeypatch, cache_implementation):
    """generate() with the stop decision one step late (what runs on CUDA) against the synchronous loop: rows that
    stop on EOS at different steps, a batch where all stop before max_new_tokens (the extra step is dropped), and
    one that runs to max_new_tokens. The deferred path is forced on the CPU, with no-op events."""
    model = seeded_model(small_config(), dtype=torch.float32)
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                  cache_implementation=cache_implementation)
    free = model.generate(ids, **kwargs)[:, ids.shape[1]:]
    eos_cases = [None, int(free[0, 3]), [int(free[r, 2 + r]) for r in range(len(PROMPTS))]]

    def run(eos, deferred):
        model.defer_stop_check = deferred
        return model.generate(ids, eos_token_id=eos, **kwargs)

    monkeypatch.setattr(modeling_moe, "DEFERRED_STOP_DEVICES", ("cuda", "mps", "cpu"))
    monkeypatch.setattr(torch, "Event", HostEvent)
    for eos in eos_cases:
        HostEvent.waits = 0
        reference = run(eos, deferred=False)
        assert HostEvent.waits == 0
        deferred = run(eos, deferred=True)
        assert HostEvent.waits > 0  # the deferred check ran
        assert deferred.tolist() == reference.tolist()
    assert reference.shape[1] < ids.shape[1] + 10  # the last case stopped every row on EOS before the budget
    assert modeling_moe.generation_utils.DeferredStopCheck.is_supported(torch.device("cuda"), None, False, False) \
        is False  # transformers' own rule is back after generate


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_generate_with_cuda_graphs_matches_dynamic(dtype):
    """On a GPU, a static cache makes generate() compile the decode step with mode="reduce-overhead" (CUDA graphs)."""
    model = seeded_model(small_config(), dtype=dtype).cuda()
    ids, mask = left_padded(PROMPTS, device="cuda")
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    kwargs.update(return_dict_in_generate=True, output_logits=True)
    dynamic = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert hasattr(model, "_compiled_call") and type(cache_of(static)) is MoEStaticCache
    if dtype == torch.float32:
        assert static.sequences.tolist() == dynamic.sequences.tolist()
    else:  # bf16 rounds differently in the kernel: the prefill's token is the same, the first decode step close
        assert static.sequences[:, ids.shape[1]].tolist() == dynamic.sequences[:, ids.shape[1]].tolist()
        torch.testing.assert_close(static.logits[1].float(), dynamic.logits[1].float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("implementation, dtype, graphs", [
    ("fused", torch.float32, True),
    ("grouped_mm", torch.bfloat16, True),
    ("grouped_mm", torch.float32, False),  # transformers' per-expert fallback reads the group sizes on the host
    ("eager", torch.float32, False),  # the reference loop reads which experts are hit on the host
])
def test_generate_compiles_without_cuda_graphs_when_the_experts_sync(implementation, dtype, graphs):
    """generate()'s default compile config keeps transformers' CUDA graphs (mode "reduce-overhead") only for experts
    that a graph can capture; the others compile without graphs instead of failing at capture."""
    model = seeded_model(small_config(), dtype=dtype)
    model.set_experts_implementation(implementation)
    assert model._default_compile_config().mode == ("reduce-overhead" if graphs else "default")
    assert CompileConfig().mode == "reduce-overhead"  # transformers' default, which the graphs case keeps


@pytest.mark.gpu
def test_gpu_static_generate_with_grouped_mm_in_float32():
    """transformers' grouped_mm experts in float32 with a static cache on a GPU: the compiled step runs without CUDA
    graphs (a capture used to fail on the fallback's host read) and gives the dynamic cache's greedy tokens."""
    model = seeded_model(small_config(), dtype=torch.float32).cuda()
    model.set_experts_implementation("grouped_mm")
    ids, mask = left_padded(PROMPTS, device="cuda")
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert static.tolist() == model.generate(ids, **kwargs).tolist()


@pytest.mark.gpu
def test_gpu_deferred_stop_check_gives_the_same_tokens():
    """On CUDA the stop check is deferred by default (real events, the decode step in CUDA graphs): the same greedy
    tokens as the synchronous loop when rows stop on EOS at different steps."""
    model = seeded_model(small_config(), dtype=torch.float32).cuda()
    ids, mask = left_padded(PROMPTS, device="cuda")
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                  cache_implementation="static")
    free = model.generate(ids, **kwargs)[:, ids.shape[1]:]
    eos = [int(free[r, 2 + 2 * r]) for r in range(len(PROMPTS))]
    model.defer_stop_check = False
    reference = model.generate(ids, eos_token_id=eos, **kwargs)
    model.defer_stop_check = True
    assert model.generate(ids, eos_token_id=eos, **kwargs).tolist() == reference.tolist()


@pytest.mark.gpu
def test_gpu_decode_step_captured_in_a_cuda_graph_matches_eager():
    """A one-token decode step over the static latent cache (the Triton kernel inside), captured with
    torch.cuda.graph and replayed for several tokens, against the same steps run eagerly on another cache. The mask
    is passed 4D (built outside the graph: transformers' mask creation reads the 2D mask on the host); dense layers
    only, so that nothing but attention and the cache is under test."""
    config = small_config(first_k_dense_replace=3)
    model = seeded_model(config, dtype=torch.float32).cuda()
    ids, mask = left_padded(PROMPTS, device="cuda")
    batch, width, steps, max_len = ids.shape[0], ids.shape[1], 4, 16
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    next_ids = torch.randint(3, 97, (batch, steps), device="cuda")

    def prefilled():
        cache = MoEStaticCache(config, max_cache_len=max_len)
        with torch.no_grad():
            model(ids, attention_mask=mask, position_ids=positions, **{CACHE_FIELD: cache})
        return cache

    def keys_seen(t):  # [B, 1, 1, max_len]: the prompt without its padding, and the t + 1 new tokens
        seen = torch.zeros(batch, max_len, dtype=torch.bool, device="cuda")
        seen[:, :width] = mask.bool()
        seen[:, width : width + t + 1] = True
        return seen[:, None, None, :]

    def step(cache, token, position, attention_mask):
        return model(token, attention_mask=attention_mask, position_ids=position, **{CACHE_FIELD: cache}).logits

    eager_cache, graph_cache, warm_cache = prefilled(), prefilled(), prefilled()
    with torch.no_grad():
        eager = [
            step(eager_cache, next_ids[:, t : t + 1], positions[:, -1:] + 1 + t, keys_seen(t)) for t in range(steps)
        ]

        token, position, seen = next_ids[:, :1].clone(), positions[:, -1:] + 1, keys_seen(0)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (Triton compiles, allocator pools) on a third cache
            step(warm_cache, token, position, seen)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run: graph_cache is still at the prompt's end
            logits = step(graph_cache, token, position, seen)
        captured = []
        for t in range(steps):
            token.copy_(next_ids[:, t : t + 1])
            position.copy_(positions[:, -1:] + 1 + t)
            seen.copy_(keys_seen(t))
            graph.replay()
            captured.append(logits.clone())
    torch.testing.assert_close(torch.cat(captured, 1), torch.cat(eager, 1), rtol=1e-4, atol=1e-4)


def test_deferred_stop_check_with_a_returned_static_cache(monkeypatch):
    """return_dict_in_generate returns the cache: transformers defers the stop check then only for a croppable cache.
    MoEStaticCache is croppable on every transformers (5.17's StaticLayer is not), the tokens and the returned cache's
    length are those of the synchronous loop, and the per-step crop(0) launches nothing."""
    model = seeded_model(small_config(), dtype=torch.float32)
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                  cache_implementation="static", return_dict_in_generate=True)
    free = model.generate(ids, **kwargs).sequences[:, ids.shape[1]:]
    eos = [int(free[r, 2 + r]) for r in range(len(PROMPTS))]
    assert MoEStaticCache(small_config(), max_cache_len=8).is_croppable
    model.defer_stop_check = False
    reference = model.generate(ids, eos_token_id=eos, **kwargs)
    reference_length = int(cache_of(reference).get_seq_length())  # (the next call reuses this cache)
    monkeypatch.setattr(modeling_moe, "DEFERRED_STOP_DEVICES", ("cuda", "mps", "cpu"))
    monkeypatch.setattr(torch, "Event", HostEvent)
    HostEvent.waits = 0
    launches = []  # in-place subtractions: the cache layers' crops that move their length back
    sub = torch.Tensor.sub_
    monkeypatch.setattr(torch.Tensor, "sub_", lambda self, *a, **k: (launches.append(a), sub(self, *a, **k))[1])
    model.defer_stop_check = True
    deferred = model.generate(ids, eos_token_id=eos, **kwargs)
    monkeypatch.undo()
    assert HostEvent.waits > 0  # the deferred check ran
    assert deferred.sequences.tolist() == reference.sequences.tolist()
    assert int(cache_of(deferred).get_seq_length()) == reference_length == deferred.sequences.shape[1] - 1
    assert len(launches) <= len(cache_of(deferred).layers)  # the final crop(-1) alone, not one per step and layer


def test_generate_restores_each_submodule_mode():
    """generate() runs in eval mode and restores the training flags after: each submodule's own, not train() on all."""
    model = seeded_model(small_config(), dtype=torch.float32)
    model.train()
    model.model.embed_tokens.eval()
    model.model.layers[0].eval()
    modes = {name: module.training for name, module in model.named_modules()}
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    assert {name: module.training for name, module in model.named_modules()} == modes
