"""Peak memory of one training step: the tensors alive before it (weights, optimizer state) plus
the high-water mark of allocations during it, read from the PyTorch profiler's allocator events —
exact for tensors, blind to the Python interpreter and the allocator's free lists."""

import torch


def step_peak_bytes(step, model, optimizer):
    """Peak tensor memory of one training step, in bytes.

    Weights and optimizer state are alive before the step; on top of them the step allocates
    activations, gradients and temporaries. On CUDA the allocator keeps the high-water mark; on
    CPU we replay the profiler's allocation events ([memory]: +bytes, -bytes) in time order."""
    before = sum(t.numel() * t.element_size() for t in _tensors(model, optimizer))
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return before + torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return before + peak


def _tensors(model, optimizer):
    seen = {id(p): p for p in model.parameters()}  # tied weights once
    for state in optimizer.state.values():
        seen.update({id(v): v for v in state.values() if torch.is_tensor(v)})
    return seen.values()
