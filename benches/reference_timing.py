"""What the single-case reference scripts share: timing a case and printing its JSON line, the
same fields as benches/common/mod.rs."""

import json
import resource
import time

import torch


def time_runs(run, iters):
    """Seconds of `iters` calls of `run`, after one warm-up call."""
    run()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def print_report(case, implementation, times, **extra):
    """Prints the case's JSON line: the mean and minimum of `times`, the peak RSS, and `extra`."""
    print(json.dumps({
        "case": case,
        "impl": implementation,
        "device": f"cpu, {torch.get_num_threads()} threads",
        "iters": len(times),
        "mean_s": sum(times) / len(times),
        "min_s": min(times),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **extra,
    }))
