"""The attention benchmark cases measured with PyTorch's scaled_dot_product_attention, printing
the same JSON.

    python benches/attention_reference.py <self-4096|cross-4096|self-1024|cross-1024|self-256|self-9216> [--iters N]

Batch 1, 8 heads (5 for self-9216), f32, one warm-up run then the timed ones, as
benches/attention.rs: a run is the forward pass and the backward pass to queries, keys and
values for an output gradient of ones.
"""

import sys
import time

import torch
from reference_timing import print_report, time_runs

# case: (queries, keys, heads, head_dim)
CASES = {"self-4096": (4096, 4096, 8, 40), "cross-4096": (4096, 77, 8, 40),
         "self-1024": (1024, 1024, 8, 80), "cross-1024": (1024, 77, 8, 80),
         "self-256": (256, 256, 8, 160), "self-9216": (9216, 9216, 5, 64)}


def main():
    args = sys.argv[1:]
    case = args[0]
    iters = int(args[args.index("--iters") + 1]) if "--iters" in args else 3
    queries, keys, heads, head_dim = CASES[case]
    torch.manual_seed(0)
    q = torch.randn(1, heads, queries, head_dim, requires_grad=True)
    k = torch.randn(1, heads, keys, head_dim, requires_grad=True)
    v = torch.randn(1, heads, keys, head_dim, requires_grad=True)
    forward_s = []

    def run():
        t0 = time.perf_counter()
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        forward_s.append(time.perf_counter() - t0)
        out.backward(torch.ones_like(out))
        assert all(x.grad is not None for x in (q, k, v))
        q.grad = k.grad = v.grad = None

    times = time_runs(run, iters)
    print_report(case, f"torch {torch.__version__} scaled_dot_product_attention", times,
                 forward_mean_s=sum(forward_s[1:]) / iters)


if __name__ == "__main__":
    main()
