"""The launch-config table of the Triton kernels (tp_kernels.kernels.configs): bucket boundaries, decode
tiles, and shared memory within each arch's limit. Imports no triton, so it also runs without it."""
import pytest
import torch

from tp_kernels.kernels import configs


@pytest.mark.parametrize("n_rows, bucket", [(1, 16), (16, 16), (17, 64), (64, 64), (65, None), (10 ** 6, None)])
def test_m_bucket_boundaries(n_rows, bucket):
    assert configs.m_bucket(n_rows) == bucket


def test_every_arch_dtype_and_bucket_has_a_config():
    for table in (configs.QKV_CONFIGS, configs.MATMUL_CONFIGS):
        assert set(table) == {(a, d, m) for a in configs.ARCHS for d in configs.DTYPE_CLASSES
                              for m in configs.M_BUCKETS}


def test_decode_never_uses_a_tile_taller_than_16_rows():
    for table in (configs.QKV_CONFIGS, configs.MATMUL_CONFIGS):
        for (arch, dtype_class, bucket), config in table.items():
            if bucket == 16:
                assert config.block_m == 16, (arch, dtype_class, config)


def test_tiles_are_valid_for_tl_dot_and_fit_shared_memory():
    for table in (configs.QKV_CONFIGS, configs.MATMUL_CONFIGS):
        for (arch, dtype_class, _), config in table.items():
            for size in (config.block_m, config.block_n, config.block_k):
                assert size >= 16 and size & (size - 1) == 0, config  # tl.dot: powers of two >= 16
            element_bytes = 4 if dtype_class == "fp32" else 2
            stage_bytes = (config.block_m + config.block_n) * config.block_k * element_bytes
            assert stage_bytes * config.num_stages <= configs.SHARED_MEMORY_LIMIT[arch], (arch, config)


def test_cpu_tensors_use_the_sm80_table_and_dtypes_map_to_classes():
    assert configs.arch_of(torch.device("cpu")) == "sm_80"
    assert configs.dtype_class(torch.float32) == "fp32"
    assert configs.dtype_class(torch.bfloat16) == configs.dtype_class(torch.float16) == "16bit"
    assert configs.qkv_config(torch.device("cpu"), torch.float16, 1) is configs.QKV_CONFIGS[("sm_80", "16bit", 16)]
