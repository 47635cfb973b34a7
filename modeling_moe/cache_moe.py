"""Static (preallocated) caches for `generate(..., cache_implementation="static")`: torch.compile / CUDA-graph friendly.

MLA layers cache only what the absorbed decode needs, per token: the `kv_lora_rank` latent and the shared
`qk_rope_head_dim` rotary key, (kv_lora_rank + qk_rope_head_dim) x layers x dtype size bytes; GQA layers cache the
usual per-head keys and values. Every buffer is allocated once, at the first update or by `early_initialization`,
and written in place with `index_copy_` at positions taken from a device tensor, so a decode step has static shapes
and addresses and no host sync: it can be compiled or captured in a CUDA graph. The attention mask (transformers'
`create_causal_mask` covers the whole buffer) hides the positions not filled yet.

This file imports only torch and transformers: `save_pretrained` exports it next to `modeling_moe.py` for
`trust_remote_code` loading.
"""

import torch
from transformers.cache_utils import Cache, StaticCache, StaticLayer


class MoEStaticLayer(StaticLayer):
    """transformers' `StaticLayer` (keys / values [batch, heads, max_cache_len, dim]) that also knows, as a Python
    bool and without reading its device-side length, whether it holds tokens: the MLA attention picks its code path
    (expanded prefill, absorbed decode) from it, so that choice never syncs with the device nor breaks a graph."""

    # `crop` (below) rolls the cache back exactly, so generate()'s deferred stop check may run with a cache that it
    # returns. transformers' StaticLayer says so itself from 5.24 on; 5.17's neither crops nor says it.
    is_croppable = True

    def __init__(self, max_cache_len: int, num_heads: int | None = None, key_dim: int | None = None,
                 value_dim: int | None = None, **kwargs):
        super().__init__(max_cache_len=max_cache_len)
        self.expected_heads, self.expected_key_dim, self.expected_value_dim = num_heads, key_dim, value_dim
        self.holds_tokens = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for name, expected, actual in (
            ("heads", self.expected_heads, key_states.shape[1]),
            ("key dim", self.expected_key_dim, key_states.shape[-1]),
            ("value dim", self.expected_value_dim, value_states.shape[-1]),
        ):
            if expected is not None and actual != expected:
                raise ValueError(f"{type(self).__name__}: expected {name} {expected}, got {actual}")
        super().lazy_initialization(key_states, value_states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.holds_tokens = True
        return keys, values

    def reset(self) -> None:
        super().reset()
        self.holds_tokens = False

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` tokens (a negative count, as transformers' static layers take it) by
        moving the device-side length back: the next update overwrites them and the mask hides them meanwhile."""
        if tokens_to_remove > 0:
            raise ValueError("a static cache layer is cropped with a negative count: the number of tokens to remove")
        if tokens_to_remove:  # crop(0), which the deferred stop check calls every step, launches nothing
            self.cumulative_length.sub_(-tokens_to_remove)

    def bytes_per_token(self) -> int:
        """Bytes this layer stores per cached token (0 before its buffers exist)."""
        if not self.is_initialized:
            return 0
        return sum(t.shape[1] * t.shape[-1] * t.element_size() for t in (self.keys, self.values))


class MoELatentStaticLayer(MoEStaticLayer):
    """One MLA layer: `keys` is the latent [batch, 1, max_cache_len, kv_lora_rank] and `values` the rotary key
    [batch, 1, max_cache_len, qk_rope_head_dim] (the names transformers' generic cache code uses)."""

    def __init__(self, max_cache_len: int, kv_lora_rank: int | None = None, qk_rope_head_dim: int | None = None,
                 **kwargs):
        super().__init__(max_cache_len, num_heads=1, key_dim=kv_lora_rank, value_dim=qk_rope_head_dim)

    @property
    def latent(self) -> torch.Tensor | None:
        return self.keys

    @property
    def k_rope(self) -> torch.Tensor | None:
        return self.values


class MoEStaticCache(StaticCache):
    """The static cache of modeling_moe models, built by `generate()` for `cache_implementation="static"` (also
    usable directly: `MoEStaticCache(config=model.config, max_cache_len=...)` passed as the model's cache).

    MLA models get `MoELatentStaticLayer`s (latent + rotary key per token), GQA models `MoEStaticLayer`s (per-head
    keys and values). Unlike transformers' `StaticCache`, `early_initialization` knows the MLA shapes (the key and
    value sizes differ), so the buffers can be allocated before a prefill or a graph capture.
    """

    def __init__(self, config, max_cache_len: int, offloading: bool = False, offload_only_non_sliding: bool = True,
                 **kwargs):
        text_config = config.get_text_config(decoder=True)
        self.attention_type = getattr(text_config, "attention_type", "mla")
        if self.attention_type == "mla":
            self.layer_shapes = ((1, text_config.kv_lora_rank), (1, text_config.qk_rope_head_dim))
            layer = lambda: MoELatentStaticLayer(  # noqa: E731
                max_cache_len, text_config.kv_lora_rank, text_config.qk_rope_head_dim
            )
        else:
            heads, head_dim = text_config.num_key_value_heads, text_config.head_dim
            self.layer_shapes = ((heads, head_dim), (heads, head_dim))
            layer = lambda: MoEStaticLayer(max_cache_len)  # noqa: E731 (heads may be sharded by tensor parallelism)
        Cache.__init__(
            self,
            layers=[layer() for _ in range(text_config.num_hidden_layers)],
            offloading=offloading,
            offload_only_non_sliding=offload_only_non_sliding,
        )

    def early_initialization(self, batch_size: int, num_heads=None, head_dim=None, dtype: torch.dtype | None = None,
                             device: torch.device | str | None = None):
        """Allocate every layer's buffers now (else at its first update). `num_heads` / `head_dim` (transformers'
        signature) default to the config's; MLA layers always take the config's latent and rotary sizes."""
        (key_heads, key_dim), (value_heads, value_dim) = self.layer_shapes
        if self.attention_type != "mla":
            key_heads = value_heads = num_heads if num_heads is not None else key_heads
            key_dim = value_dim = head_dim if head_dim is not None else key_dim
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        for layer in self.layers:
            if layer.is_initialized:
                continue
            # Zero-length on the sequence dim: only the shapes, dtype and device are read.
            keys = torch.zeros((batch_size, key_heads, 0, key_dim), dtype=dtype, device=device)
            values = torch.zeros((batch_size, value_heads, 0, value_dim), dtype=dtype, device=device)
            layer.lazy_initialization(keys, values)

    def fits(self, batch_size: int, max_cache_len: int, offloading: bool, dtype: torch.dtype, device) -> bool:
        """Whether a generate() call with these settings can reuse this cache (after `reset()`) as it is (judged by
        its first allocated layer; a cache with none is not reused)."""
        layer = next((layer for layer in self.layers if layer.is_initialized), None)
        return (layer is not None and layer.batch_size == batch_size and layer.max_cache_len == max_cache_len
                and self.offloading == offloading and layer.keys.dtype == dtype
                and layer.keys.device == torch.device(device))

    def check_length(self, needed: int, needed_by: str) -> None:
        """A ValueError that says what to do when `needed_by` needs more positions than the buffers hold: the write
        would otherwise fail deep inside the attention with an index error."""
        max_cache_len = self.layers[0].max_cache_len
        if needed > max_cache_len:
            raise ValueError(
                f"{needed_by} needs {needed} cache positions, but this MoEStaticCache holds max_cache_len="
                f"{max_cache_len}: build it with max_cache_len >= {needed}, or pass no cache and let generate() build "
                'one (cache_implementation="static")'
            )

    def has_cached_tokens(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` already holds tokens, as a Python bool: no device sync, no graph break."""
        return layer_idx < len(self.layers) and self.layers[layer_idx].holds_tokens

    def bytes_per_token(self) -> int:
        """Cache bytes per token over all layers (counts only the layers already allocated)."""
        return sum(layer.bytes_per_token() for layer in self.layers)


__all__ = ["MoEStaticCache", "MoEStaticLayer", "MoELatentStaticLayer"]
