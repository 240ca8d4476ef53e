"""Generation and model-call behaviour on the tiny preset at TP=1: EOS, errors, the cache contract."""
import pytest
import torch

from conftest import assert_close

from tp_kernels.distributed import TPGroup
from tp_kernels.models import GPT, generate


@pytest.fixture(scope="module")
def model():
    return GPT.from_preset("tiny", TPGroup.single(), seed=11)


def test_stops_at_eos_per_sequence(model):
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    free, _ = generate(model, prompts, 12, eos_token_ids=())
    eos = free[0][2]  # the third token of the first sequence becomes the end-of-sequence token
    stopped, stats = generate(model, prompts, 12, eos_token_ids=[eos])
    assert stopped[0] == free[0][:free[0].index(eos) + 1]
    cut = free[1].index(eos) + 1 if eos in free[1] else len(free[1])
    assert stopped[1] == free[1][:cut]
    assert stats.n_decode_steps == max(len(s) for s in stopped) - 1


def test_stats_count_what_ran(model):
    tokens, stats = generate(model, [[1, 2, 3, 4]], 5, eos_token_ids=())
    assert len(tokens[0]) == 5 and stats.n_prompt_tokens == 4 and stats.n_decode_steps == 4
    assert stats.weight_bytes_per_rank == sum(p.numel() * 4 for p in model.parameters())
    assert stats.decode_bytes_per_rank == model.decode_bytes_per_rank(4 + 4 // 2)
    assert len(stats.step_s) == 4 and all(s > 0 for s in stats.step_s) and sum(stats.step_s) <= stats.decode_s
    assert stats.decode_tokens_per_s > 0 and stats.prefill_tokens_per_s > 0 and stats.compile_s == 0


def test_decode_bytes_per_rank_counts_what_a_step_reads(model):
    """Every weight but the embedding rows not looked up (tiny is untied), plus k and v of kv_len positions."""
    args = model.args
    n_params = sum(p.numel() for p in model.parameters())
    batch, kv_len = 2, 10
    cache_elements = args.n_layers * batch * kv_len * 2 * args.n_kv_heads * args.head_dim
    assert model.decode_bytes_per_rank(kv_len, batch) == 4 * (n_params - (args.vocab_size - batch) * args.dim
                                                              + cache_elements)


def test_greedy_tokens_is_argmax_of_the_logits(model):
    h = torch.randn(3, model.args.dim)
    with torch.no_grad():
        assert torch.equal(model.greedy_tokens(h), model.lm_head(h).argmax(-1))


def test_too_long_raises(model):
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        generate(model, [[1] * 250], 10)


@pytest.mark.parametrize("prompts", [[], [[]]])
def test_empty_prompts_raise(model, prompts):
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, prompts, 4)


def test_forward_argument_errors(model):
    with pytest.raises(ValueError, match="input_ids must be a 2-D"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="positions must be in"):
        model(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 256]]))
    with pytest.raises(ValueError, match="cache .* is too small"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=model.new_cache(1, 3))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 256\)"):
        model(torch.full((1, 2), 300))


def test_logits_at_selects_one_token_per_row(model):
    ids = torch.randint(0, 256, (3, 6))
    at = torch.tensor([5, 0, 2])
    with torch.no_grad():
        full, picked = model(ids), model(ids, logits_at=at)
    # equal up to the blocking of a (3, dim) vs a (18, dim) GEMM
    assert_close(picked, full[torch.arange(3), at].double(), torch.float32, reduction_len=model.args.dim)


def test_gqa_tp_not_dividing_heads_raises():
    tp = TPGroup(rank=0, world_size=3, name="test_generation.tp3")
    with pytest.raises(ValueError, match=r"n_heads \(4\) across tp=3 ranks"):
        GPT.from_preset("tiny", tp)
