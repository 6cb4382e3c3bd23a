#!/usr/bin/env python3
"""AdamW8bit fixtures: the parameter trajectories that bitsandbytes' `bnb.optim.AdamW8bit`
(block-wise 8-bit states, as kohya-ss/sd-scripts runs it on CUDA) produces from a fixed gradient
sequence, for lora-train's `--optimizer adamw8bit` to reproduce.

Writes tests/fixtures/optimizers-8bit/:
  trajectories.safetensors
    qmap.signed, qmap.unsigned   f32[256]: the first-moment ("dynamic", signed) and second-moment
                                 ("udynamic") maps, create_dynamic_map(signed=True/False)
    grad.p<i>.step<t>            bf16: the gradient fed at step t (1..40); the reference used its
                                 exact f32 value (bf16 keeps the file small)
    <case>.p<i>.step<t>          f32: the parameters after step t (t = 0 is the start); every step
                                 for every parameter, except p0 of a case that lists `p0_steps`
    <case>.p0.{state1,state2}.step<t>    u8: the codes of m and v after step t (STATE_STEPS)
    <case>.p0.{absmax1,absmax2}.step<t>  f32[17]: their per-block scales
    quant.x_signed / quant.code_signed       probes of the signed quantiser (before the sign fix)
    quant.x_unsigned / quant.code_unsigned   probes of the unsigned quantiser
  cases.json   per case: optimizer, lr, weight_decay, --optimizer-args; per-step lr multipliers,
               shapes, which parameters are 8-bit, the constants, versions, and how far
               bitsandbytes' own CPU backend lands from the reference

Three parameters: p0 (8, 521) = 4168 elements >= min_8bit_size 4096, so its states are 8-bit: 16
full blocks of 256 and a partial 17th of 72; p1 (8, 4) zeros (LoRA's `up`) and p2 (5,) keep f32
states. p0's gradients are zero for the first two steps (as `down`'s while `up` is still zero),
its block 5 always (its scales stay 0), its per-element magnitudes spread over 1.5 decades and
its overall scale over one (the 32-bit parameters' over three, as in make_optimizer_fixtures.py),
so that v / absmax reaches the map's fine codes. No other exact zeros in p0, and no wider ranges:
an entry whose v is quantised to code 0 while its m is not (v / absmax2 < 1.625e-7, i.e. |g| below
~4e-4 of the block's largest, while |m| / absmax1 >= 2.75e-7) divides m by little more than eps at
its next tiny or zero gradient and jumps (by 1e1..1e2 with lr 1e-2 in a trial with three decades
of spread and exact zeros): real kernel behaviour, but chaotic, no use for a parity test. The
script asserts that no step moves an entry of p0 by more than 5 lr.

The reference is the CUDA kernel that CUDA users (kohya) run, re-implemented element by element in
f32 because this machine has no GPU. Sources (bitsandbytes-foundation/bitsandbytes; the kernel is
the same from 0.45.0 to 0.50.2 and main of 2026-08, block size 256 since 0.44.0):
  bitsandbytes/optim/adamw.py      AdamW8bit: Optimizer2State("adam", ..., optim_bits=8,
                                   min_8bit_size=4096); percentile_clipping=100 (off) and
                                   block_wise=True up to 0.49, both removed in 0.50; max_unorm 0
  bitsandbytes/optim/optimizer.py  Optimizer2State.init_state: numel < min_8bit_size -> f32 states;
                                   else u8 zeros, qmap1 = dynamic (signed), qmap2 = udynamic,
                                   absmax1/2 = zeros(ceil(n / 256)); update_step: step += 1 first
  bitsandbytes/functional.py       create_dynamic_map (copied below as `dynamic_map`)
  csrc/ops.cu                      BLOCKSIZE_2STATE 256, NUM_2STATE 1: one 256-thread CUDA block
                                   per 256 elements
  csrc/kernels.cu                  kOptimizerStatic8bit2StateBlockwise (8-bit), quantize_2D (the
                                   quantiser), kOptimizer32bit2State case ADAM (32-bit)
Hyper-parameters reach the kernels as C floats (ct.c_float): lr, betas, eps and weight decay are
rounded to f32 first. Left out, as no CPU reproduces them: __powf and __fdividef are approximate
(~2 ulp) on the GPU, and nvcc contracts a*b+c into FMA. Here every operation is one correctly
rounded f32 op in the order the source writes it, and powers are taken in f64 and rounded to f32,
so a port doing the same ops in the same order can match bit for bit.

bitsandbytes >= 0.50.0 also steps AdamW8bit on CPU tensors (backends/cpu/ops.py,
_optimizer_update_8bit_blockwise_cpu, PR #1901) but with a different algorithm: decay before the
step, states re-quantised through a 65536-bin look-up table (csrc/cpu_ops.cpp, quantize_cpu_impl)
rather than to the nearest code, no sign fix, padding not in the block maxima. The script
re-implements that too (`cpu_backend_*`) and asserts that it matches bitsandbytes on CPU exactly,
checks the maps, dequantisation and quantiser against bitsandbytes' own functions, and records in
cases.json how far bitsandbytes-on-CPU lands from the CUDA reference. Nothing expected is typed
in. Usage (bitsandbytes is needed for the cross-checks; its CPU part runs without a GPU):
    pip install bitsandbytes==0.50.2
    python tests/reference/make_adamw8bit_fixtures.py [--out tests/fixtures/optimizers-8bit]
"""

import argparse
import json
import math
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED = 20261204
STEPS = 40
SHAPES = [(8, 521), (8, 4), (5,)]
LR_SHAPE = [0.25, 0.5, 0.75] + [1.0 - 0.6 * t / (STEPS - 4) for t in range(STEPS - 3)]
BLOCK = 256  # csrc/ops.cu BLOCKSIZE_2STATE; optimizer.py init_state's blocksize
MIN_8BIT_SIZE = 4096  # AdamW8bit's default; a parameter with fewer elements keeps f32 states
ZERO_BLOCK = 5  # p0's block whose gradient is always zero
STATE_STEPS = [1, 2, 3, 4, 20, 40]
F32 = torch.float32

CASES = {
    "adamw8bit": dict(optimizer="adamw8bit", lr=1e-2, weight_decay=1e-2, args={}),
    "adamw8bit_betas": dict(optimizer="adamw8bit", lr=3e-3, weight_decay=0.0,
                            args={"betas": "0.8,0.95", "eps": "1e-6"},
                            p0_steps=[0, 1, 2, 3, 4, 5, 10, 20, 30, 40]),
}


def f32(x):
    """A 0-dim f32 tensor: arithmetic with it stays in f32, one rounding per op."""
    return torch.tensor(x, dtype=F32)


def sqrt32(x):
    """The correctly rounded f32 square root (sqrtf, Rust's f32::sqrt). torch.sqrt is not one on
    every CPU (its AVX-512 kernel is 0.5001-ulp Sleef); numpy's is the hardware instruction."""
    out = torch.from_numpy(np.asarray(np.sqrt(x.numpy()), dtype=np.float32))
    assert torch.equal(out, torch.sqrt(x.double()).float()), "f32 sqrt is not correctly rounded"
    return out


# ---------------------------------------------------------------------------------------------
# Maps (bitsandbytes/functional.py create_dynamic_map, max_exponent_bits=7, total_bits=8)


def dynamic_map(signed):
    """For i in 0..6 (decade 10^(i-6)): linspace(0.1, 1, k) in f32 with k = 2^i + 1 (signed) or
    2^(i+1) + 1 (unsigned); the k-1 midpoints of neighbours ((a + b) / 2 in f32), times 10^(i-6)
    (f32); signed adds each negated. Then 0 and 1.0, sorted: signed = 127 negatives, 0 at index 127,
    127 positives, 1.0 at 255 (code[0] = -0.99297, not -1); unsigned = 0 at index 0, 254 positives,
    1.0 at 255. torch.linspace's f32 rounding depends on the CPU's vector width, so a port should
    embed these 2 x 256 values rather than recompute them."""
    data = []
    for i in range(7):
        items = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        boundaries = torch.linspace(0.1, 1, items, dtype=F32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    assert len(data) == 256
    data.sort()
    return torch.tensor(data, dtype=F32)


# ---------------------------------------------------------------------------------------------
# The CUDA reference (csrc/kernels.cu)


def quantize_2d(x, code, signed):
    """quantize_2D<SIGNED>: a 7-step binary search from pivot 127 (steps 64, 32, .., 1; the first
    two probes read code[127] then code[63]/code[191], the `quadrants`), keeping the last codes
    below (lower_pivot, start 0, value -1 signed / 0 unsigned) and above (upper_pivot, start 255,
    value 1.0). Then, with val = code[pivot]:
      x > val:  midpoint = (upper + val) * 0.5f;  x > midpoint ? upper_pivot : pivot
      else:     midpoint = (lower + val) * 0.5f;  x < midpoint ? lower_pivot : pivot
    so the nearest code: the number of f32 midpoints (code[k] + code[k+1]) * 0.5f below x, except
    that x equal to a midpoint takes the even index of the two (the search always ends on an even
    pivot); NaN (0 / 0) gives 0."""
    pivot = torch.full(x.shape, 127, dtype=torch.long)
    upper_pivot = torch.full(x.shape, 255, dtype=torch.long)
    lower_pivot = torch.zeros(x.shape, dtype=torch.long)
    lower = torch.full(x.shape, -1.0 if signed else 0.0, dtype=F32)
    upper = torch.full(x.shape, 1.0, dtype=F32)
    val = code[pivot]
    for i in (64, 32, 16, 8, 4, 2, 1):
        above = x > val
        lower_pivot = torch.where(above, pivot, lower_pivot)
        lower = torch.where(above, val, lower)
        upper_pivot = torch.where(above, upper_pivot, pivot)
        upper = torch.where(above, upper, val)
        pivot = torch.where(above, pivot + i, pivot - i)
        val = code[pivot]
    above = x > val
    mid_up = (upper + val) * 0.5
    mid_lo = (lower + val) * 0.5
    out = torch.where(above, torch.where(x > mid_up, upper_pivot, pivot),
                      torch.where(x < mid_lo, lower_pivot, pivot))
    return out.to(torch.uint8)


def sign_fix(c1, s1, code1):
    """After quantising m: if signbit(code1[c1]) != signbit(m), c1 += 1 when m > 0 else c1 -= 1
    (unsigned char, so 0 - 1 wraps to 255: what a zero block gets, harmlessly, as absmax is 0)."""
    wrong = torch.signbit(code1[c1.long()]) != torch.signbit(s1)
    step = torch.where(s1 > 0, 1, -1)
    return torch.where(wrong, (c1.long() + step) % 256, c1.long()).to(torch.uint8)


def corrections(beta1, beta2, step):
    """correction1 = 1 - beta1^t, correction2 = sqrtf(1 - beta2^t), f32; the powers in f64 from the
    f32 betas, rounded to f32."""
    c1 = f32(1.0) - f32(float(beta1) ** step)
    c2 = sqrt32(f32(1.0) - f32(float(beta2) ** step))
    return c1, c2


def cuda_step_8bit(p, g, st, beta1, beta2, eps, lr, wd, step, code1, code2):
    """kOptimizerStatic8bit2StateBlockwise<float, ADAM, 256, 1>, one CUDA block per 256 elements.
    The partial last block is padded with g = 0, state1 code 128, state2 code 0 (cub BlockLoad
    defaults) and the padding takes part in the block maxima (as 0.9 * 5.5e-7 * the old maximum,
    which never decides one here: a port may take the maxima over the real entries only)."""
    n = p.numel()
    blocks = -(-n // BLOCK)
    pad = blocks * BLOCK - n
    c1, c2 = corrections(beta1, beta2, step)
    step_size = (-lr * c2) / c1
    eps_c2 = c2 * eps
    gp = torch.cat([g.reshape(-1), torch.zeros(pad, dtype=F32)]).view(blocks, BLOCK)
    q1 = torch.cat([st["state1"], torch.full((pad,), 128, dtype=torch.uint8)]).view(blocks, BLOCK)
    q2 = torch.cat([st["state2"], torch.zeros(pad, dtype=torch.uint8)]).view(blocks, BLOCK)
    finite = torch.isfinite(gp)
    # dequantise, then v = v*beta2 + ((1-beta2)*g)*g and m = m*beta1 + (1-beta1)*g, f32
    s2 = code2[q2.long()] * st["absmax2"].view(-1, 1)
    s2 = s2 * beta2 + ((f32(1.0) - beta2) * gp) * gp
    s1 = code1[q1.long()] * st["absmax1"].view(-1, 1)
    s1 = s1 * beta1 + (f32(1.0) - beta1) * gp
    s1 = torch.where(finite, s1, f32(0.0))  # a NaN/inf gradient zeroes the states, skips p
    s2 = torch.where(finite, s2, f32(0.0))
    absmax1 = s1.abs().amax(dim=1)  # new block maxima, padding included
    absmax2 = s2.abs().amax(dim=1)
    # p += step_size * (m / (sqrt(v) + correction2*eps)); then p *= 1 - lr*wd (after the step)
    pp = torch.cat([p.reshape(-1), torch.zeros(pad, dtype=F32)]).view(blocks, BLOCK)
    new = pp + step_size * (s1 / (sqrt32(s2) + eps_c2))
    if float(wd) > 0:
        new = new * (f32(1.0) - lr * wd)
    new = torch.where(finite, new, pp)
    # re-quantise with the new maxima: x = m / absmax1 (signed map, sign fix), v / absmax2
    n1 = quantize_2d(s1 / absmax1.view(-1, 1), code1, True)
    n1 = sign_fix(n1, s1, code1)
    n2 = quantize_2d(s2 / absmax2.view(-1, 1), code2, False)
    st["state1"] = n1.reshape(-1)[:n].contiguous()
    st["state2"] = n2.reshape(-1)[:n].contiguous()
    st["absmax1"], st["absmax2"] = absmax1, absmax2
    return new.reshape(-1)[:n].view(p.shape).contiguous()


def cuda_step_32bit(p, g, st, beta1, beta2, eps, lr, wd, step):
    """kOptimizer32bit2State<float, ADAM> (skip_zeros False, max_unorm 0, gnorm_scale 1):
    m = m*beta1 + (1-beta1)*g; v = v*beta2 + (1-beta2)*(g*g);
    p += (-lr*correction2/correction1) * (m / (sqrt(v) + eps*correction2)); p *= 1 - lr*wd."""
    c1, c2 = corrections(beta1, beta2, step)
    step_size = (-lr * c2) / c1
    st["m"] = st["m"] * beta1 + (f32(1.0) - beta1) * g
    st["v"] = st["v"] * beta2 + (f32(1.0) - beta2) * (g * g)
    new = p + step_size * (st["m"] / (sqrt32(st["v"]) + eps * c2))
    if float(wd) > 0:
        new = new * (f32(1.0) - lr * wd)
    return new


def cuda_init_state(p):
    if p.numel() < MIN_8BIT_SIZE:
        return {"m": torch.zeros_like(p), "v": torch.zeros_like(p)}
    blocks = -(-p.numel() // BLOCK)
    return {"state1": torch.zeros(p.numel(), dtype=torch.uint8),
            "state2": torch.zeros(p.numel(), dtype=torch.uint8),
            "absmax1": torch.zeros(blocks, dtype=F32), "absmax2": torch.zeros(blocks, dtype=F32)}


def cuda_step(p, g, st, hp, lr, step, code1, code2):
    beta1, beta2, eps, wd = f32(hp["betas"][0]), f32(hp["betas"][1]), f32(hp["eps"]), f32(hp["wd"])
    lr = f32(lr)
    if "m" in st:
        return cuda_step_32bit(p, g, st, beta1, beta2, eps, lr, wd, step)
    return cuda_step_8bit(p, g, st, beta1, beta2, eps, lr, wd, step, code1, code2)


# ---------------------------------------------------------------------------------------------
# bitsandbytes' CPU backend (backends/cpu/ops.py + csrc/cpu_ops.cpp), for the cross-check only


def cpu_backend_lut(code):
    """build_quantize_lut: 65536 bins over [-1, 1], val_i = -1 + (2 i) / 65535 (f32); each bin gets
    the first code whose f32 midpoint to the next one is not below val_i."""
    mids = (code[:-1] + code[1:]) * 0.5
    i = torch.arange(65536)
    vals = f32(-1.0) + (f32(2.0) * i.to(F32)) / f32(65535.0)
    return torch.searchsorted(mids, vals, side="left").to(torch.uint8)


def cpu_backend_quantize(a, code, lut):
    """quantize_cpu_impl: per 256-block absmax; 0 -> codes 0; else
    lut[uint16((clamp(v * (1/absmax), -1, 1) + 1) * 0.5 * 65535 + 0.5)]."""
    n = a.numel()
    blocks = -(-n // BLOCK)
    flat = torch.cat([a.reshape(-1), torch.zeros(blocks * BLOCK - n, dtype=F32)])
    flat = flat.view(blocks, BLOCK)
    absmax = flat.abs().amax(dim=1)
    inv = torch.where(absmax == 0, f32(0.0), f32(1.0) / absmax)  # a zero block is skipped
    v = torch.clamp(flat * inv.view(-1, 1), -1.0, 1.0)
    idx = ((v + f32(1.0)) * f32(0.5) * f32(65535.0) + f32(0.5)).to(torch.int64)
    out = lut[idx]
    out = torch.where((absmax == 0).view(-1, 1), torch.zeros_like(out), out)
    return out.reshape(-1)[:n].contiguous(), absmax


def cpu_backend_dequantize(q, absmax, code):
    n = q.numel()
    blocks = absmax.numel()
    qq = torch.cat([q.reshape(-1), torch.zeros(blocks * BLOCK - n, dtype=torch.uint8)])
    return (code[qq.long()].view(blocks, BLOCK) * absmax.view(-1, 1)).reshape(-1)[:n]


def cpu_backend_step(p, g, st, hp, lr, step, code1, code2, luts):
    """_optimizer_update_8bit_blockwise_cpu / _optimizer_update_32bit_cpu, same torch calls."""
    beta1, beta2, eps, wd = hp["betas"][0], hp["betas"][1], hp["eps"], hp["wd"]
    correction1 = 1.0 - beta1 ** step
    correction2 = math.sqrt(1.0 - beta2 ** step)
    grad = g.float() * 1.0
    p_fp32 = p.clone()
    if "m" in st:
        st["m"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
        st["v"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        step_size = -lr * correction2 / correction1
        if wd > 0.0:
            p_fp32.mul_(1.0 - lr * wd)
        update = st["m"] / (st["v"].sqrt() + eps * correction2)
        p_fp32.add_(update, alpha=step_size)
        return p_fp32
    s1 = cpu_backend_dequantize(st["state1"], st["absmax1"], code1).view(p.shape)
    s2 = cpu_backend_dequantize(st["state2"], st["absmax2"], code2).view(p.shape)
    s1.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    s2.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = (s2.sqrt() / correction2).add_(eps)
    if wd > 0.0:
        p_fp32.mul_(1.0 - lr * wd)
    p_fp32.addcdiv_(s1, denom, value=-lr / correction1)
    st["state1"], st["absmax1"] = cpu_backend_quantize(s1, code1, luts[0])
    st["state2"], st["absmax2"] = cpu_backend_quantize(s2, code2, luts[1])
    return p_fp32


# ---------------------------------------------------------------------------------------------


def make_gradients(gen):
    start = [torch.randn(SHAPES[0], generator=gen) * 0.1, torch.zeros(SHAPES[1]),
             torch.randn(SHAPES[2], generator=gen)]
    directions = [torch.randn(shape, generator=gen) for shape in SHAPES]
    spread = 10.0 ** (-1.5 * torch.rand(SHAPES[0], generator=gen))  # per-element magnitudes
    grads = []
    for t in range(STEPS):
        step = []
        for i, shape in enumerate(SHAPES):
            scale = 10.0 ** float(torch.randint(-3, 1, (1,), generator=gen))
            if i == 0:  # within a decade from step to step, as a loss's gradients are
                scale = 10.0 ** -float(torch.rand(1, generator=gen))
            g = (directions[i] + 0.5 * torch.randn(shape, generator=gen)) * scale
            if i == 0:
                g = g * spread
                g.view(-1)[ZERO_BLOCK * BLOCK:(ZERO_BLOCK + 1) * BLOCK] = 0.0
                if t < 2:
                    g = torch.zeros(shape)  # untouched while LoRA's up is still zero
            if i == 2:
                g[torch.rand(shape, generator=gen) < 0.3] = 0.0
            # Fed as stored: bf16 values, exactly widened to f32.
            step.append(g.to(torch.bfloat16).to(F32))
        grads.append(step)
    return start, grads


def hyper(case):
    args = case["args"]
    betas = tuple(float(b) for b in args["betas"].split(",")) if "betas" in args else (0.9, 0.999)
    return {"betas": betas, "eps": float(args.get("eps", 1e-8)), "wd": case["weight_decay"]}


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_maps_and_quantiser(code1, code2):
    assert torch.equal(code1, bnbF.create_dynamic_map(signed=True)), "signed map differs from bnb"
    assert torch.equal(code2, bnbF.create_dynamic_map(signed=False)), "unsigned map differs"
    assert code1[127] == 0 and code1[255] == 1 and code2[0] == 0 and code2[255] == 1
    assert bool((code1[1:] > code1[:-1]).all() and (code2[1:] > code2[:-1]).all())
    gen = torch.Generator().manual_seed(SEED + 1)
    probes = {}
    for signed, code in ((True, code1), (False, code2)):
        lo = -1.0 if signed else 0.0
        mids = (code[:-1] + code[1:]) * 0.5  # f32, as the kernel forms them
        mag = 10.0 ** (-7.0 * torch.rand(3000, generator=gen))
        sgn = torch.where(torch.rand(3000, generator=gen) < 0.5, -1.0, 1.0) if signed else 1.0
        up, down = torch.nextafter(mids, f32(2.0)), torch.nextafter(mids, f32(-2.0))
        x = torch.cat([code, mids, up, down, torch.rand(2000, generator=gen) * (1 - lo) + lo,
                       mag * sgn, torch.tensor([0.0, -0.0, 1.0, lo, 1e-30])]).to(F32)
        x = x[(x >= lo) | (x == 0)]
        q = quantize_2d(x, code, signed)
        # The rule: count the f32 midpoints below x; on a midpoint, the even index of the two.
        k = torch.searchsorted(mids, x, side="left")
        on_mid = (k < 255) & (mids[k.clamp(max=254)] == x)
        rule = torch.where(on_mid, k + k % 2, k)
        assert torch.equal(q.long(), rule), "quantize_2d breaks the midpoint rule"
        # ... which is the nearest code (f64 distances) wherever x is not within an ulp of a tie.
        d = (x.double().view(-1, 1) - code.double().view(1, -1)).abs()
        two = d.topk(2, dim=1, largest=False).values
        tie = (two[:, 1] - two[:, 0]) <= 2 * 2.0 ** -23 * x.double().abs().clamp_min(1e-38)
        assert bool(((q.long() == d.argmin(dim=1)) | tie).all()), "not the nearest code"
        probes[signed] = (x.contiguous(), q.contiguous())
        # bnb's dequantize_blockwise on CPU is code[q] * absmax, bit for bit.
        a = torch.randn(5000, generator=gen) * 10.0 ** (-3 * torch.rand(5000, generator=gen))
        if not signed:
            a = a.abs()
        qb, state = bnbF.quantize_blockwise(a, code=code, blocksize=BLOCK)
        ours = cpu_backend_dequantize(qb, state.absmax, code)
        assert torch.equal(bnbF.dequantize_blockwise(qb, state).view(-1), ours)
        # bnb's CPU quantize_blockwise uses the 65536-bin table: the emulation matches it exactly,
        # and it differs from the exact nearest code only within a bin's width of a midpoint.
        lut = cpu_backend_lut(code)
        mine, absmax = cpu_backend_quantize(a, code, lut)
        assert torch.equal(absmax, state.absmax)
        assert torch.equal(mine, qb), f"LUT emulation differs at {int((mine != qb).sum())} places"
        exact = quantize_2d(a / absmax.repeat_interleave(BLOCK)[:a.numel()], code, signed)
        print(f"  {'signed' if signed else 'unsigned'} map: bnb CPU quantize_blockwise (LUT) "
              f"differs from the nearest code at {int((exact != qb).sum())} of {a.numel()}")
    return probes


def check_port(tensors):
    """A second, plain port of the rules (numpy f32, the quantiser as a midpoint count with the
    even-index tie rule), as lora-train would write it: it must reproduce every recorded tensor
    bit for bit, from the stored start, gradients and maps alone."""
    f = np.float32
    T = {k: v.float().numpy().reshape(-1) if v.dtype == torch.bfloat16 else v.numpy().reshape(-1)
         for k, v in tensors.items()}
    codes = (T["qmap.signed"], T["qmap.unsigned"])
    mids = [(c[:-1] + c[1:]) * f(0.5) for c in codes]

    def quant(x, mid):
        k = np.searchsorted(mid, x, side="left")
        k = np.where((k < 255) & (mid[np.minimum(k, 254)] == x), k + k % 2, k)
        return np.where(np.isnan(x), 0, k)  # 0 / 0 (a block of zeros)

    for name, case in CASES.items():
        hp = hyper(case)
        b1, b2, eps, wd = f(hp["betas"][0]), f(hp["betas"][1]), f(hp["eps"]), f(hp["wd"])
        ps = [T[f"{name}.p{i}.step0"].copy() for i in range(len(SHAPES))]
        n = ps[0].size
        blocks = -(-n // BLOCK)
        pad = blocks * BLOCK - n
        blk = np.arange(blocks * BLOCK) // BLOCK
        q1, q2 = np.zeros(n, np.int64), np.zeros(n, np.int64)
        a1, a2 = np.zeros(blocks, f), np.zeros(blocks, f)
        mv = [(np.zeros_like(p), np.zeros_like(p)) for p in ps[1:]]
        for t in range(1, STEPS + 1):
            lr = f(case["lr"] * LR_SHAPE[t - 1])
            c1 = f(1) - f(float(b1) ** t)
            c2 = np.sqrt(f(1) - f(float(b2) ** t))
            step_size = (-lr * c2) / c1
            gs = [T[f"grad.p{i}.step{t}"] for i in range(len(SHAPES))]
            g = np.concatenate([gs[0], np.zeros(pad, f)])
            v = codes[1][np.concatenate([q2, np.zeros(pad, np.int64)])] * a2[blk]
            v = v * b2 + ((f(1) - b2) * g) * g
            m = codes[0][np.concatenate([q1, np.full(pad, 128)])] * a1[blk]
            m = m * b1 + (f(1) - b1) * g
            a1 = np.abs(m).reshape(blocks, BLOCK).max(1)
            a2 = np.abs(v).reshape(blocks, BLOCK).max(1)
            p = np.concatenate([ps[0], np.zeros(pad, f)])
            p = p + step_size * (m / (np.sqrt(v) + c2 * eps))
            if wd > 0:
                p = p * (f(1) - lr * wd)
            with np.errstate(invalid="ignore", divide="ignore"):
                n1, n2 = quant(m / a1[blk], mids[0]), quant(v / a2[blk], mids[1])
            wrong = np.signbit(codes[0][n1]) != np.signbit(m)
            n1 = np.where(wrong, (n1 + np.where(m > 0, 1, -1)) % 256, n1)
            q1, q2, ps[0] = n1[:n], n2[:n], p[:n]
            for j, (mj, vj) in enumerate(mv):
                gj = gs[j + 1]
                mj, vj = mj * b1 + (f(1) - b1) * gj, vj * b2 + (f(1) - b2) * (gj * gj)
                ps[j + 1] = ps[j + 1] + step_size * (mj / (np.sqrt(vj) + eps * c2))
                if wd > 0:
                    ps[j + 1] = ps[j + 1] * (f(1) - lr * wd)
                mv[j] = (mj, vj)
            for key, ours in [(f"{name}.p{i}.step{t}", p) for i, p in enumerate(ps)] + [
                    (f"{name}.p0.{k}.step{t}", x)
                    for k, x in (("state1", q1), ("state2", q2), ("absmax1", a1), ("absmax2", a2))]:
                if key in T:
                    assert np.array_equal(T[key], ours), f"the numpy port differs at {key}"
    for cname, mid in (("signed", mids[0]), ("unsigned", mids[1])):
        assert np.array_equal(quant(T[f"quant.x_{cname}"], mid), T[f"quant.code_{cname}"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "tests/fixtures/optimizers-8bit")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    code1, code2 = dynamic_map(True), dynamic_map(False)
    print("checking maps and quantiser against bitsandbytes", bnb.__version__)
    probes = check_maps_and_quantiser(code1, code2)
    luts = (cpu_backend_lut(code1), cpu_backend_lut(code2))

    gen = torch.Generator().manual_seed(SEED)
    start, grads = make_gradients(gen)
    tensors = {"qmap.signed": code1, "qmap.unsigned": code2,
               "quant.x_signed": probes[True][0], "quant.code_signed": probes[True][1],
               "quant.x_unsigned": probes[False][0], "quant.code_unsigned": probes[False][1]}
    for t, step in enumerate(grads):
        for i, g in enumerate(step):
            tensors[f"grad.p{i}.step{t + 1}"] = g.to(torch.bfloat16).contiguous()
    eight_bit = [math.prod(s) >= MIN_8BIT_SIZE for s in SHAPES]
    assert eight_bit == [True, False, False] and math.prod(SHAPES[0]) % BLOCK != 0

    deviations = {}
    for name, case in CASES.items():
        hp = hyper(case)
        p0_steps = set(case.get("p0_steps", range(STEPS + 1)))
        params = [p.clone() for p in start]
        states = [cuda_init_state(p) for p in params]
        # bitsandbytes itself on CPU, and our emulation of that backend
        bnb_params = [torch.nn.Parameter(p.clone()) for p in start]
        bnb_opt = bnb.optim.AdamW8bit(bnb_params, lr=case["lr"], betas=hp["betas"], eps=hp["eps"],
                                      weight_decay=hp["wd"])
        emu_params = [p.clone() for p in start]
        emu_states = [{k: v.clone() for k, v in cuda_init_state(p).items()} for p in start]
        for i, p in enumerate(params):
            tensors[f"{name}.p{i}.step0"] = p.clone()
        worst = [0.0] * len(SHAPES)
        for t, step in enumerate(grads):
            lr = case["lr"] * LR_SHAPE[t]
            prev0 = params[0]
            params = [cuda_step(p, g, st, hp, lr, t + 1, code1, code2)
                      for p, g, st in zip(params, step, states)]
            emu_params = [cpu_backend_step(p, g, st, hp, lr, t + 1, code1, code2, luts)
                          for p, g, st in zip(emu_params, step, emu_states)]
            bnb_opt.param_groups[0]["lr"] = lr
            for p, g in zip(bnb_params, step):
                p.grad = g.clone()
            bnb_opt.step()
            jump = float((params[0] - prev0).abs().max())
            assert jump <= 5 * lr, f"{name} step {t + 1}: p0 moved by {jump:.3g} (lr {lr:.3g})"
            for i, (p, e, b) in enumerate(zip(params, emu_params, bnb_params)):
                assert torch.equal(e, b.detach()), f"{name} p{i} step {t + 1}: CPU emulation != bnb"
                assert bool(torch.isfinite(p).all())
                if i != 0 or t + 1 in p0_steps:
                    tensors[f"{name}.p{i}.step{t + 1}"] = p.clone()
                moved = p - start[i]
                if moved.norm() > 0:
                    worst[i] = max(worst[i], rel(b.detach() - start[i], moved))
            bst = bnb_opt.state[bnb_params[0]]
            for key in ("state1", "state2", "absmax1", "absmax2"):
                assert torch.equal(bst[key].view(-1), emu_states[0][key]), f"{name} {key} {t + 1}"
            if t + 1 in STATE_STEPS:
                for key in ("state1", "state2", "absmax1", "absmax2"):
                    tensors[f"{name}.p0.{key}.step{t + 1}"] = states[0][key].clone()
        # The 32-bit parameters follow the same formulas on both backends up to rounding.
        assert worst[1] < 1e-4 and worst[2] < 1e-4, worst
        deviations[name] = [float(f"{w:.3e}") for w in worst]
        print(f"  {name}: bnb-on-CPU vs the CUDA reference, worst relative distance of the "
              f"displacement p_t - p_0 per parameter: {deviations[name]}")
    check_port(tensors)
    print("  a plain numpy port of the rules reproduces every recorded tensor bit for bit")
    save_file(tensors, out / "trajectories.safetensors")
    meta = {
        "seed": SEED,
        "steps": STEPS,
        "parameters": len(SHAPES),
        "shapes": SHAPES,
        "eight_bit": eight_bit,
        "block_size": BLOCK,
        "min_8bit_size": MIN_8BIT_SIZE,
        "zero_block_of_p0": ZERO_BLOCK,
        "state_steps": STATE_STEPS,
        "lr_multipliers": LR_SHAPE,
        "cases": CASES,
        "gradients": "stored as bf16; the reference was fed their exact f32 widening",
        "reference": "bitsandbytes' CUDA kernels (kOptimizerStatic8bit2StateBlockwise, "
                     "kOptimizer32bit2State) re-implemented in f32 on CPU, one rounding per op",
        "bnb_cpu_backend_deviation": deviations,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "bitsandbytes": version("bitsandbytes")},
    }
    (out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {len(CASES)} cases to {out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
