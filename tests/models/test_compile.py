"""The compiled decode step (generate(compile=True), gpt-fast style): torch.compile captures one graph with
no breaks over the static cache, with the tp_kernels custom ops inside it, at TP=1 and TP=2; and the
compiled generate gives the eager tokens.

The graph checks use torch._dynamo.explain (dynamo only, seconds); the token checks compile with Inductor,
the backend generate uses (tens of seconds on 2 cores for the tiny preset)."""
import pytest
import torch

from conftest import spawn_ranks

from tp_kernels.distributed import TPGroup
from tp_kernels.models import GPT, generate
from tp_kernels.models.generation import decode_greedy, decode_logits

PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
NEW_TOKENS = 6
COMPILE_TIMEOUT_S = 900.0  # two ranks compiling with Inductor at once on 2 cores


def _explain_steps(tp):
    """Per step function: (graphs, graph breaks, break reasons, custom ops in the graph) of one decode step."""
    model = GPT.from_preset("tiny", tp, seed=5)
    cache = model.new_cache(2, 16)
    tokens, positions = torch.tensor([[3], [7]]), torch.tensor([[4], [9]])
    out = {}
    for step in (decode_greedy, decode_logits):
        explanation = torch._dynamo.explain(step)(model, tokens, positions, cache)
        code = "\n".join(g.code for g in explanation.graphs)
        ops = sorted({name for name in ("qkv_rope_kv_cache", "add_rmsnorm", "allreduce_residual_rmsnorm", "all_reduce",
                                        "all_gather") if f"tp_kernels.{name}" in code})
        out[step.__name__] = (explanation.graph_count, explanation.graph_break_count,
                              [str(r.reason) for r in explanation.break_reasons], ops)
    return out


@pytest.mark.parametrize("world_size", [1, 2])
def test_decode_step_is_one_graph_with_the_custom_ops_inside(world_size):
    if world_size == 1:
        per_rank = [_explain_steps(TPGroup.single())]
    else:
        per_rank = spawn_ranks(world_size, _explain_steps)
    expected_ops = {
        # at TP=1 the blocks' reductions are identities, so the decoder calls add_rmsnorm alone
        # (gpt._reduce_add_rmsnorm); the embedding layer still calls all_reduce
        1: {"decode_greedy": ["add_rmsnorm", "all_reduce", "qkv_rope_kv_cache"],
            "decode_logits": ["add_rmsnorm", "all_gather", "all_reduce", "qkv_rope_kv_cache"]},
        2: {"decode_greedy": ["add_rmsnorm", "all_reduce", "allreduce_residual_rmsnorm", "qkv_rope_kv_cache"],
            "decode_logits": ["add_rmsnorm", "all_gather", "all_reduce", "allreduce_residual_rmsnorm",
                              "qkv_rope_kv_cache"]},
    }[world_size]
    for rank, steps in enumerate(per_rank):
        for name, (graphs, breaks, reasons, ops) in steps.items():
            assert (graphs, breaks) == (1, 0), f"rank {rank} {name}: {graphs} graphs, breaks: {reasons}"
            assert ops == expected_ops[name], f"rank {rank} {name}: custom ops in the graph {ops}"


def _eager_and_compiled(tp, sampled: bool):
    """(tokens, compile_s, decode steps) of eager and compiled generate, greedy or sampled."""
    model = GPT.from_preset("tiny", tp, seed=6)
    sampling = dict(temperature=0.8, top_k=40, seed=3) if sampled else {}
    out = {}
    for compile in (False, True):
        tokens, stats = generate(model, PROMPTS, NEW_TOKENS, compile=compile, **sampling)
        out[compile] = (tokens, stats.compile_s, len(stats.step_s))
    return out


# Each case is one Inductor compile per rank (~20 s quiet, ~60 s under load here): greedy at both TP degrees
# (the vocabulary-parallel argmax and the collectives inside the graph), sampling at TP=1 (the logits step).
@pytest.mark.parametrize("world_size,sampled", [(1, False), (1, True), (2, False)])
def test_compiled_generate_gives_the_eager_tokens(world_size, sampled):
    if world_size == 1:
        per_rank = [_eager_and_compiled(TPGroup.single(), sampled)]
    else:
        per_rank = spawn_ranks(world_size, _eager_and_compiled, sampled, timeout_s=COMPILE_TIMEOUT_S)
    reference = per_rank[0][False][0]
    for rank, out in enumerate(per_rank):
        (eager, eager_compile_s, eager_steps), (compiled, compile_s, steps) = out[False], out[True]
        assert eager == reference, f"rank {rank}: eager tokens differ from rank 0's"
        assert compiled == eager, f"rank {rank}: compiled {compiled} vs eager {eager}"
        assert eager_compile_s == 0.0 and compile_s > 0, "compile_s is the compiled step's first-call time"
        assert steps == eager_steps == NEW_TOKENS - 1
