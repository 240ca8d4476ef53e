"""tp_kernels.parallelize against the unconverted model on CPU ranks: logits and greedy generation of every
supported family at TP 1, 2 and 4, save_pretrained round trips, the meta-device flow.

One spawn_ranks call per world size runs every family (rank processes import transformers once: the
cost of these tests is mostly that), and the tests compare what it returned with references computed
once in this process.
"""
import copy
import os
import traceback
import warnings

import pytest
import torch

from conftest import spawn_ranks
from tp_kernels.distributed import TPGroup

transformers = pytest.importorskip("transformers", reason="parallelize converts Hugging Face transformers models")

import parallelize_models as pm  # noqa: E402
from tp_kernels.parallelize import parallelize, save_pretrained  # noqa: E402

WORLD_SIZES = [1, 2, 4]
N_NEW_TOKENS = 4
# Models whose ranks also save, and the shard size each uses: 0 one file, else shards of this many bytes.
SAVE_SHARD_BYTES = {"llama": 64 * 1024, "qwen2": 0, "phi3": 0, "gpt_neox": 0, "gpt2": 0, "gemma": 0}


@pytest.fixture(scope="module")
def references():
    """Per family: its weights, the input ids, and the unconverted model's fp32 / fp64 logits and tokens."""
    gen = torch.Generator().manual_seed(20261126)
    out = {}
    for family in pm.FAMILIES:
        model = pm.build(family)
        ids = torch.randint(2, pm.VOCAB, (2, 7), generator=gen)
        with torch.no_grad():
            logits = model(ids).logits
            logits_fp64 = copy.deepcopy(model).double()(ids).logits
            tokens = model.generate(ids, max_new_tokens=N_NEW_TOKENS, do_sample=False, pad_token_id=0)
        out[family] = dict(state_dict=model.state_dict(), ids=ids, logits=logits, logits_fp64=logits_fp64,
                           tokens=tokens, model=model)
    return out


def _convert_and_run(tp, family, state_dict, ids, save_dir):
    """On one rank: convert the family's model, then its logits (with grad mode on: the layers must work
    there too), greedy tokens, and optionally a saved checkpoint (a failure there is returned, not raised,
    so that it fails only the save test)."""
    model = pm.from_state_dict(family, state_dict)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # granite's plan is translated, with a warning tested elsewhere
        parallelize(model, tp)
    with torch.enable_grad():
        logits = model(ids).logits.detach()
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=N_NEW_TOKENS, do_sample=False, pad_token_id=0)
    save_error = None
    if save_dir is not None:
        try:
            save_pretrained(model, f"{save_dir}/{family}-tp{tp.world_size}",
                            **({"max_shard_bytes": SAVE_SHARD_BYTES[family]} if SAVE_SHARD_BYTES[family] else {}))
        except Exception:  # noqa: BLE001
            save_error = traceback.format_exc()
    return dict(logits=logits, tokens=tokens, save_error=save_error)


def _all_families_rank(tp, inputs, save_dir):
    return {family: _convert_and_run(tp, family, state_dict, ids, save_dir if family in SAVE_SHARD_BYTES else None)
            for family, (state_dict, ids) in inputs.items()}


@pytest.fixture(scope="module")
def rank_results(references, tmp_path_factory):
    """world_size -> (per-rank results, save directory), computed on first use."""
    inputs = {f: (r["state_dict"], r["ids"]) for f, r in references.items()}
    computed = {}

    def get(world_size):
        if world_size not in computed:
            save_dir = str(tmp_path_factory.mktemp(f"saved-tp{world_size}"))
            if world_size == 1:  # in this process: a rank process would import transformers again
                per_rank = [_all_families_rank(TPGroup.single(), inputs, save_dir)]
            else:
                # 11 families (each converted, run, generated and some saved) after a cold start of up to 4
                # ranks that import transformers: ~90 s at load 20 on 2 cores, 3x that seen once at load 25
                per_rank = spawn_ranks(world_size, _all_families_rank, inputs, save_dir, timeout_s=600)
            computed[world_size] = per_rank, save_dir
        return computed[world_size]
    return get


def _max_error(actual: torch.Tensor, expected_fp64: torch.Tensor) -> float:
    assert torch.isfinite(actual).all(), "non-finite logits"
    return (actual.double() - expected_fp64).abs().max().item()


@pytest.mark.parametrize("family", pm.FAMILIES)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_logits_and_greedy_tokens_match_the_unconverted_model(rank_results, references, world_size, family):
    ref = references[family]
    per_rank, _ = rank_results(world_size)
    error_full = _max_error(ref["logits"], ref["logits_fp64"])
    for rank, results in enumerate(per_rank):
        res = results[family]
        assert res["logits"].shape == (2, 7, pm.VOCAB)
        # the flash-attention rule: our fp32 error against fp64 is at most twice that of the unconverted fp32
        # model (which sums in another order); 1e-6 absorbs the case where that one happens to be exact
        error_tp = _max_error(res["logits"], ref["logits_fp64"])
        assert error_tp <= 2 * error_full + 1e-6, f"rank {rank}: error {error_tp:.3g} vs unconverted {error_full:.3g}"
        assert torch.equal(res["tokens"], ref["tokens"]), f"rank {rank}: greedy generation differs"
        # every rank holds the same logits, bit for bit (same reduction order everywhere)
        assert torch.equal(res["logits"], per_rank[0][family]["logits"]), f"rank {rank} differs from rank 0"


@pytest.mark.parametrize("family", sorted(SAVE_SHARD_BYTES))
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_save_pretrained_reloads_the_original_weights(rank_results, references, world_size, family):
    """A converted model saved from every rank reloads with transformers as the original, tensor for tensor
    (so parallelize can split it again at any TP degree)."""
    per_rank, save_dir = rank_results(world_size)
    errors = [r[family]["save_error"] for r in per_rank if r[family]["save_error"]]
    assert not errors, errors[0]
    original = references[family]["model"]
    path = f"{save_dir}/{family}-tp{world_size}"
    reloaded = type(original).from_pretrained(path, dtype=torch.float32)
    expected, actual = original.state_dict(), reloaded.state_dict()
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), f"{name} differs after the round trip"
    tied = original.config.tie_word_embeddings
    assert (reloaded.lm_head.weight is reloaded.get_input_embeddings().weight) == tied
    files = sorted(os.listdir(path))
    if SAVE_SHARD_BYTES[family]:
        assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) > 1
    else:
        assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    assert not [f for f in files if f.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------------------
# the meta-device flow of the README: parallelize a meta model, then fill all of it with plan.load_from
# ----------------------------------------------------------------------------------------------------------
META_FAMILIES = ["llama", "gemma", "gpt2"]  # rotary buffers; Gemma's embedding-scale buffer; learned positions


def _meta_then_load_rank(tp, inputs):
    out = {}
    for family, (state_dict, ids) in inputs.items():
        full = pm.from_state_dict(family, state_dict)
        model = pm.build(family, device="meta")
        plan = parallelize(model, tp, dry_run=True)
        parallelize(model, tp)
        plan.load_from(model, full)  # materializes the meta model on full's device, then fills everything
        unfilled = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        with torch.no_grad():
            out[family] = dict(logits=model(ids).logits, unfilled=unfilled)
    return out


def test_meta_model_filled_with_load_from_matches(references):
    inputs = {f: (references[f]["state_dict"], references[f]["ids"]) for f in META_FAMILIES}
    for rank, results in enumerate(spawn_ranks(2, _meta_then_load_rank, inputs)):
        for family, res in results.items():
            assert res["unfilled"] == [], f"{family} rank {rank}"
            assert torch.isfinite(res["logits"]).all(), f"{family} rank {rank}: non-finite logits"
            torch.testing.assert_close(res["logits"], references[family]["logits"], atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{family} rank {rank}: {m}")
