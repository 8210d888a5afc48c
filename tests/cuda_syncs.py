"""Counting the calls that wait for a CUDA device (CUDA's sync debug mode) over the steps of a
layer: one forward (token_permutation, elementwise experts, token_unpermutation) and backward
a step, on random inputs made on the GPU beforehand."""

import warnings

import torch

SYNC_WARNING = "called a synchronizing CUDA operation"  # (torch also warns once that the mode is a prototype)


def layer_syncs(dispatcher, seed: int, steps: int = 3, tokens: int = 48, hidden: int = 128):
    """``(waits, tokens, inputs)``: the device waits of ``steps`` steps of ``dispatcher``'s layer
    after one step outside the count (first uses: pinned slots, buffers), the permuted tokens
    of each counted step, and its ``(x, logits, grad)``."""
    experts = dispatcher.config.num_moe_experts
    g = torch.Generator().manual_seed(seed)
    inputs = [(torch.randn(tokens, hidden, generator=g).cuda().requires_grad_(),
               torch.randn(tokens, experts, generator=g).cuda(), torch.randn(tokens, hidden, generator=g).cuda())
              for _ in range(steps + 1)]

    def step(x, logits, grad):
        permuted, _, probs = dispatcher.token_permutation(x, tokens, torch.softmax(logits, -1))
        dispatcher.token_unpermutation(permuted * probs[:, None]).backward(grad)
        return permuted

    step(*inputs[0])
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            outputs = [step(*args) for args in inputs[1:]]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    waits = [str(w.message) for w in caught if SYNC_WARNING in str(w.message)]
    return waits, outputs, inputs[1:]
