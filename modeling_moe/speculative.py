"""Self-speculative greedy decoding with the multi-token-prediction module (DeepSeek-V3's MTP used as the drafter).

    from modeling_moe import mtp_speculative_decoding
    out = model.generate(input_ids, custom_generate=mtp_speculative_decoding, max_new_tokens=128)

Each main-model forward verifies one drafted token and proposes the next: with the main model's final hidden state
h_t at the last verified position and the embedding of the token it predicts, x_{t+1}, the first MTP module drafts
x_{t+2}; the next forward runs [x_{t+1}, draft] together. When the main model's own prediction at x_{t+1}'s position
equals the draft, both it and the prediction after the draft are kept (two tokens for one forward); otherwise only
the main model's prediction is kept and the draft's cache entry is dropped. Every kept token is the main model's
argmax given the kept prefix, so the output is the plain greedy output (up to floating-point ties).

Scope: batch size 1 without padding, greedy decoding (`do_sample=False`); the main model and the MTP module each keep
their own cache. With `cache_implementation="static"` both caches are static latent caches and, where generate()
compiles its decode step (a GPU, or `compile_config` forcing it), the two-token verification and the one- or
two-token draft run as compiled steps of fixed shapes (CUDA graphs with the default "reduce-overhead" mode), the
prefills eagerly. It pays where a decode step is latency-bound (batch 1) and the MTP module was trained: the
acceptance rate is returned in `generation_stats` of the output when `return_dict_in_generate=True`.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .cache_moe import MoEStaticCache
from .modeling_moe import CACHE_FIELD

__all__ = ["mtp_speculative_decoding"]


def _check(model, input_ids, generation_config, model_kwargs):
    if not getattr(model.model, "mtp_layers", None):
        raise ValueError("mtp_speculative_decoding needs a model with MTP modules (config.num_nextn_predict_layers >= 1).")
    if input_ids.shape[0] != 1:
        raise ValueError(f"mtp_speculative_decoding decodes one sequence at a time, got a batch of {input_ids.shape[0]}.")
    if generation_config.do_sample or (generation_config.num_beams or 1) > 1:
        raise ValueError("mtp_speculative_decoding is greedy: use do_sample=False and num_beams=1.")
    if generation_config.return_dict_in_generate and (generation_config.output_hidden_states
                                                      or generation_config.output_attentions):
        raise ValueError("mtp_speculative_decoding returns sequences, scores, logits and the cache, not hidden states "
                         "or attentions: use output_hidden_states=False and output_attentions=False.")
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("mtp_speculative_decoding takes an unpadded prompt (attention_mask all ones).")
    cache = model_kwargs.get(CACHE_FIELD)
    if cache is not None and (cache.has_cached_tokens(0) if isinstance(cache, MoEStaticCache)
                              else int(cache.get_seq_length()) > 0):
        raise ValueError("mtp_speculative_decoding starts from an empty cache: the MTP drafter needs the main model's "
                         "hidden states over the whole prompt. Pass the full prompt without a filled cache.")


def _verify(model, tokens, positions, cache):
    """The main model on new tokens: final hidden states (norm applied) and the logits of the last two positions (a
    verification needs two, a prefill one)."""
    hidden = model.model(input_ids=tokens, position_ids=positions, cache=cache, use_cache=True).last_hidden_state
    return hidden, model.lm_head(hidden[:, -2:])


def _draft(layer, lm_head, hidden, embeds, position_embeddings, mask, cache):
    """The first MTP module on new positions: the logits of its prediction after the last one."""
    out, _ = layer(hidden, embeds, position_embeddings, mask, cache=cache)
    return lm_head(out[:, -1:])


def _copied_out(outputs, step, eager):
    """A compiled step's outputs live in its CUDA graphs' memory pool, which the next replay of either step overwrites;
    the loop keeps them across steps, so they are copied out (a few vectors at batch 1)."""
    if step is eager:
        return outputs
    return tuple(t.clone() for t in outputs) if isinstance(outputs, tuple) else outputs.clone()


def _compiled_steps(model, compile_config):
    """(verify, draft) compiled as generate() compiles its decode step, once per model and compile config."""
    cached = getattr(model, "_speculative_steps", None)
    if cached is None or cached[0] != compile_config:
        options = compile_config.to_dict()
        cached = (compile_config, torch.compile(_verify, **options), torch.compile(_draft, **options))
        model._speculative_steps = cached
    return cached[1], cached[2]


class _MainModel:
    """The main model over its cache; fixed-shape steps (the two-token verification) through `step`."""

    def __init__(self, model, cache, step=_verify):
        self.model, self.cache, self.step = model, cache, step

    def __call__(self, tokens: torch.Tensor, start: int):
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).unsqueeze(0)
        # The prompt pass (start 0) runs eagerly whatever its length: a compiled prefill would allocate the static
        # cache's buffers inside the compiled region (and a two-token prompt would share the verification's graph).
        forward = self.step if tokens.shape[1] == 2 and start > 0 else _verify
        return _copied_out(forward(self.model, tokens, positions, self.cache), forward, _verify)


class _Drafter:
    """The first MTP module over its own cache: position i takes the main model's hidden state at i and the
    embedding of token i + 1, and predicts token i + 2. With a static main cache its cache is static too (of the
    same length, only the MTP layer's entry allocated) and one- or two-position drafts go through `step`."""

    def __init__(self, model, main_cache, step=_draft):
        self.model = model
        self.layer = model.model.mtp_layers[0]
        self.static_length = None
        if isinstance(main_cache, MoEStaticCache):
            self.static_length = main_cache.layers[0].max_cache_len
            self.cache, self.step = self._static_cache(), step
        else:
            self.cache, self.step = DynamicCache(), _draft

    def _static_cache(self) -> MoEStaticCache:
        """The MTP layer's static cache, reused across calls like the main one (`reuse_static_cache`)."""
        config = copy.copy(self.model.config)
        config.num_hidden_layers = self.layer.self_attn.layer_idx + 1  # the MTP layer's cache index
        return self.model.reused_static_cache("_speculative_draft_cache", 1, self.static_length, False,
                                              lambda: MoEStaticCache(config, self.static_length))

    def __call__(self, hidden: torch.Tensor, next_tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Logits [1, 1, vocab] of the draft after positions start .. start + n - 1 (the cache holds 0 .. start - 1)."""
        base = self.model.model
        embeds = base.embed_tokens(next_tokens)
        new = embeds.shape[1]
        positions = torch.arange(start, start + new, device=embeds.device).unsqueeze(0)
        # Built here rather than by create_causal_mask, which sizes the mask from the cache's layer 0 (the MTP
        # layer's entries live at its own index, num_hidden_layers): key j sits at position j in either cache.
        keys = torch.arange(self.static_length or start + new, device=embeds.device)
        mask = (keys[None, :] <= positions[0, :, None])[None, None]  # [1, 1, new, keys], True = attend
        draft = self.step if new <= 2 and start > 0 else _draft  # a prompt pass (start 0) has its own length
        logits = draft(self.layer, self.model.lm_head, hidden, embeds, base.rotary_emb(embeds, positions), mask,
                       self.cache)
        return _copied_out(logits, draft, _draft)


@torch.no_grad()
def mtp_speculative_decoding(model, input_ids, logits_processor, stopping_criteria, generation_config,
                             synced_gpus=False, streamer=None, **model_kwargs):
    """A `generate(custom_generate=...)` decoding loop (see the module docstring). Returns the sequences, or a
    `GenerateDecoderOnlyOutput` with `generation_stats` (forwards, drafts accepted) when `return_dict_in_generate`."""
    _check(model, input_ids, generation_config, model_kwargs)
    cache = model_kwargs.get(CACHE_FIELD)  # the cache generate() prepared, under this transformers' keyword
    cache = cache if cache is not None else DynamicCache(config=model.config)
    if isinstance(cache, MoEStaticCache) and model._valid_auto_compile_criteria(model_kwargs, generation_config):
        verify, draft = _compiled_steps(model, generation_config.compile_config or model._default_compile_config())
        main, drafter = _MainModel(model, cache, verify), _Drafter(model, cache, draft)
    else:
        main, drafter = _MainModel(model, cache), _Drafter(model, cache)
    sequence = input_ids
    record = generation_config.return_dict_in_generate
    all_scores = () if record and generation_config.output_scores else None
    all_logits = () if record and generation_config.output_logits else None

    def keep(logits: torch.Tensor) -> bool:
        """Append the processed argmax of `logits` [1, vocab]; whether generation must stop."""
        nonlocal sequence, all_scores, all_logits
        logits = logits.float()
        if all_logits is not None:
            all_logits += (logits.clone(),)
        scores = logits_processor(sequence, logits)
        if all_scores is not None:
            all_scores += (scores,)
        sequence = torch.cat([sequence, scores.argmax(dim=-1, keepdim=True)], dim=-1)
        if streamer is not None:
            streamer.put(sequence[:, -1:].cpu())
        return bool(stopping_criteria(sequence, scores).all())

    prompt_len = input_ids.shape[1]
    hidden, logits = main(input_ids, 0)
    finished = keep(logits[:, -1])
    forwards, accepted = 1, 0
    if not finished:  # MTP over the prompt: position i pairs h_i with token i + 1 (the last: the one just predicted)
        draft_logits = drafter(hidden, sequence[:, 1:], 0)
    capacity = cache.layers[0].max_cache_len if isinstance(cache, MoEStaticCache) else None
    while not finished:
        start = sequence.shape[1] - 1  # the last kept token is not in the main cache yet
        if capacity is not None and start + 2 > capacity:  # a static cache holds max_length - 1 tokens: no draft
            _, logits = main(sequence[:, -1:], start)
            forwards += 1
            finished = keep(logits[:, -1])
            continue
        draft = draft_logits.argmax(dim=-1)
        hidden, logits = main(torch.cat([sequence[:, -1:], draft], dim=-1), start)
        forwards += 1
        finished = keep(logits[:, 0])
        if finished:  # the draft's entry is beyond the kept tokens: dropped, so a returned cache holds them only
            main.cache.crop(-1)
            break
        if sequence[0, -1] == draft[0, 0]:  # the draft is the main model's own choice: keep the next one too
            accepted += 1
            finished = keep(logits[:, 1])
            if not finished:
                draft_logits = drafter(hidden, sequence[:, -2:], start)
        else:  # the draft's entry in the main cache is wrong: drop it
            main.cache.crop(-1)  # a negative count: the tokens to remove (transformers >= 5.17)
            draft_logits = drafter(hidden[:, :1], sequence[:, -1:], start)

    if streamer is not None:
        streamer.end()
    if not generation_config.return_dict_in_generate:
        return sequence
    # As transformers' loop: the cache holds every token but the last; scores / logits one entry per new token.
    output = GenerateDecoderOnlyOutput(sequences=sequence, scores=all_scores, logits=all_logits,
                                       **{CACHE_FIELD: cache if generation_config.use_cache else None})
    output.generation_stats = dict(forwards=forwards, drafts=forwards - 1, accepted=accepted,
                                   new_tokens=sequence.shape[1] - prompt_len)
    return output
