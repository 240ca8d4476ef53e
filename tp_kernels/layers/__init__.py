"""Drop-in tensor-parallel layers.

Every layer takes its TPGroup explicitly, holds only this rank's shard of the weights, and can be built
from a full unsharded module (`from_linear` / `from_embedding`) or filled from full tensors
(`load_full`). `load_full` only slices its arguments with `t[a:b]`, so it accepts, besides tensors, the
lazy slices of `safetensors.safe_open(...).get_slice(name)`: a rank then reads only its own rows.

- `linear`: ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear
- `heads`: QKVParallelLinear, HeadParallelLinear and `heads_of_rank`, the head split they share
- `vocab`: VocabParallelEmbedding, ParallelLMHead
- `sharding`: what they all do the same way (checked division, slicing, initialization, input checks)
"""
from tp_kernels.layers.heads import HeadParallelLinear, QKVParallelLinear, heads_of_rank
from tp_kernels.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, RowParallelLinear
from tp_kernels.layers.sharding import divide
from tp_kernels.layers.vocab import ParallelLMHead, VocabParallelEmbedding

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "QKVParallelLinear", "MergedColumnParallelLinear",
           "HeadParallelLinear", "VocabParallelEmbedding", "ParallelLMHead", "divide", "heads_of_rank"]
