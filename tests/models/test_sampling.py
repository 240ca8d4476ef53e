"""Token selection: greedy, temperature, top-k, top-p, seeded generators."""
import pytest
import torch

from tp_kernels.models.sampling import sample


def test_greedy_is_argmax():
    logits = torch.randn(5, 50)
    assert torch.equal(sample(logits), logits.argmax(-1))


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(5, 50)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, temperature=1.0, top_k=1, generator=gen), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=1.0, top_p=1e-6, generator=gen), logits.argmax(-1))


def test_top_k_draws_only_from_the_k_largest():
    logits = torch.randn(4, 30)
    allowed = logits.topk(5, dim=-1).indices
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([sample(logits, 2.0, top_k=5, generator=gen) for _ in range(200)], dim=1)  # (4, 200)
    assert (draws[:, :, None] == allowed[:, None, :]).any(-1).all()
    assert all(len(row.unique()) > 1 for row in draws), "temperature 2 over 5 tokens should not be deterministic"


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    gen = torch.Generator().manual_seed(2)
    draws = {int(sample(probs.log(), 1.0, top_p=0.75, generator=gen)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3


def test_same_seed_same_tokens():
    logits = torch.randn(3, 40)
    a = [sample(logits, 0.8, 10, 0.9, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(a[0], a[1])


@pytest.mark.parametrize("kwargs, match", [({"temperature": -1.0}, "temperature must be >= 0"),
                                           ({"top_k": 0}, "top_k must be >= 1"),
                                           ({"top_p": 1.5}, r"top_p must be in \(0, 1\]")])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(torch.randn(1, 4), **kwargs)


# ----------------------------------------------------------------------------------------------------------
# greedy over vocabulary-parallel logits (no gather): equal to argmax over the gathered logits
# ----------------------------------------------------------------------------------------------------------
def _vocab_parallel_cases():
    """(full logits, vocab) per case, drawn fresh: plain, a tie across the two ranks' slices (argmax must pick
    the lower id, on rank 0), a tie inside one slice, the winner in the last real column before the padding,
    and bf16 logits."""
    vocab = 11  # 6 per rank at TP=2: rank 1 holds ids 6..10 and one padding column
    plain = torch.randn(3, vocab)
    cross_tie = torch.randn(3, vocab)
    cross_tie[:, 2] = cross_tie[:, 8] = cross_tie.max() + 1
    inner_tie = torch.randn(3, vocab)
    inner_tie[:, 7] = inner_tie[:, 9] = inner_tie.max() + 1
    last_real = torch.randn(3, vocab)
    last_real[:, vocab - 1] = last_real.max() + 1
    return [plain, cross_tie, inner_tie, last_real, torch.randn(3, vocab).bfloat16()], vocab


def _greedy_on_rank(tp, cases, vocab, grad_mode):
    from tp_kernels.models.sampling import greedy_vocab_parallel

    per_rank = -(-vocab // tp.world_size)
    start = tp.rank * per_rank
    out = []
    with torch.set_grad_enabled(grad_mode):
        for logits in cases:
            local = torch.full((logits.shape[0], per_rank), float("nan"), dtype=logits.dtype)  # poisoned padding
            n_real = max(0, min(per_rank, vocab - start))  # 0 on a rank that holds only padding rows
            local[:, :n_real] = logits[:, start:start + n_real]
            out.append(greedy_vocab_parallel(local, start, n_real, tp))
    return out


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("grad_mode", [False, True])
def test_greedy_vocab_parallel_is_argmax_of_the_gathered_logits(world_size, grad_mode):
    from conftest import spawn_ranks
    from tp_kernels.distributed import TPGroup

    cases, vocab = _vocab_parallel_cases()
    if world_size == 1:
        per_rank = [_greedy_on_rank(TPGroup.single(), cases, vocab, grad_mode)]
    else:
        per_rank = spawn_ranks(world_size, _greedy_on_rank, cases, vocab, grad_mode)
    for rank, tokens in enumerate(per_rank):
        for i, (logits, got) in enumerate(zip(cases, tokens)):
            assert got.dtype == torch.int64
            assert torch.equal(got, logits.float().argmax(-1)), f"case {i}, rank {rank}: {got} != argmax"


def test_greedy_vocab_parallel_with_a_rank_of_padding_only():
    """vocab 5 over 4 ranks: 2 rows per rank, rank 3 holds only padding; every real logit negative, so a
    rank without a candidate must not win with the table's zero."""
    from conftest import spawn_ranks

    cases = [torch.randn(3, 5) - 10, torch.randn(3, 5)]
    for rank, tokens in enumerate(spawn_ranks(4, _greedy_on_rank, cases, 5, False)):
        for i, (logits, got) in enumerate(zip(cases, tokens)):
            assert torch.equal(got, logits.argmax(-1)), f"case {i}, rank {rank}: {got} != argmax"


def test_greedy_vocab_parallel_rejects_bad_arguments():
    from tp_kernels.distributed import TPGroup
    from tp_kernels.models.sampling import greedy_vocab_parallel

    with pytest.raises(ValueError, match="local_logits must be"):
        greedy_vocab_parallel(torch.randn(8), 0, 8, TPGroup.single())
    with pytest.raises(ValueError, match=r"n_real must be in \[1, 8\]"):
        greedy_vocab_parallel(torch.randn(2, 8), 0, 9, TPGroup.single())
