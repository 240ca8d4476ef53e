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


@pytest.mark.parametrize("n_tiles, k, n_sms, split", [
    (80, 8192, 132, 2),  # Llama-70B TP=8 QKV: 80 tiles of 16 columns -> 160 programs on an H100
    (48, 4096, 132, 4),  # Llama-3-8B TP=8: 48 tiles -> 192 programs
    (320, 8192, 132, 1),  # enough tiles: no split
    (80, 1024, 132, 1),  # 4 K blocks: a split would leave fewer than MIN_K_BLOCKS_PER_SPLIT each
    (1, 10 ** 6, 132, configs.MAX_SPLIT_K),  # capped
])
def test_split_k_for(n_tiles, k, n_sms, split):
    assert configs.split_k_for(n_tiles, k, 256, n_sms) == split


def test_llama70b_tp8_decode_fills_an_h100():
    config = configs.QKV_CONFIGS[("sm_90", "16bit", 16)]
    n_tiles = 1280 // config.block_n
    split = configs.split_k_for(n_tiles, 8192, config.block_k, configs.SM_COUNT["sm_90"])
    assert config.split_k and n_tiles * split >= 132
