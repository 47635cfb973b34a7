"""MTP self-speculative greedy decoding (modeling_moe.speculative) against plain greedy generate()."""

import pytest
import torch
from transformers import CompileConfig, DynamicCache

from modeling_moe import mtp_speculative_decoding, speculative
from modeling_moe.cache_moe import MoEStaticCache
from modeling_moe.modeling_moe import CACHE_FIELD

from .helpers import seeded_model, small_config

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def drafting_model(mtp_layers=1):
    """A float32 model whose MTP module drafts from the next token's embedding alone (its attention and experts
    silenced, eh_proj passing the embedding half): its drafts agree with the main model often but not always, so
    that both the accept and the reject branch run."""
    model = seeded_model(small_config(num_nextn_predict_layers=mtp_layers), dtype=torch.float32).eval()
    if mtp_layers:
        hidden = model.config.hidden_size
        with torch.no_grad():
            mtp = model.model.mtp_layers[0]
            mtp.eh_proj.weight.zero_()
            mtp.eh_proj.weight[:, :hidden] = torch.eye(hidden)
            mtp.self_attn.o_proj.weight.zero_()
            for name, param in mtp.mlp.named_parameters():
                if "down" in name:
                    param.zero_()
    return model


def prompt(length=9, seed=1):
    return torch.randint(3, 90, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_same_tokens_as_greedy_with_accepted_and_rejected_drafts(seed):
    model, ids = drafting_model(), prompt(seed=seed)
    kwargs = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False)
    expected = model.generate(ids, **kwargs)
    out = model.generate(ids, custom_generate=mtp_speculative_decoding, return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences, expected)
    stats = out.generation_stats
    assert 0 < stats["accepted"] < stats["drafts"]  # both branches ran
    assert stats["forwards"] == 30 - stats["accepted"]  # one new token per forward, two when a draft is accepted
    assert stats["new_tokens"] == 30


@pytest.mark.parametrize("compiled", [False, True], ids=["static", "static-compiled"])
def test_static_caches_and_compiled_steps_give_the_same_tokens_as_greedy(compiled):
    """cache_implementation="static": both caches static (the drafter's only at the MTP layer's index); compiled,
    the verification and draft steps run as fixed-shape graphs (fullgraph through the eager backend here, what a
    GPU captures in CUDA graphs), with the same tokens as plain greedy."""
    model, ids = drafting_model(), prompt(seed=2)
    # grouped_mm: with CUDA present "fused" is the default even for this CPU model, and its CPU reference sorts the
    # routed slots with data-dependent shapes, which fullgraph cannot trace
    model.set_experts_implementation("grouped_mm")
    kwargs = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False)
    expected = model.generate(ids, **kwargs)
    extra = {}
    if compiled:
        compile_config = CompileConfig(backend="eager", fullgraph=True, mode=None)
        compile_config._compile_all_devices = True  # generate() compiles on GPUs only otherwise
        extra = dict(compile_config=compile_config)
    out = model.generate(ids, custom_generate=mtp_speculative_decoding, return_dict_in_generate=True,
                         cache_implementation="static", **kwargs, **extra)
    assert torch.equal(out.sequences, expected)
    assert 0 < out.generation_stats["accepted"] < out.generation_stats["drafts"]
    assert hasattr(model, "_speculative_steps") == compiled
    caches = model._static_cache, model._speculative_draft_cache
    assert all(isinstance(cache, MoEStaticCache) for cache in caches)
    # A second call reuses both static caches (and the compiled steps): the same buffers, the same tokens.
    steps = getattr(model, "_speculative_steps", None)
    again = model.generate(ids, custom_generate=mtp_speculative_decoding, cache_implementation="static",
                           **kwargs, **extra)
    assert torch.equal(again, expected) and getattr(model, "_speculative_steps", None) is steps
    assert (model._static_cache, model._speculative_draft_cache) == caches


@pytest.mark.gpu
def test_gpu_cuda_graph_steps_give_the_same_tokens_as_greedy():
    """On a GPU, generate()'s own compile config (mode "reduce-overhead": the two steps replayed from CUDA graphs,
    whose outputs the next replay overwrites) with the same tokens as plain greedy, over two calls."""
    model, ids = drafting_model(), prompt(seed=3)
    model, ids = model.cuda(), ids.cuda()
    kwargs = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False, cache_implementation="static")
    expected = model.generate(ids, **kwargs)
    for _ in range(2):
        out = model.generate(ids, custom_generate=mtp_speculative_decoding, return_dict_in_generate=True, **kwargs)
        assert torch.equal(out.sequences, expected)
        assert 0 < out.generation_stats["accepted"] < out.generation_stats["drafts"]
    assert hasattr(model, "_speculative_steps")


def test_stops_at_eos_like_greedy():
    model, ids = drafting_model(), prompt()
    free = model.generate(ids, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    eos = int(free[0, ids.shape[1] + 11])
    expected = model.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0)
    got = model.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0,
                         custom_generate=mtp_speculative_decoding)
    assert torch.equal(got, expected) and got[0, -1] == eos


@pytest.mark.parametrize(
    "case, message",
    [("batch", "one sequence at a time"), ("sampling", "greedy"), ("no_mtp", "MTP modules"), ("padding", "unpadded")],
)
def test_unsupported_uses_are_clear_errors(case, message):
    model = drafting_model(mtp_layers=0 if case == "no_mtp" else 1)
    ids = torch.cat([prompt(), prompt(seed=2)]) if case == "batch" else prompt()
    kwargs = dict(max_new_tokens=4, do_sample=case == "sampling", custom_generate=mtp_speculative_decoding)
    if case == "padding":
        kwargs["attention_mask"] = torch.ones_like(ids).index_fill_(1, torch.tensor([0]), 0)
    with pytest.raises(ValueError, match=message):
        model.generate(ids, **kwargs)


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_return_dict_has_the_scores_logits_and_cache_of_greedy(cache_implementation):
    """output_scores / output_logits give one entry per new token, as plain greedy does (they were None), and the
    returned cache holds every token but the last, also when the loop ends on a verification's first token."""
    model, ids = drafting_model(), prompt(seed=2)
    kwargs = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_scores=True,
                  output_logits=True, cache_implementation=cache_implementation)
    for new_tokens in (12, 13):  # one of the two ends on a verification's first token
        kwargs["max_new_tokens"] = new_tokens
        expected = model.generate(ids, **kwargs)
        out = model.generate(ids, custom_generate=mtp_speculative_decoding, **kwargs)
        assert torch.equal(out.sequences, expected.sequences)
        for name in ("scores", "logits"):
            got, want = getattr(out, name), getattr(expected, name)
            assert got is not None and len(got) == len(want) == new_tokens
            torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-4, atol=1e-4)
        assert int(getattr(out, CACHE_FIELD).get_seq_length()) == out.sequences.shape[1] - 1


def test_a_filled_cache_is_a_clear_error():
    """A cache that already holds the prompt's start (prompt caching, a second turn) was extended from position 0,
    silently giving other tokens than greedy."""
    model, ids = drafting_model(), prompt(seed=2)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :5], use_cache=True, **{CACHE_FIELD: cache})
    with pytest.raises(ValueError, match="empty cache"):
        model.generate(ids, max_new_tokens=6, do_sample=False, custom_generate=mtp_speculative_decoding,
                       **{CACHE_FIELD: cache})


@pytest.mark.parametrize("requested", ["output_hidden_states", "output_attentions"])
def test_hidden_states_or_attentions_are_a_clear_error(requested):
    """What the speculative loop does not return is refused by name, not returned as a silent None."""
    model, ids = drafting_model(), prompt(seed=2)
    with pytest.raises(ValueError, match="not hidden states or attentions"):
        model.generate(ids, max_new_tokens=4, do_sample=False, custom_generate=mtp_speculative_decoding,
                       return_dict_in_generate=True, **{requested: True})


def test_a_two_token_prompt_is_prefilled_eagerly(monkeypatch):
    """The compiled verification step takes two tokens: a two-token prompt's prefill must not go through it (it
    would allocate the static cache inside the compiled region, CUDA graphs' memory pool on a GPU)."""
    model = drafting_model()
    model.set_experts_implementation("grouped_mm")
    ids = prompt(length=2, seed=2)
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    expected = model.generate(ids, **kwargs)
    compile_config = CompileConfig(backend="eager", fullgraph=True, mode=None)
    compile_config._compile_all_devices = True
    starts = []
    compiled = speculative._compiled_steps

    def recording_steps(model, config):
        verify, draft = compiled(model, config)

        def step(model, tokens, positions, cache):
            starts.append(int(positions[0, 0]))
            return verify(model, tokens, positions, cache)
        return step, draft

    monkeypatch.setattr(speculative, "_compiled_steps", recording_steps)
    out = model.generate(ids, custom_generate=mtp_speculative_decoding, cache_implementation="static",
                         compile_config=compile_config, **kwargs)
    assert torch.equal(out, expected)
    assert starts and 0 not in starts
