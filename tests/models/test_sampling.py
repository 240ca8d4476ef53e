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
