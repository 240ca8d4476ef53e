"""The plain Triton GEMM launcher (tp_kernels.kernels.matmul.matmul: a @ b.T + bias) under
TRITON_INTERPRET=1 on CPU tensors, against the float64 reference (tp_kernels.reference.linear)."""
import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernels need triton (absent with the CPU-only torch)")
if not triton.knobs.runtime.interpret:
    pytest.skip("TRITON_INTERPRET=0: these check the kernels in the interpreter on CPU tensors "
                "(tests/gpu/test_triton_gpu.py checks them compiled)", allow_module_level=True)

from conftest import assert_close  # noqa: E402
from poisoned_outputs import poisoned_outputs  # noqa: E402,F401  (fixture)
from tp_kernels import reference  # noqa: E402
from tp_kernels.kernels.matmul import matmul  # noqa: E402

# (M, N, K): decode M=1; M not a multiple of the 32-row tile and N of the 128-column one; the large-M
# bucket with K not a multiple of BLOCK_K (64 for 16-bit, 32 for fp32)
SHAPES = [(1, 70, 64), (33, 130, 96), (70, 64, 40)]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-N{}-K{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_matmul_matches_reference(dtype, shape, with_bias, poisoned_outputs):
    m, n, k = shape
    a = torch.randn(m, k).to(dtype)
    b = (torch.randn(n, k) / k ** 0.5).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    c = matmul(a, b, bias)
    assert any(c is t for t in poisoned_outputs), "the output must be the launcher's (poisoned) allocation"
    expected = reference.linear(a.double(), b.double(), None if bias is None else bias.double())
    assert c.dtype == dtype and c.is_contiguous()
    assert_close(c, expected, dtype, reduction_len=k)


def test_matmul_takes_any_strides(poisoned_outputs):
    a = torch.randn(48, 17).T  # (17, 48), column-major
    b = torch.randn(40, 96)[:, ::2]  # (40, 48), every other column
    c = matmul(a, b)
    assert_close(c, reference.linear(a.double(), b.double(), None), torch.float32, reduction_len=48)


def test_matmul_bad_arguments_raise():
    a, b = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match=r"w must be \(N, K=8\)"):
        matmul(a, torch.randn(6, 9))
    with pytest.raises(ValueError, match=r"bias must be \(N,\) = \(6,\)"):
        matmul(a, b, torch.randn(5))
    with pytest.raises(ValueError, match="must have the dtype of x"):
        matmul(a, b.half())
    with pytest.raises(ValueError, match="a must be float16, bfloat16 or float32"):
        matmul(a.double(), b.double())
    with pytest.raises(TypeError, match="a and b must be tensors"):
        matmul(a, [[1.0] * 8])
