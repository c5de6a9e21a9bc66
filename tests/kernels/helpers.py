"""Shared test helpers for kernels: one `assert_close`, routing distributions, problem builders."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.meta import DispatchMeta, build_dispatch

# Per-dtype tolerance, relative to the size of the expected values: an element passes when
# |actual - expected| <= tol * (|expected| + max|expected|). fp32 kernels differ from the
# reference only by summation order; 16-bit ones also by where they round (the references round
# h and each slot's delta to 16 bits, the kernels keep fp32 until the final store).
TOLERANCE = {
    torch.float32: 1e-5,
    torch.float64: 1e-10,
    torch.bfloat16: 2e-2,
    torch.float16: 1e-2,
}

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DISTRIBUTIONS = ("one", "uniform", "zipf", "skewed", "with_none", "empty_slots")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, msg: str = "") -> None:
    """Compare with the tolerance of `dtype` (the compute dtype; default expected.dtype)."""
    dtype = dtype or expected.dtype
    tol = TOLERANCE[dtype]
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{msg} non-finite values in actual"
    scale = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs()
    bound = tol * (e.abs() + scale) + 1e-30
    if not bool((err <= bound).all()):
        worst = int(torch.argmax(err / bound))
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), e.shape))
        raise AssertionError(
            f"{msg} not close for {dtype} (tol {tol}): at {idx} actual {a[idx].item():.6g} "
            f"expected {e[idx].item():.6g}; max abs err {err.max().item():.3g}, max |expected| {scale:.3g}, "
            f"{int((err > bound).sum())} of {e.numel()} elements off"
        )


def routing(dist: str, num_tokens: int, top_k: int, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    """int32[T, K] slots drawn from a named distribution (-1 = no adapter)."""
    shape = (num_tokens, top_k)
    if dist == "one":
        # Every choice of every token to one slot: with K > 1 a token repeats a slot, so
        # several rows of one tile add into the same output row.
        return torch.full(shape, num_slots - 1, dtype=torch.int32)
    if dist == "uniform":
        return torch.randint(0, num_slots, shape, generator=gen, dtype=torch.int32)
    if dist == "zipf":
        probs = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64) ** 1.2
        perm = torch.randperm(num_slots, generator=gen)
        draws = torch.multinomial(probs, num_tokens * top_k, replacement=True, generator=gen)
        return perm[draws].reshape(shape).to(torch.int32)
    if dist == "skewed":
        slots = torch.randint(0, num_slots, shape, generator=gen, dtype=torch.int32)
        hot = torch.rand(shape, generator=gen) < 0.9
        return torch.where(hot, torch.zeros_like(slots), slots)
    if dist == "with_none":
        slots = torch.randint(0, num_slots, shape, generator=gen, dtype=torch.int32)
        return slots.masked_fill(torch.rand(shape, generator=gen) < 0.3, -1)
    if dist == "empty_slots":
        # Only every third slot is used; the rest hold adapters that no token picks.
        used = torch.arange(0, num_slots, 3, dtype=torch.int32)
        slots = used[torch.randint(0, len(used), shape, generator=gen)]
        return slots.masked_fill(torch.rand(shape, generator=gen) < 0.1, -1)
    raise ValueError(f"unknown routing distribution {dist!r}")


@dataclass
class Problem:
    x: torch.Tensor  # [T, D_in]
    lora_a: torch.Tensor  # [S, R, D_in], padding past rank poisoned
    lora_b: torch.Tensor  # [S, D_out, R], padding past rank poisoned
    ranks: torch.Tensor  # int32[S]
    scales: torch.Tensor  # float32[S]
    slots: torch.Tensor  # int32[T, K]
    weights: torch.Tensor  # float32[T, K]
    out: torch.Tensor  # [T, D_out] random non-zero base
    meta: DispatchMeta


def make_ranks(num_slots: int, max_rank: int, gen: torch.Generator, zero_rank_slot: bool = False) -> torch.Tensor:
    """Mixed ranks in [4, max_rank] (max_rank itself included), optionally one empty (rank 0) slot."""
    choices = [r for r in (4, 8, 12, 16, 24, 32, 48, 64) if r <= max_rank] or [max_rank]
    ranks = torch.tensor(choices, dtype=torch.int32)[torch.randint(0, len(choices), (num_slots,), generator=gen)]
    ranks[0] = max_rank
    if zero_rank_slot and num_slots > 1:
        ranks[1] = 0
    return ranks


def make_problem(
    num_tokens: int,
    top_k: int,
    num_slots: int,
    d_in: int,
    d_out: int,
    max_rank: int,
    dtype: torch.dtype,
    dist: str,
    seed: int = 0,
    device: str = "cpu",
    pad_value: float = float("nan"),
    zero_rank_slot: bool = True,
) -> Problem:
    """Random non-zero data; lora padding past each slot's rank holds `pad_value` (NaN: any read shows)."""
    gen = torch.Generator().manual_seed(seed)
    ranks = make_ranks(num_slots, max_rank, gen, zero_rank_slot)
    x = torch.randn(num_tokens, d_in, generator=gen)
    lora_a = torch.randn(num_slots, max_rank, d_in, generator=gen) / d_in**0.5
    lora_b = torch.randn(num_slots, d_out, max_rank, generator=gen) / max_rank**0.5
    for s, r in enumerate(ranks.tolist()):
        lora_a[s, r:] = pad_value
        lora_b[s, :, r:] = pad_value
    scales = torch.rand(num_slots, generator=gen) + 0.5
    slots = routing(dist, num_tokens, top_k, num_slots, gen)
    weights = torch.rand(num_tokens, top_k, generator=gen) + 0.1
    out = torch.randn(num_tokens, d_out, generator=gen)
    to = dict(device=device)
    slots, weights = slots.to(**to), weights.to(**to)
    return Problem(
        x=x.to(dtype=dtype, **to),
        lora_a=lora_a.to(dtype=dtype, **to),
        lora_b=lora_b.to(dtype=dtype, **to),
        ranks=ranks.to(**to),
        scales=scales.to(**to),
        slots=slots,
        weights=weights,
        out=out.to(dtype=dtype, **to),
        meta=build_dispatch(slots, weights, num_slots),
    )


def capture_cuda_graph(step) -> "torch.cuda.CUDAGraph":
    """Run `step` once on a side stream (Triton compiles outside the capture), then capture it
    with CUDA's sync debug mode on "error", so a host sync inside the step fails the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return graph


def naive_shrink(x, lora_a, ranks, slots) -> torch.Tensor:
    """float64[N, R], one (token, k) pair at a time."""
    num_tokens, top_k = slots.shape
    h = torch.zeros(num_tokens * top_k, lora_a.shape[1], dtype=torch.float64)
    for t in range(num_tokens):
        for k in range(top_k):
            s = int(slots[t, k])
            r = int(ranks[s]) if s >= 0 else 0
            if r:
                h[t * top_k + k, :r] = lora_a[s, :r].double() @ x[t].double()
    return h


def naive_expand(h, lora_b, ranks, scales, slots, weights, out) -> torch.Tensor:
    """float64[T, D_out] = out + sum of every pair's weighted delta, one pair at a time."""
    num_tokens, top_k = slots.shape
    result = out.double().clone()
    for t in range(num_tokens):
        for k in range(top_k):
            s = int(slots[t, k])
            r = int(ranks[s]) if s >= 0 else 0
            if r:
                p = t * top_k + k
                coef = weights[t, k].double() * float(scales[s])
                result[t] += coef * (lora_b[s, :, :r].double() @ h[p, :r].double())
    return result


class Group:
    """G modules reading one x: shared routing (module 0's), per-module ranks, scales and weights."""

    def __init__(self, num_tokens, top_k, num_slots, d_in, d_outs, rank, dist, dtype, device=None, seed=0):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.problems = [make_problem(num_tokens, top_k, num_slots, d_in, d, rank, dtype, dist, seed=seed + g,
                                      device=device) for g, d in enumerate(d_outs)]
        p0 = self.problems[0]
        self.x, self.slots, self.weights, self.meta = p0.x, p0.slots, p0.weights, p0.meta
        self.lora_a = torch.stack([p.lora_a for p in self.problems])
        self.lora_b = [p.lora_b for p in self.problems]
        self.ranks = torch.stack([p.ranks for p in self.problems])
        self.scales = torch.stack([p.scales for p in self.problems])
        self.d_outs = list(d_outs)
        # The outs are column slices of one output, as a MoLoRAGroup passes them.
        self.out = torch.cat([p.out for p in self.problems], dim=1)

    def outs(self):
        out = self.out.clone()
        return out, list(out.split(self.d_outs, dim=1))

    def expected(self, x=None, slots=None, weights=None):
        """float64 oracle of out after the step; x, slots, weights: another step's, same adapters."""
        x, slots = (self.x if x is None else x).cpu(), (self.slots if slots is None else slots).cpu()
        weights = (self.weights if weights is None else weights).cpu()
        parts = []
        for g, p in enumerate(self.problems):
            ranks, scales = self.ranks[g].cpu(), self.scales[g].cpu()
            h = naive_shrink(x, self.lora_a[g].cpu(), ranks, slots)
            parts.append(naive_expand(h, p.lora_b.cpu(), ranks, scales, slots, weights, p.out.cpu()))
        return torch.cat(parts, dim=1)


def check_group_graph_replay(apply_shared) -> None:
    """Capture `apply_shared` (a backend's) over a q/k/v-shaped bf16 group on CUDA once, then
    replay it after the routing (and x) changed: the kernels read the dispatch buffers at their
    fixed addresses and sync with nothing, so each replay matches the float64 oracle of its step."""
    from kernels.meta import DispatchBuffers

    num_tokens, top_k, num_slots, d_outs = 16, 2, 8, (1024, 512, 512)
    first = Group(num_tokens, top_k, num_slots, 1024, d_outs, 16, "uniform", torch.bfloat16, device="cuda", seed=1)
    second = Group(num_tokens, top_k, num_slots, 1024, d_outs, 16, "with_none", torch.bfloat16, device="cuda", seed=1)
    second.x = torch.randn_like(first.x)  # same adapters (seed), new tokens and routing
    buffers = DispatchBuffers(num_tokens, top_k, num_slots, device="cuda")
    meta = buffers.build(first.slots, first.weights)
    x = first.x.clone()
    out, outs = first.outs()

    def step():
        apply_shared(x, first.lora_a, first.lora_b, first.ranks, first.scales, meta, outs)

    graph = capture_cuda_graph(step)
    for step_inputs, name in ((first, "first"), (second, "new")):
        buffers.build(step_inputs.slots, step_inputs.weights)
        x.copy_(step_inputs.x)
        out.copy_(first.out)
        graph.replay()
        torch.cuda.synchronize()
        expected = first.expected(step_inputs.x, step_inputs.slots, step_inputs.weights)
        assert_close(out, expected, torch.bfloat16, f"replay with the {name} routing")


# Decode-group cases (T, K, S, D_in, D_outs, R, routing) at real shapes, for the GPU tests of the
# one-launch decode kernels.
GPU_GROUP_CASES = [
    (16, 2, 8, 4096, (4096, 1024, 1024), 16, "with_none"),
    (64, 1, 16, 4096, (14336, 14336), 64, "zipf"),
    (8, 4, 4, 1024, (1024, 512, 512), 128, "uniform"),
    (32, 2, 4, 3072, (1024,), 16, "skewed"),
]


def group_case_id(c) -> str:
    return "T{}K{}S{}D{}x{}R{}-{}".format(c[0], c[1], c[2], c[3], "+".join(map(str, c[4])), c[5], c[6])
