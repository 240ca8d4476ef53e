"""Which backend serves the collectives of a TP=2 decode step of the GPT decoder, counted (issue 12).

Per step the decoder makes 2 all-reduces per layer (attention output, MLP down projection), 1 for the
vocab-parallel embedding and 1 all-gather of the logits. Under `tp.use_backend("torch")` all of them must
reach torch.distributed; under "shm" (and by default on CPU ranks of one host) none may, and the shared
memory communicator must run every one. Before issue 12 a forced torch chain still ran shm for every
reduction: the C++ kernels kept the table they were given when the group was made.
"""
import torch

from conftest import spawn_ranks

N_LAYERS = 3
MODEL = dict(family="llama", vocab_size=96, dim=32, n_layers=N_LAYERS, n_heads=4, n_kv_heads=2, intermediate_size=48,
             max_seq_len=32, norm_eps=1e-5)


def _counted(calls: dict):
    """Patch torch.distributed's all_reduce and its flat all-gather (all_gather_single; torch 2.11 has only
    all_gather_into_tensor) to count calls into calls["all_reduce"] / calls["all_gather"]; returns a function
    that restores them."""
    import torch.distributed as dist

    gather = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    originals = {"all_reduce": ("all_reduce", dist.all_reduce), "all_gather": (gather, getattr(dist, gather))}
    for key, (name, fn) in originals.items():
        def counted(*args, _fn=fn, _key=key, **kwargs):
            calls[_key] += 1
            return _fn(*args, **kwargs)
        setattr(dist, name, counted)
    return lambda: [setattr(dist, name, fn) for name, fn in originals.values()]


def _decode_rank(tp, grad_mode):
    from tp_kernels.models import GPT, ModelArgs

    model = GPT.from_preset(ModelArgs(**MODEL), tp, seed=0)
    shm = next(c for c in tp.communicators if c.name == "shm")
    prompt = torch.arange(5)[None] % MODEL["vocab_size"]
    counts, tokens = {}, {}
    for forced in (None, "shm", "torch"):
        cache = model.new_cache(1, 16)
        with torch.set_grad_enabled(grad_mode):
            token = model(prompt, cache=cache, logits_at=torch.tensor([4])).argmax(-1)  # prefill, not counted
            calls = {"all_reduce": 0, "all_gather": 0}
            steps_before = shm.sequence
            restore = _counted(calls)
            try:
                if forced is None:
                    logits = model(token[:, None], torch.tensor([[5]]), cache, logits_at=torch.tensor([0]))
                else:
                    with tp.use_backend(forced):
                        logits = model(token[:, None], torch.tensor([[5]]), cache, logits_at=torch.tensor([0]))
            finally:
                restore()
        counts[forced] = dict(calls, shm_steps=shm.sequence - steps_before)
        tokens[forced] = logits.argmax(-1).item()
    return counts, tokens


def _check(results):
    reductions = 2 * N_LAYERS + 1  # + the embedding
    for rank, (counts, tokens) in enumerate(results):
        fast = {"all_reduce": 0, "all_gather": 0, "shm_steps": reductions + 1}  # + the logits gather
        assert counts[None] == fast, f"rank {rank}, default chain: {counts[None]}"
        assert counts["shm"] == fast, f"rank {rank}, use_backend('shm'): {counts['shm']}"
        assert counts["torch"] == {"all_reduce": reductions, "all_gather": 1, "shm_steps": 0}, \
            f"rank {rank}, use_backend('torch'): {counts['torch']}"
        assert len(set(tokens.values())) == 1, f"rank {rank}: the backends disagree on the next token {tokens}"


def test_each_forced_backend_serves_every_collective_of_a_decode_step():
    _check(spawn_ranks(2, _decode_rank, False))


def test_the_same_in_grad_mode():
    _check(spawn_ranks(2, _decode_rank, True))
