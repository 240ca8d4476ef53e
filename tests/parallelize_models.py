"""Tiny random Hugging Face causal LMs of every family parallelize supports, built offline from configs.

Shapes hit the odd cases: vocab 101 is divisible by neither 2 nor 4 (padded vocabulary shards); 4 query
heads with 2 KV heads (replicated at TP 4) or 1 (replicated at TP 2 and 4); Qwen3's head_dim 32 makes the
attention width (128) differ from hidden (64); tied heads (Qwen2, Gemma, Gemma2, OPT, GPT-2) and untied
ones. Mistral and Gemma2 get a sliding window shorter than the test sequences, Gemma2 soft-caps attention
scores and logits, GPT-NeoX rotates a quarter of each head (parallel residual). Some families run the eager
attention, which repeats KV heads by num_key_value_groups (SDPA infers it from the shapes), so a wrong
per-rank group count fails there. initializer_range 0.2 (HF's default is 0.02) and noise on the norms and
biases (HF initializes them to constants) make logits O(1-10), so a misplaced weight shows far above rounding.
"""
import torch

VOCAB = 101
_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=64, initializer_range=0.2, pad_token_id=0,
                   bos_token_id=0, eos_token_id=None)


def _configs():
    import transformers as tf

    return {
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig(**_LLAMA_LIKE, num_key_value_heads=2, tie_word_embeddings=False)),
        "mistral": (tf.MistralForCausalLM, tf.MistralConfig(**_LLAMA_LIKE, num_key_value_heads=2, sliding_window=5)),
        "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config(**_LLAMA_LIKE, num_key_value_heads=1, tie_word_embeddings=True,
                                                      attn_implementation="eager")),
        "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config(**_LLAMA_LIKE, num_key_value_heads=2, head_dim=32,
                                                      tie_word_embeddings=False)),
        "phi3": (tf.Phi3ForCausalLM, tf.Phi3Config(**_LLAMA_LIKE, num_key_value_heads=2, attn_implementation="eager")),
        "gemma": (tf.GemmaForCausalLM, tf.GemmaConfig(**_LLAMA_LIKE, num_key_value_heads=1, head_dim=16)),
        "gemma2": (tf.Gemma2ForCausalLM, tf.Gemma2Config(**_LLAMA_LIKE, num_key_value_heads=2, head_dim=16,
                                                         sliding_window=5, attn_logit_softcapping=5.0,
                                                         final_logit_softcapping=3.0, attn_implementation="eager")),
        "gpt_neox": (tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, initializer_range=0.2, bos_token_id=0, eos_token_id=None)),
        "opt": (tf.OPTForCausalLM, tf.OPTConfig(
            vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=64, max_position_embeddings=64, init_std=0.2, pad_token_id=1, bos_token_id=0,
            eos_token_id=None)),
        "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                   initializer_range=0.2, bos_token_id=0, eos_token_id=None)),
        # no tp_kernels table: parallelize translates the base_model_tp_plan of its config
        "granite": (tf.GraniteForCausalLM, tf.GraniteConfig(**_LLAMA_LIKE, num_key_value_heads=2, embedding_multiplier=2.0,
                                                            residual_multiplier=0.5, logits_scaling=2.0)),
    }


TABLE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gpt_neox", "opt", "gpt2"]
FAMILIES = TABLE_FAMILIES + ["granite"]


def build(family: str, seed: int = 0, device=None):
    """The family's tiny model, in eval mode, with seeded random weights (on `device`, e.g. meta)."""
    cls, config = _configs()[family]
    torch.manual_seed(seed)
    if device is not None:
        with torch.device(device):
            return cls(config).eval()
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def from_state_dict(family: str, state_dict):
    """The family's model holding state_dict (ranks rebuild the parent's models from their weights)."""
    model = build(family)
    model.load_state_dict(state_dict)
    return model


# ----------------------------------------------------------------------------------------------------------
# a custom (non-Hugging Face) model and its plan, as the README shows them
# ----------------------------------------------------------------------------------------------------------
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class ToyAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.q = nn.Linear(dim, n_heads * self.head_dim)
        self.k = nn.Linear(dim, n_kv_heads * self.head_dim)
        self.v = nn.Linear(dim, n_kv_heads * self.head_dim)
        self.o = nn.Linear(n_heads * self.head_dim, dim)

    def forward(self, x):  # (B, S, dim)
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, S, head_dim)
        k = self.k(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(o.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))


class ToyBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = ToyAttention(dim, n_heads, n_kv_heads)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.down(F.gelu(self.up(x)))


class ToyModel(nn.Module):
    """A decoder that is no Hugging Face model: parallelize needs the plan below to convert it."""

    def __init__(self, vocab: int = VOCAB, dim: int = 32, n_heads: int = 4, n_kv_heads: int = 2, n_layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(ToyBlock(dim, n_heads, n_kv_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def toy_plan():
    from tp_kernels.parallelize import TPPlan

    return TPPlan(
        layers={"embed": "embedding",
                "blocks.*.attn.q": "q_heads", "blocks.*.attn.k": "kv_heads", "blocks.*.attn.v": "kv_heads",
                "blocks.*.attn.o": "row",
                "blocks.*.up": "column", "blocks.*.down": "row",
                "head": "lm_head"},
        per_rank={"blocks.*.attn": {"n_heads": "heads", "n_kv_heads": "kv_heads"}},  # read by forward's view
        replicated=["blocks.*.norm", "norm"],
    )
