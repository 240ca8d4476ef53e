"""Plans as data: the tables of the supported families, the translation of Hugging Face's own tp_plan, user
plans for a custom model, and the errors (each names what is wrong, and the model is left as it was).
Planning needs only a rank and a world size, so most of these run in this process with TPGroup objects
that have no process group; the custom model is also converted on CPU ranks."""
import copy
import importlib

import pytest
import torch
import torch.nn as nn

from conftest import spawn_ranks
from tp_kernels.distributed import TPGroup
from tp_kernels.layers import HeadParallelLinear

transformers = pytest.importorskip("transformers", reason="parallelize converts Hugging Face transformers models")

import parallelize_models as pm  # noqa: E402
from tp_kernels.parallelize import (FAMILY_PLANS, Column, Merged, ParallelPlan, PerRankConfig, PlanError, Row,  # noqa: E402
                                    TPPlan, parallelize, save_pretrained)


def _fake_group(rank: int, world_size: int) -> TPGroup:
    """A TPGroup for planning and meta conversion, which need rank and world size but no collective."""
    return TPGroup(rank=rank, world_size=world_size, name=f"test_parallelize_plans.fake.{rank}.{world_size}")


def _targets(plan: ParallelPlan):
    return {s.name: (s.target, s.sharding) for s in plan.swaps}


def _changes(plan: ParallelPlan):
    return {(c.name, c.attribute): (c.full, c.per_rank) for c in plan.attribute_changes}


# ----------------------------------------------------------------------------------------------------------
# the family tables
# ----------------------------------------------------------------------------------------------------------
def test_dry_run_returns_the_plan_and_changes_nothing():
    model = pm.build("qwen2")  # 1 KV head: replicated at tp=2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = parallelize(model, _fake_group(1, 2), dry_run=True)
    assert isinstance(plan, ParallelPlan) and not hasattr(model, "tp_kernels_plan")
    assert all(type(model.get_submodule(s.name)) in (nn.Linear, nn.Embedding) for s in plan.swaps)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    targets = _targets(plan)
    assert targets["model.embed_tokens"] == ("VocabParallelEmbedding",
                                             "vocab 101 -> 51 rows per rank (padded to 102), all-reduce")
    assert targets["model.layers.1.self_attn.q_proj"] == ("HeadParallelLinear", "4 heads -> 2 per rank")
    assert targets["model.layers.1.self_attn.k_proj"] == ("HeadParallelLinear", "1 heads, head 0 replicated on 2 ranks")
    assert targets["model.layers.0.self_attn.o_proj"] == ("RowParallelLinear", "in 64 -> 32 per rank, all-reduce")
    assert targets["model.layers.0.mlp.up_proj"] == ("ColumnParallelLinear", "out 128 -> 64 per rank")
    assert targets["lm_head"] == ("ParallelLMHead", "tied: shares model.embed_tokens's shard, all-gather of logits")
    assert len(plan.swaps) == 1 + 2 * 7 + 1
    assert _changes(plan) == {(f"model.layers.{i}.self_attn", "num_key_value_groups"): (4, 2) for i in range(2)}
    assert plan.replicated == ("model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                               "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm",
                               "model.norm")
    text = str(plan)
    assert text.startswith("ParallelPlan: Qwen2ForCausalLM at tp=2 (rank 1), tp_kernels table: 16 modules swapped")
    assert "model.layers.1.self_attn.k_proj  Linear(64 -> 16, bias)" in text
    assert "model.layers.0.self_attn.num_key_value_groups: 4 -> 2" in text


def test_family_specifics_in_their_plans():
    tp = _fake_group(3, 4)
    phi3 = parallelize(pm.build("phi3"), tp, dry_run=True)  # 4 heads, 2 KV heads
    assert _targets(phi3)["model.layers.0.self_attn.qkv_proj"] == ("QKVParallelLinear",
                                                                   "q, k, v of 4 / 2 heads -> 1 / 1 per rank")
    assert _targets(phi3)["model.layers.0.mlp.gate_up_proj"] == ("MergedColumnParallelLinear",
                                                                 "2 parts of 128 -> 32 per rank each")
    assert {k[1]: v for k, v in _changes(phi3).items() if k[0] == "model.layers.1.self_attn"} == {
        "num_key_value_groups": (2, 1), "num_key_value_heads": (2, 1), "config.num_attention_heads": (4, 1)}

    gemma = parallelize(pm.build("gemma"), tp, dry_run=True)
    assert _targets(gemma)["model.embed_tokens"][0] == "ScaledVocabParallelEmbedding"
    assert _targets(gemma)["model.embed_tokens"][1].endswith("times 8")  # sqrt(hidden 64)
    assert _targets(gemma)["lm_head"][1].startswith("tied")

    neox = parallelize(pm.build("gpt_neox"), tp, dry_run=True)
    assert _targets(neox)["gpt_neox.layers.0.attention.query_key_value"] == ("HeadParallelLinear",
                                                                            "4 heads -> 1 per rank")
    assert neox.attribute_changes == ()

    opt = parallelize(pm.build("opt"), tp, dry_run=True)
    assert _changes(opt)[("model.decoder.layers.0.self_attn", "num_heads")] == (4, 1)
    assert "model.decoder.embed_positions" in opt.replicated

    qwen3 = parallelize(pm.build("qwen3"), tp, dry_run=True)
    assert "model.layers.0.self_attn.q_norm" in qwen3.replicated
    assert _targets(qwen3)["model.layers.0.self_attn.o_proj"][1] == "in 128 -> 32 per rank, all-reduce"

    gpt2 = parallelize(pm.build("gpt2"), tp, dry_run=True)
    changes = _changes(gpt2)
    assert changes[("transformer.h.1.attn", "num_heads")] == (4, 1)
    assert changes[("transformer.h.1.attn", "split_size")] == (64, 16)
    assert changes[("transformer.h.1.attn", "embed_dim")] == (64, 16)
    assert _targets(gpt2)["transformer.h.0.attn.c_attn"][0] == "QKVParallelLinear"
    assert _targets(gpt2)["lm_head"][1].startswith("tied: shares transformer.wte's shard")


def test_phi3_attention_reads_its_per_rank_config_view():
    model = pm.build("phi3")
    parallelize(model, TPGroup.single())  # tp=1: the per-rank values are the full ones, the views exist
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.config, PerRankConfig) and attn.config.full_config is model.config
    assert attn.config.num_attention_heads == 4 and attn.config.hidden_size == model.config.hidden_size
    attn.config.use_cache = False  # other fields write through to the model's config
    assert model.config.use_cache is False
    with pytest.raises(AttributeError, match="num_attention_heads is set per rank"):
        attn.config.num_attention_heads = 8


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"])
def test_translated_hf_plan_equals_the_table(family):
    """For the families whose Hugging Face plan splits q/k/v/o and the MLP, the translation gives exactly our
    table's plan: the tables add nothing a new family of that shape would need."""
    model, tp = pm.build(family), _fake_group(3, 4)
    table = parallelize(model, tp, dry_run=True)
    translated = parallelize(model, tp, dry_run=True, plan="hf")
    assert translated.source == "translated from the model's Hugging Face tp_plan"
    assert translated.swaps == table.swaps
    assert translated.attribute_changes == table.attribute_changes
    assert translated.replicated == table.replicated


def test_phi3_translated_plan_gathers_what_transformers_gathers():
    plan = parallelize(pm.build("phi3"), _fake_group(0, 2), dry_run=True, plan="hf")
    targets = _targets(plan)
    assert targets["model.layers.0.self_attn.qkv_proj"] == ("ColumnParallelLinear",
                                                            "out 128 -> 64 per rank, all-gather of outputs")
    assert targets["model.layers.0.self_attn.o_proj"][1].endswith("(splits its input)")
    assert plan.attribute_changes == ()  # every rank runs all heads: nothing changes per rank


def test_family_without_a_table_uses_its_hf_plan_with_a_warning(monkeypatch):
    # tp_kernels.parallelize, the attribute, is the function: the module is reached through importlib
    monkeypatch.setattr(importlib.import_module("tp_kernels.parallelize"), "_warned_derived", set())
    with pytest.warns(UserWarning, match="GraniteForCausalLM has no tp_kernels table; using a plan translated"):
        plan = parallelize(pm.build("granite"), _fake_group(0, 4), dry_run=True)
    assert _changes(plan)[("model.layers.0.self_attn", "num_key_value_groups")] == (2, 1)
    assert _targets(plan)["model.layers.0.self_attn.k_proj"][1] == "2 heads, head 0 replicated on 2 ranks"


def test_architecture_with_no_plan_raises():
    model = transformers.GPT2Model(transformers.GPT2Config(vocab_size=pm.VOCAB, n_embd=64, n_layer=1, n_head=4))
    with pytest.raises(TypeError, match="parallelize has no plan for GPT2Model: tp_kernels has tables for "
                                        "LlamaForCausalLM, .*pass plan=TPPlan"):
        parallelize(model, TPGroup.single())


def test_hf_style_without_an_equivalent_raises(monkeypatch):
    model = pm.build("mistral")
    monkeypatch.setattr(model, "_tp_plan", {"model.layers.*.mlp.gate_proj": "packed_colwise"})
    with pytest.raises(ValueError, match=r"'model.layers.\*.mlp.gate_proj' of MistralForCausalLM: Hugging Face style "
                                         r"'packed_colwise' has no tp_kernels equivalent"):
        parallelize(model, TPGroup.single(), plan="hf")


# ----------------------------------------------------------------------------------------------------------
# user plans
# ----------------------------------------------------------------------------------------------------------
def _custom_rank(tp, state_dict, ids, phi3_state_dict, phi3_ids):
    model = pm.ToyModel()
    model.load_state_dict(state_dict)
    expected = model(ids)
    parallelize(model, tp, plan=pm.toy_plan())
    phi3 = pm.from_state_dict("phi3", phi3_state_dict)
    phi3_expected = phi3(phi3_ids).logits
    parallelize(phi3, tp, plan="hf")  # the gathered variant, for comparison with the table's
    return model(ids), expected, phi3(phi3_ids).logits, phi3_expected


@pytest.mark.parametrize("world_size", [2, 4])
def test_custom_model_with_a_user_plan_matches(world_size):
    model = pm.ToyModel()
    ids = torch.randint(0, pm.VOCAB, (2, 6))
    phi3_ids = torch.randint(2, pm.VOCAB, (1, 5))
    results = spawn_ranks(world_size, _custom_rank, model.state_dict(), ids, pm.build("phi3").state_dict(), phi3_ids)
    for rank, (out, expected, phi3_out, phi3_expected) in enumerate(results):
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5, msg=lambda m: f"toy rank {rank}: {m}")
        torch.testing.assert_close(phi3_out, phi3_expected, atol=2e-5, rtol=2e-5, msg=lambda m: f"phi3 rank {rank}: {m}")


def test_user_plan_printout_and_a_mapping_as_the_layers():
    model = pm.ToyModel(n_kv_heads=4)
    plan = parallelize(model, _fake_group(0, 2), dry_run=True, plan=pm.toy_plan())
    assert plan.source == "user plan" and plan.architecture == "ToyModel"
    assert _changes(plan)[("blocks.0.attn", "n_kv_heads")] == (4, 2)
    assert str(plan).startswith("ParallelPlan: ToyModel at tp=2 (rank 0), user plan: 14 modules swapped, "
                                "4 attributes set per rank, 3 modules replicated")
    # a mapping is the plan's layers alone: the norms are then unaccounted for
    with pytest.raises(PlanError, match=r"cannot map module 'blocks.0.norm' \(LayerNorm\) of ToyModel: it holds "
                                        r"parameters but the plan neither splits it nor lists it as replicated"):
        parallelize(model, TPGroup.single(), plan=dict(pm.toy_plan().layers))


@pytest.mark.parametrize("plan_kwargs, error, match", [
    (dict(layers={"embed": "rows"}), ValueError, r"plan entry 'embed': style must be .* got 'rows'"),
    (dict(layers={}), TypeError, "TPPlan layers must be a non-empty mapping"),
    (dict(layers={"embed..x": "row"}), ValueError, "a pattern must be a dotted module name"),
    (dict(layers={"embed": "embedding"}, per_rank={"blocks.*.attn": {"n_heads": "head_count"}}), ValueError,
     r"quantity must be one of \['heads', 'kv_groups', 'kv_heads', 'q_width'\], got 'head_count'"),
    (dict(layers={"embed": "embedding"}, replicated="norm"), TypeError, "replicated must be a sequence of patterns"),
])
def test_malformed_user_plans_raise(plan_kwargs, error, match):
    with pytest.raises(error, match=match):
        TPPlan(**plan_kwargs)


def _toy_plan_with(**changes):
    plan = pm.toy_plan()
    return TPPlan(**{"layers": plan.layers, "per_rank": plan.per_rank, "replicated": plan.replicated, **changes})


@pytest.mark.parametrize("plan, match", [
    (lambda: pm.toy_plan().extend(layers={"blocks.*.mlp.up": "column"}),
     r"pattern\(s\) \['blocks.\*.mlp.up'\] match no module of ToyModel"),
    (lambda: _toy_plan_with(per_rank={"blocks.*.attn": {"num_heads": "heads"}}),
     r"module 'blocks.0.attn' of ToyModel has no attribute 'num_heads' to set per rank"),
    (lambda: _toy_plan_with(per_rank={"blocks.*.attn": {"n_heads": "kv_heads"}}),
     r"attribute 'n_heads' is 4, but the plan sets it to the KV heads on this rank, whose full-model value is 2"),
    (lambda: _toy_plan_with(per_rank={"blocks.*": {"n_heads": "heads"}}),
     r"module 'blocks.0' has per-rank attributes in the plan, but none of its children is split by heads"),
    (lambda: pm.toy_plan().extend(layers={"blocks.*.up": "q_heads"}),
     r"module 'blocks.0.up': its parent ToyBlock has no head_dim or head_size attribute"),
    (lambda: pm.toy_plan().extend(layers={"blocks.*.attn.k": "q_heads", "blocks.*.attn.v": "q_heads"}),
     r"module 'blocks.0.attn': its projections disagree on the heads"),
    (lambda: pm.toy_plan().extend(layers={"blocks.*.up": Merged(3)}),
     r"module 'blocks.0.up': out_features \(128\) is not 3 equal parts"),
    (lambda: pm.toy_plan().extend(layers={"blocks.*": "row"}),
     r"module 'blocks.0' of ToyModel matches several layers patterns|cannot map it: expected Linear"),
])
def test_user_plans_that_do_not_fit_raise_and_change_nothing(plan, match):
    model = pm.ToyModel()
    snapshot = _snapshot(model)
    with pytest.raises(PlanError, match=match):
        parallelize(model, _fake_group(0, 2), plan=plan())
    _assert_unchanged(model, snapshot)


# ----------------------------------------------------------------------------------------------------------
# errors on Hugging Face models: each names what is wrong, and the model is left exactly as it was
# ----------------------------------------------------------------------------------------------------------
def _snapshot(model):
    return [(name, type(m)) for name, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    modules, state = snapshot
    assert [(name, type(m)) for name, m in model.named_modules()] == modules
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert not hasattr(model, "tp_kernels_plan")


class _ScaledLinear(nn.Linear):
    """A subclass may change forward, so the plan does not take it for an nn.Linear."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_unmappable_projection_raises_naming_it_and_converts_nothing():
    model = pm.build("llama")
    old = model.model.layers[1].mlp.up_proj  # the last layer: everything before it would be converted first
    model.model.layers[1].mlp.up_proj = _ScaledLinear(old.in_features, old.out_features, bias=False)
    snapshot = _snapshot(model)
    with pytest.raises(PlanError, match=r"module 'model.layers.1.mlp.up_proj': cannot map it: expected Linear or "
                                        r"Conv1D, found _ScaledLinear"):
        parallelize(model, TPGroup.single())
    _assert_unchanged(model, snapshot)


def test_module_outside_the_plan_raises_naming_it():
    model = pm.build("qwen3")
    model.model.layers[1].self_attn.adapter = nn.Linear(64, 64)
    snapshot = _snapshot(model)
    with pytest.raises(PlanError, match=r"cannot map module 'model.layers.1.self_attn.adapter' \(Linear\)"):
        parallelize(model, TPGroup.single())
    _assert_unchanged(model, snapshot)


def test_gpt2_cross_attention_is_not_mapped():
    config = copy.deepcopy(pm.build("gpt2").config)
    config.add_cross_attention = True
    model = transformers.GPT2LMHeadModel(config).eval()
    with pytest.raises(PlanError, match=r"cannot map module 'transformer.h.0.crossattention.c_attn'"):
        parallelize(model, TPGroup.single())


@pytest.mark.parametrize("family,world_size,module", [
    ("llama", 3, "model.layers.0.self_attn.q_proj"),   # 4 heads on 3 ranks
    ("llama", 8, "model.layers.0.self_attn.q_proj"),   # more ranks than query heads
    ("phi3", 8, "model.layers.0.self_attn.qkv_proj"),
    ("gpt2", 3, "transformer.h.0.attn.c_attn"),
    ("gpt_neox", 8, "gpt_neox.layers.0.attention.query_key_value"),
])
def test_tp_degree_that_does_not_divide_the_heads_raises(family, world_size, module):
    model = pm.build(family)
    snapshot = _snapshot(model)
    with pytest.raises(PlanError, match=f"module '{module}'.*not divisible by"):
        parallelize(model, _fake_group(0, world_size))
    _assert_unchanged(model, snapshot)


def test_kv_heads_that_cannot_be_replicated_evenly_raise():
    config = copy.deepcopy(pm.build("llama").config)
    config.num_attention_heads, config.hidden_size, config.head_dim = 6, 96, 16  # tp=3 splits 6 q heads, not 2 KV
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(PlanError, match=r"module 'model.layers.0.self_attn.k_proj'.*3 is not divisible by 2"):
        parallelize(model, _fake_group(0, 3))


def test_training_mode_with_dropout_raises():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=pm.VOCAB, n_embd=64, n_layer=1, n_head=4))
    with pytest.raises(PlanError, match=r"training mode and module 'transformer.drop' has dropout 0.1; call model"):
        parallelize(model.train(), TPGroup.single())


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="tp must be a tp_kernels.TPGroup, got int"):
        parallelize(pm.build("gpt2"), 2)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        parallelize("gpt2", TPGroup.single())
    with pytest.raises(TypeError, match="plan must be None, 'hf', a TPPlan or a mapping"):
        parallelize(pm.build("gpt2"), TPGroup.single(), plan="table")


def test_converting_twice_raises():
    model = parallelize(pm.build("gpt2"), TPGroup.single())
    with pytest.raises(ValueError, match="this GPT2LMHeadModel was already converted \\(tp=1\\)"):
        parallelize(model, TPGroup.single())


def test_save_pretrained_of_an_unconverted_model_raises(tmp_path):
    with pytest.raises(ValueError, match="was not converted by tp_kernels.parallelize; use its own save_pretrained"):
        save_pretrained(pm.build("gpt2"), tmp_path)


def test_save_pretrained_failure_on_rank_0_raises(tmp_path):
    model = parallelize(pm.build("gpt2"), TPGroup.single())
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(RuntimeError, match="rank 0 could not write the checkpoint to .*a-file"):
        save_pretrained(model, blocker)


# ----------------------------------------------------------------------------------------------------------
# meta device: the same plan, meta layers, and load_from's refusals
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_meta_model_gets_the_same_plan_and_meta_layers(family):
    tp = _fake_group(1, 2)
    real_plan = parallelize(pm.build(family), tp, dry_run=True)
    meta = pm.build(family, device="meta")
    assert parallelize(meta, tp, dry_run=True) == real_plan
    parallelize(meta, tp)
    assert all(p.is_meta for p in meta.parameters())
    if family == "llama":
        k_proj = meta.get_submodule("model.layers.0.self_attn.k_proj")
        assert isinstance(k_proj, HeadParallelLinear) and k_proj.weight.shape == (16, 64)
        assert meta.get_submodule("lm_head").weight.shape == (51, 64)
    elif family == "gpt2":
        assert meta.get_submodule("transformer.h.0.attn.c_attn").weight.shape == (96, 64)
        assert meta.get_submodule("lm_head").weight is meta.get_submodule("transformer.wte").weight


def test_load_from_fills_every_tensor_of_a_meta_model():
    tp, full = _fake_group(1, 2), pm.build("gemma")
    model = pm.build("gemma", device="meta")
    plan = parallelize(model, tp, dry_run=True)
    parallelize(model, tp)
    plan.load_from(model, full)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert not t.is_meta and torch.isfinite(t).all(), name
    assert torch.equal(model.model.embed_tokens.embed_scale, full.model.embed_tokens.embed_scale)
    assert torch.equal(model.model.rotary_emb.inv_freq, full.model.rotary_emb.inv_freq)
    assert torch.equal(model.model.layers[1].input_layernorm.weight, full.model.layers[1].input_layernorm.weight)
    # rank 1's rows 51..100 of the tied table, then one zero padding row
    assert torch.equal(model.lm_head.weight[:50], full.model.embed_tokens.weight[51:])
    assert not model.lm_head.weight[50:].any()
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_load_from_refuses_a_full_model_without_values():
    tp = _fake_group(0, 2)
    model = pm.build("llama", device="meta")
    plan = parallelize(model, tp, dry_run=True)
    parallelize(model, tp)
    with pytest.raises(ValueError, match=r"tensor 'weight' of full_model is on the meta device|"
                                         r"'model.embed_tokens.weight' of full_model is on the meta device"):
        plan.load_from(model, pm.build("llama", device="meta"))
    with pytest.raises(ValueError, match="full_model was converted by parallelize"):
        plan.load_from(model, model)


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


def test_every_table_family_is_tested():
    assert sorted(FAMILY_PLANS) == sorted(type(pm.build(f)).__name__ for f in pm.TABLE_FAMILIES)


def test_the_readme_custom_plan_is_the_tested_one():
    """The README's TPPlan snippet, executed, equals the plan the custom-model tests convert with."""
    import pathlib

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = next(b for b in readme.split("```python")[1:] if "plan = TPPlan(" in b).split("```")[0]
    code = block.split("tp_kernels.parallelize(model, tp, plan=plan)")[0]
    namespace = {}
    exec(code, namespace)
    assert namespace["plan"] == pm.toy_plan()
