"""The skip contract of qkv_rope / qkv_rope_kv_cache on the CPU path (tp_kernels.reference, which the CPU
op runs): position -1 (reference.SKIP_POSITION) marks a padding token, rotated as position 0 and written
to no cache slot; any other index outside the caches raises a ValueError naming it, and writes nothing.
The Triton kernel's side of the contract is in test_qkv_interpret.py."""
import pytest
import torch

from conftest import assert_close
from tp_kernels import reference
from tp_kernels._extension import _C

pytestmark = pytest.mark.skipif(_C is None, reason="tp_kernels._C (the op schemas) is not built")

N_HEADS, N_KV_HEADS, HEAD_DIM, HIDDEN, BATCH, MAX_SEQ = 2, 1, 16, 32, 2, 8


def _call(positions, batch_index, caches):
    import tp_kernels.ops  # noqa: F401  (registers the CPU implementation)

    torch.manual_seed(0)
    x = torch.randn(len(positions), HIDDEN)
    w_qkv = torch.randn((N_HEADS + 2 * N_KV_HEADS) * HEAD_DIM, HIDDEN) / HIDDEN ** 0.5
    cos_sin = reference.rope_cos_sin_cache(2 * MAX_SEQ, HEAD_DIM)  # longer than the caches
    q = torch.ops.tp_kernels.qkv_rope_kv_cache(x, w_qkv, None, cos_sin, torch.tensor(positions),
                                               torch.tensor(batch_index), *caches, N_HEADS, N_KV_HEADS, HEAD_DIM,
                                               "neox")
    return x, w_qkv, cos_sin, q


def _caches():
    return [torch.randn(BATCH, MAX_SEQ, N_KV_HEADS, HEAD_DIM) for _ in range(2)]


def test_position_minus_one_writes_nothing_and_rotates_as_position_zero():
    caches = _caches()
    before = [c.clone() for c in caches]
    x, w_qkv, cos_sin, q = _call([3, -1], [1, 0], caches)
    q_ref, k_ref, v_ref = reference.qkv_rope(x.double(), w_qkv.double(), None, cos_sin.double(),
                                             torch.tensor([3, 0]), N_HEADS, N_KV_HEADS, HEAD_DIM, "neox")
    assert_close(q, q_ref, torch.float32, reduction_len=HIDDEN)
    for cache, old, ref in zip(caches, before, (k_ref, v_ref)):
        assert (cache != old).any(dim=-1).any(dim=-1).nonzero().tolist() == [[1, 3]]
        assert_close(cache[1, 3], ref[0], torch.float32, reduction_len=HIDDEN)


@pytest.mark.parametrize("positions, batch_index, name", [([3, MAX_SEQ], [0, 0], "positions"),
                                                          ([3, 2], [0, BATCH], "cache_batch_index"),
                                                          ([3, 2], [0, -1], "cache_batch_index")])
def test_other_out_of_range_indices_raise_and_write_nothing(positions, batch_index, name):
    caches = _caches()
    before = [c.clone() for c in caches]
    with pytest.raises(ValueError, match=rf"{name} must be in \[0, "):
        _call(positions, batch_index, caches)
    assert all(torch.equal(c, old) for c, old in zip(caches, before))
