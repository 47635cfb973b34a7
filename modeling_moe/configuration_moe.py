"""Configuration of DeepSeek-style Mixture-of-Experts language models (MLA or GQA attention)."""

from transformers import PretrainedConfig

ATTENTION_TYPES = ("mla", "gqa")
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited")
ROPE_TYPES = ("default", "linear", "yarn")


class MoEConfig(PretrainedConfig):
    r"""
    Configuration of [`MoEModel`] / [`MoEForCausalLM`]. Field names follow transformers' `DeepseekV3Config` wherever the
    concept is the same; the defaults describe a 1.26B-parameter model with 64 routed experts (top-6) and 2 shared ones.

    Attention (`attention_type`):
        - `"mla"`: Multi-head Latent Attention. Keys and values are compressed to a `kv_lora_rank` latent plus one
          shared `qk_rope_head_dim` rotary key; only those are cached. `q_lora_rank=None` gives a plain `q_proj`.
        - `"gqa"`: grouped-query attention with `num_key_value_heads` heads of size `head_dim`.

    Routing (`scoring_func`, `topk_method`):
        - `"softmax"` (DeepSeek-V2) or `"sigmoid"` (DeepSeek-V3) scores in fp32.
        - `"group_limited"` first keeps the `topk_group` best of `n_group` expert groups (ranked by their best score
          with softmax, by the sum of their two best biased scores with sigmoid), then takes the top-k inside them.
        - Selection adds the per-expert `e_score_correction_bias`; the weights come from the unbiased scores,
          normalised when `norm_topk_prob`, then multiplied by `routed_scaling_factor`.

    Load balancing:
        - `bias_update_speed`: aux-loss-free balancing (DeepSeek-V3); `model.update_expert_bias()` moves each expert's
          bias by this amount per optimizer step. 0 disables the counting.
        - `seq_aux_loss_coef`: DeepSeek-V3 sequence-wise balance loss, added to the loss in training.
        - `router_aux_loss_coef`: batch-wise balance loss, computed when `output_router_logits=True` and returned as
          `aux_loss` (TRL's SFT and GRPO trainers read these fields and `num_experts`).
        - Both weigh the mean of the per-layer losses over the MoE layers. DeepSeek's `aux_loss_alpha` weighs their
          sum, so its alpha is `coef / num_moe_layers` (DeepSeek-V2 checkpoints are converted that way).

    Rotary embeddings: `rope_interleave=True` rotates the pairs (0, 1), (2, 3), ... of each head's rotary dimensions,
    DeepSeek's checkpoint layout; `False` rotates (j, j + d/2), which compiles to contiguous loads and trains ~1% faster
    (the rotary kernels of the 1.26B model's step: 2.4 -> 1.3 ms on an H200). Both compute the same function once the
    rotary rows of the query and `kv_a_proj_with_mqa` projections are reordered (`deepseek_checkpoint.
    interleave_rope_rows` and its inverse), which DeepSeek export does.

    Multi-token prediction: `num_nextn_predict_layers` DeepSeek-V3 MTP modules (sharing the embedding and the head)
    add `mtp_loss_weight` times their mean loss in training forwards with labels; they are skipped otherwise, so an
    evaluation loss is the plain language-modelling loss.
    """

    model_type = "modeling_moe"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {"num_experts": "n_routed_experts", "num_local_experts": "n_routed_experts"}

    vocab_size: int = 50257
    hidden_size: int = 1024
    intermediate_size: int = 4096
    moe_intermediate_size: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    attention_type: str = "mla"
    kv_lora_rank: int = 256
    q_lora_rank: int | None = None
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 64
    v_head_dim: int = 64
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 1
    scoring_func: str = "sigmoid"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    bias_update_speed: float = 0.001
    seq_aux_loss_coef: float = 0.0
    router_aux_loss_coef: float = 0.0
    output_router_logits: bool = False
    num_nextn_predict_layers: int = 0
    mtp_loss_weight: float = 0.3
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rope_parameters: dict | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_parameters is None and "rope_scaling" not in kwargs:
            self.rope_parameters = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta", 10000.0)}
        if self.attention_type != "mla" and self.head_dim is None and isinstance(self.num_attention_heads, int):
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        super().__post_init__(**kwargs)
        self.check()

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        if config_dict.get("model_type") in ("deepseek_v2", "deepseek_v3"):
            # A DeepSeek checkpoint's config (`MoEConfig.from_pretrained(folder)`): mapped as loading its weights maps it
            from .deepseek_checkpoint import deepseek_config_to_moe

            config_dict = deepseek_config_to_moe(config_dict).to_dict()
        # transformers sets keyword overrides (`from_pretrained(path, n_group=4)`) after the config was built and checked
        result = super().from_dict(config_dict, **kwargs)
        (result[0] if isinstance(result, tuple) else result).check()
        return result

    def check(self):
        """Derive what follows from the other fields, then `validate()`. The model classes call it again, since
        fields may have been set after construction."""
        if self.attention_type == "mla":
            # transformers' RoPE helpers read `head_dim` as the rotary size; in MLA only the rope part rotates.
            self.head_dim = self.qk_rope_head_dim
        self.validate()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return max(self.num_hidden_layers - self.first_k_dense_replace, 0)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layer `layer_idx` (MTP layers continue the numbering) is MoE unless it is one of the first dense ones."""
        return layer_idx >= self.first_k_dense_replace

    def validate(self):
        """Raise `ValueError` naming the field and what is allowed for every impossible value or combination."""
        _check_choice("attention_type", self.attention_type, ATTENTION_TYPES)
        _check_choice("scoring_func", self.scoring_func, SCORING_FUNCS)
        _check_choice("topk_method", self.topk_method, TOPK_METHODS)
        _check_choice("hidden_act", self.hidden_act, ("silu", "gelu", "relu"))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "n_routed_experts", "num_experts_per_tok",
                     "n_group", "topk_group", "max_position_embeddings"):
            _check_count(name, getattr(self, name), minimum=1)
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            _check_count(name, getattr(self, name), minimum=0)
        for name in ("norm_topk_prob", "output_router_logits", "rope_interleave", "attention_bias", "use_cache",
                     "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        for name in ("bias_update_speed", "seq_aux_loss_coef", "router_aux_loss_coef", "mtp_loss_weight",
                     "attention_dropout", "initializer_range"):
            _check_non_negative(name, getattr(self, name))
        if self.attention_dropout >= 1:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout!r}.")
        _check_positive("routed_scaling_factor", self.routed_scaling_factor)
        _check_positive("rms_norm_eps", self.rms_norm_eps)
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id!r} must be a token id in [0, vocab_size={self.vocab_size}) "
                             "or None.")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(
                f"first_k_dense_replace={self.first_k_dense_replace} must be <= num_hidden_layers="
                f"{self.num_hidden_layers}."
            )
        self._validate_attention()
        self._validate_routing()
        self._validate_rope()

    def _validate_attention(self):
        if self.attention_type == "mla":
            for name in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
                _check_count(name, getattr(self, name), minimum=1)
            if self.q_lora_rank is not None:
                _check_count("q_lora_rank", self.q_lora_rank, minimum=1)
            rotary = self.qk_rope_head_dim
        else:
            _check_count("head_dim", self.head_dim, minimum=1)
            if self.num_attention_heads % self.num_key_value_heads:
                raise ValueError(
                    f"num_attention_heads={self.num_attention_heads} must be divisible by num_key_value_heads="
                    f"{self.num_key_value_heads} (each key/value head serves a whole group of query heads)."
                )
            rotary = self.head_dim
        if rotary % 2:
            field = "qk_rope_head_dim" if self.attention_type == "mla" else "head_dim"
            raise ValueError(f"{field}={rotary} must be even: rotary embeddings rotate pairs of dimensions.")

    def _validate_routing(self):
        experts, k = self.n_routed_experts, self.num_experts_per_tok
        if k > experts:
            raise ValueError(f"num_experts_per_tok={k} must be <= n_routed_experts={experts}.")
        if experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must divide n_routed_experts={experts}.")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be <= n_group={self.n_group}.")
        if self.topk_method == "group_limited":
            per_group = experts // self.n_group
            if k > self.topk_group * per_group:
                raise ValueError(
                    f"num_experts_per_tok={k} must be <= topk_group * experts per group = "
                    f"{self.topk_group * per_group} with topk_method='group_limited'."
                )
            if self.scoring_func == "sigmoid" and per_group < 2:
                raise ValueError(
                    "topk_method='group_limited' with scoring_func='sigmoid' ranks groups by their two best experts: "
                    f"n_routed_experts / n_group must be >= 2, got {per_group}."
                )

    def _validate_rope(self):
        rope = self.rope_parameters
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters must be a dict with 'rope_type' in {ROPE_TYPES}, got {rope!r}.")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        _check_choice("rope_parameters['rope_type']", rope_type, ROPE_TYPES)
        _check_positive("rope_parameters['rope_theta']", rope.get("rope_theta", 10000.0))
        if rope_type in ("linear", "yarn"):
            factor = rope.get("factor")
            if not isinstance(factor, (int, float)) or factor < 1:
                raise ValueError(f"rope_parameters['factor'] must be a number >= 1 for rope_type={rope_type!r}, "
                                 f"got {factor!r}.")


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}.")


def _check_count(name, value, minimum):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _check_positive(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.")


def _check_non_negative(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}.")


__all__ = ["MoEConfig"]
