"""tp_kernels.parallelize on tiny random Hugging Face models: logits and greedy generation at TP 1, 2 and 4
equal the unconverted model's, the plan, meta-device conversion, and the errors (nothing half-converted)."""
import copy

import pytest
import torch
import torch.nn as nn

from conftest import spawn_ranks
from tp_kernels.distributed import TPGroup
from tp_kernels.layers import HeadParallelLinear

transformers = pytest.importorskip("transformers", reason="parallelize converts Hugging Face transformers models")

from tp_kernels.parallelize import ParallelPlan, parallelize  # noqa: E402

VOCAB = 101  # odd: the vocabulary shards are padded at every TP degree > 1
N_NEW_TOKENS = 4


def _config(arch: str, n_kv_heads: int = 2):
    """hidden 64, 4 heads, 2 layers; Llama untied, Qwen2 and GPT-2 tied (as their released models). Qwen2 runs
    the eager attention, which repeats KV heads by num_key_value_groups (SDPA infers it from the shapes
    when there is no mask), so a wrong per-rank group count fails there."""
    if arch == "llama":
        return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=n_kv_heads,
                                        max_position_embeddings=64, tie_word_embeddings=False)
    if arch == "qwen2":
        return transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=n_kv_heads,
                                        max_position_embeddings=64, tie_word_embeddings=True,
                                        attn_implementation="eager")
    return transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                   bos_token_id=0, eos_token_id=0)


def _model(arch: str, n_kv_heads: int = 2, seed: int = 0, device=None):
    classes = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
               "gpt2": transformers.GPT2LMHeadModel}
    torch.manual_seed(seed)  # every rank builds the same random weights
    if device is not None:
        with torch.device(device):
            return classes[arch](_config(arch, n_kv_heads)).eval()
    return classes[arch](_config(arch, n_kv_heads)).eval()


def _fake_group(rank: int, world_size: int) -> TPGroup:
    """A TPGroup for planning and meta conversion, which need rank and world size but no collective."""
    return TPGroup(rank=rank, world_size=world_size, name=f"test_parallelize.fake.{rank}.{world_size}")


def _max_error(actual: torch.Tensor, expected_fp64: torch.Tensor) -> float:
    assert torch.isfinite(actual).all(), "non-finite logits"
    return (actual.double() - expected_fp64).abs().max().item()


# ----------------------------------------------------------------------------------------------------------
# parity: logits and generation on every rank
# ----------------------------------------------------------------------------------------------------------
def _parity_rank(tp, arch, n_kv_heads, seed, ids):
    model = _model(arch, n_kv_heads, seed)
    reference64 = copy.deepcopy(model).double()
    with torch.no_grad():
        logits_full = model(ids).logits
        logits_fp64 = reference64(ids).logits
        tokens_full = model.generate(ids, max_new_tokens=N_NEW_TOKENS, do_sample=False, pad_token_id=0)
        parallelize(model, tp)
        logits_tp = model(ids).logits
        tokens_tp = model.generate(ids, max_new_tokens=N_NEW_TOKENS, do_sample=False, pad_token_id=0)
    return logits_tp, logits_full, logits_fp64, tokens_tp, tokens_full


PARITY_CASES = [(1, "llama", 2), (1, "qwen2", 2), (1, "gpt2", 4),
                (2, "llama", 2), (2, "llama", 1), (2, "qwen2", 2), (2, "qwen2", 1), (2, "gpt2", 4),
                (4, "llama", 2), (4, "llama", 1), (4, "qwen2", 2), (4, "gpt2", 4)]


@pytest.mark.parametrize("world_size,arch,n_kv_heads", PARITY_CASES)
def test_logits_and_generation_match_unconverted_model(world_size, arch, n_kv_heads, seed):
    ids = torch.randint(0, VOCAB, (2, 7))
    if world_size == 1:  # in this process: a rank process would import transformers again (~7 s of CPU)
        results = [_parity_rank(TPGroup.single(), arch, n_kv_heads, seed, ids)]
    else:
        results = spawn_ranks(world_size, _parity_rank, arch, n_kv_heads, seed, ids)
    for rank, (logits_tp, logits_full, logits_fp64, tokens_tp, tokens_full) in enumerate(results):
        assert logits_tp.shape == (2, 7, VOCAB)
        # the flash-attention rule: our fp32 error against fp64 is at most twice that of the unconverted fp32
        # model (which sums in another order); 1e-6 absorbs the case where that one happens to be exact
        error_tp, error_full = _max_error(logits_tp, logits_fp64), _max_error(logits_full, logits_fp64)
        assert error_tp <= 2 * error_full + 1e-6, f"rank {rank}: error {error_tp:.3g} vs unconverted {error_full:.3g}"
        assert torch.equal(tokens_tp, tokens_full), f"rank {rank}: greedy generation differs"
        assert tokens_tp.shape == (2, 7 + N_NEW_TOKENS)
    # every rank holds the same logits, bit for bit (same reduction order everywhere)
    assert all(torch.equal(results[0][0], r[0]) for r in results)


# ----------------------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------------------
def test_dry_run_returns_the_plan_and_changes_nothing():
    model = _model("llama", n_kv_heads=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = parallelize(model, _fake_group(1, 2), dry_run=True)
    assert isinstance(plan, ParallelPlan)
    assert all(type(model.get_submodule(s.name)) in (nn.Linear, nn.Embedding) for s in plan.swaps)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    targets = {s.name: (s.target, s.sharding) for s in plan.swaps}
    assert targets["model.embed_tokens"] == ("VocabParallelEmbedding",
                                             "vocab 101 -> 51 rows per rank (padded to 102), all-reduce")
    assert targets["model.layers.1.self_attn.q_proj"] == ("HeadParallelLinear", "4 heads -> 2 per rank")
    assert targets["model.layers.1.self_attn.k_proj"] == ("HeadParallelLinear",
                                                          "1 heads, head 0 replicated on 2 ranks")
    assert targets["model.layers.0.self_attn.o_proj"] == ("RowParallelLinear", "in 64 -> 32 per rank, all-reduce")
    assert targets["model.layers.0.mlp.up_proj"] == ("ColumnParallelLinear", "out 128 -> 64 per rank")
    assert targets["lm_head"][0] == "ParallelLMHead"
    assert len(plan.swaps) == 1 + 2 * 7 + 1
    assert [(c.name, c.attribute, c.full, c.per_rank) for c in plan.attribute_changes] == [
        (f"model.layers.{i}.self_attn", "num_key_value_groups", 4, 2) for i in range(2)]
    assert plan.replicated == ("model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                               "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm",
                               "model.norm")
    text = str(plan)
    assert text.startswith("ParallelPlan: LlamaForCausalLM at tp=2 (rank 1): 16 modules swapped")
    assert "model.layers.1.self_attn.k_proj  Linear(64 -> 16)" in text
    assert "model.layers.0.self_attn.num_key_value_groups: 4 -> 2" in text


def test_gpt2_plan_sets_per_rank_head_counts_and_ties_the_head():
    plan = parallelize(_model("gpt2"), _fake_group(0, 4), dry_run=True)
    changes = {(c.name, c.attribute): (c.full, c.per_rank) for c in plan.attribute_changes}
    assert changes[("transformer.h.1.attn", "num_heads")] == (4, 1)
    assert changes[("transformer.h.1.attn", "split_size")] == (64, 16)
    assert changes[("transformer.h.1.attn", "embed_dim")] == (64, 16)
    swaps = {s.name: s for s in plan.swaps}
    assert swaps["transformer.h.0.attn.c_attn"].target == "QKVParallelLinear"
    assert swaps["lm_head"].sharding.startswith("tied: shares transformer.wte's shard")
    assert "transformer.wpe" in plan.replicated


# ----------------------------------------------------------------------------------------------------------
# meta device
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_meta_model_gets_the_same_plan_and_meta_layers(arch):
    tp = _fake_group(1, 2)
    real_plan = parallelize(_model(arch, n_kv_heads=1), tp, dry_run=True)
    meta = _model(arch, n_kv_heads=1, device="meta")
    assert parallelize(meta, tp, dry_run=True) == real_plan
    parallelize(meta, tp)
    assert all(p.is_meta for p in meta.parameters())
    if arch == "llama":
        k_proj = meta.get_submodule("model.layers.0.self_attn.k_proj")
        assert isinstance(k_proj, HeadParallelLinear) and k_proj.weight.shape == (16, 64)  # 1 KV head, replicated
        assert meta.get_submodule("model.layers.0.self_attn").num_key_value_groups == 2
        assert meta.get_submodule("model.layers.0.mlp.down_proj").weight.shape == (64, 64)
        assert meta.get_submodule("lm_head").weight.shape == (51, 64)
    else:
        assert meta.get_submodule("transformer.h.0.attn.c_attn").weight.shape == (96, 64)
        assert meta.get_submodule("lm_head").weight is meta.get_submodule("transformer.wte").weight


def _meta_then_load_rank(tp, arch, seed, ids):
    full = _model(arch, n_kv_heads=1, seed=seed)
    model = _model(arch, n_kv_heads=1, device="meta")
    plan = parallelize(model, tp, dry_run=True)
    parallelize(model, tp)
    model.to_empty(device="cpu")
    plan.load_from(model, full)
    # the replicated parameters and the buffers (rotary inv_freq, ...) are the caller's to copy
    swapped = {s.name for s in plan.swaps}
    with torch.no_grad():
        for name, param in full.named_parameters():
            if name.rpartition(".")[0] not in swapped:
                model.get_parameter(name).copy_(param)
        for name, buffer in full.named_buffers():
            model.get_buffer(name).copy_(buffer)
        return model(ids).logits, full(ids).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_meta_model_filled_with_load_from_matches(arch, seed):
    ids = torch.randint(0, VOCAB, (1, 5))
    for rank, (logits_tp, logits_full) in enumerate(spawn_ranks(2, _meta_then_load_rank, arch, seed, ids)):
        torch.testing.assert_close(logits_tp, logits_full, atol=1e-5, rtol=1e-5, msg=f"rank {rank}")


# ----------------------------------------------------------------------------------------------------------
# errors: each raises naming what is wrong, and the model is left exactly as it was
# ----------------------------------------------------------------------------------------------------------
def _snapshot(model):
    return [(name, type(m)) for name, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    modules, state = snapshot
    assert [(name, type(m)) for name, m in model.named_modules()] == modules
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_unsupported_architecture_raises():
    model = transformers.GPT2Model(_config("gpt2"))  # the headless GPT-2: no plan for it
    with pytest.raises(TypeError, match="supports LlamaForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel; got GPT2Model"):
        parallelize(model, TPGroup.single())


class _ScaledLinear(nn.Linear):
    """A subclass may change forward, so the plan does not take it for an nn.Linear."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_unmappable_projection_raises_naming_it_and_converts_nothing():
    model = _model("llama")
    old = model.model.layers[1].mlp.up_proj  # the last layer: everything before it would be converted first
    model.model.layers[1].mlp.up_proj = _ScaledLinear(old.in_features, old.out_features, bias=False)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"cannot map module 'model.layers.1.mlp.up_proj' of LlamaForCausalLM: "
                                         r"expected Linear, found _ScaledLinear"):
        parallelize(model, TPGroup.single())
    _assert_unchanged(model, snapshot)


def test_module_outside_the_plan_raises_naming_it():
    model = _model("qwen2")
    model.model.layers[1].self_attn.adapter = nn.Linear(64, 64)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"cannot map module 'model.layers.1.self_attn.adapter' \(Linear\)"):
        parallelize(model, TPGroup.single())
    _assert_unchanged(model, snapshot)


def test_gpt2_cross_attention_is_not_mapped():
    config = _config("gpt2")
    config.add_cross_attention = True
    model = transformers.GPT2LMHeadModel(config).eval()
    with pytest.raises(ValueError, match=r"cannot map module 'transformer.h.0.crossattention.c_attn'"):
        parallelize(model, TPGroup.single())


@pytest.mark.parametrize("arch,world_size,module", [
    ("llama", 3, "model.layers.0.self_attn.q_proj"),   # 4 heads on 3 ranks
    ("llama", 8, "model.layers.0.self_attn.q_proj"),   # more ranks than query heads
    ("gpt2", 3, "transformer.h.0.attn"),
])
def test_tp_degree_that_does_not_divide_the_heads_raises(arch, world_size, module):
    model = _model(arch)
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=f"module '{module}'.*not divisible by"):
        parallelize(model, _fake_group(0, world_size))
    _assert_unchanged(model, snapshot)


def test_kv_heads_that_cannot_be_replicated_evenly_raise():
    config = _config("llama", n_kv_heads=2)
    config.num_attention_heads, config.hidden_size = 6, 96  # tp=3 splits 6 query heads but not 2 KV heads
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(ValueError, match=r"module 'model.layers.0.self_attn.k_proj'.*3 is not divisible by 2"):
        parallelize(model, _fake_group(0, 3))


def test_training_mode_with_dropout_raises():
    model = _model("gpt2").train()  # GPT-2 drops out with p=0.1 by default
    with pytest.raises(ValueError, match=r"training mode and module 'transformer.drop' has dropout 0.1; call model"):
        parallelize(model, TPGroup.single())


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="tp must be a tp_kernels.TPGroup, got int"):
        parallelize(_model("gpt2"), 2)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        parallelize("gpt2", TPGroup.single())


def test_converting_twice_raises():
    model = parallelize(_model("gpt2"), TPGroup.single())
    with pytest.raises(ValueError, match="cannot map module 'transformer.wte'.*found VocabParallelEmbedding"):
        parallelize(model, TPGroup.single())


# ----------------------------------------------------------------------------------------------------------
# HeadParallelLinear: which rows each rank keeps
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size,n_heads", [(2, 4), (4, 2), (4, 1)])
def test_head_parallel_linear_keeps_the_heads_of_its_rank(world_size, n_heads):
    head_dim, hidden = 3, 5
    weight, bias = torch.randn(n_heads * head_dim, hidden), torch.randn(n_heads * head_dim)
    q_heads_per_rank = 4 // world_size  # the query heads a rank serves, of a 4-head model
    for rank in range(world_size):
        layer = HeadParallelLinear(hidden, head_dim, n_heads, True, _fake_group(rank, world_size))
        layer.load_full(weight, bias)
        # the KV head of rank r's first query head r * q_heads_per_rank, in groups of 4 / n_heads
        first = rank * q_heads_per_rank // (4 // n_heads) if world_size > n_heads else rank * n_heads // world_size
        rows = slice(first * head_dim, (first + layer.n_heads_per_rank) * head_dim)
        assert torch.equal(layer.weight, weight[rows]) and torch.equal(layer.bias, bias[rows])
        x = torch.randn(2, hidden)
        torch.testing.assert_close(layer(x), x @ weight[rows].T + bias[rows])
