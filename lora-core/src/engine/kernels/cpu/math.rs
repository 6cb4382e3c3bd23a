//! Elementwise math for the CPU kernels, written so the compiler vectorises it: an exponential in
//! plain f32 arithmetic (step by step over blocks of values for softmax rows), reductions over
//! independent lanes (a single running sum is a dependency chain the compiler may not reorder), and
//! [`simd_dispatch!`], which compiles a kernel again for AVX-512 and for AVX2 + FMA and picks the
//! widest copy the CPU runs, at run time. The default build targets baseline x86-64 (SSE2) so one
//! binary runs anywhere; PyTorch dispatches the same way. On aarch64 the baseline copy is the NEON
//! one (NEON is part of the architecture there).
//!
//! Building with `RUSTFLAGS="--cfg lora_avx2_only"` leaves out the AVX-512 copies, ours and the
//! `gemm` crate's (see lora-core's Cargo.toml), so that the AVX2 path can be measured on an
//! AVX-512 machine (`benches/run_all.sh --avx2`).

/// `a·b + c`, as one fused instruction when `FMA` (the caller's copy runs on a CPU with fused
/// multiply-add: see [`simd_dispatch!`]), else as a product and a sum: `f32::mul_add` on a CPU
/// without it is a call into libm per value.
#[inline(always)]
pub(crate) fn mul_add<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `max(v, 0)`; `v < 0` is false for NaN, which passes through as in PyTorch's ReLU.
#[inline(always)]
pub(crate) fn relu(v: f32) -> f32 {
    if v < 0.0 {
        0.0
    } else {
        v
    }
}

/// `eˣ` in place for `N` values `x ≤ 0` (softmax after its max is subtracted; values just above 0,
/// from scores recomputed against a log-sum-exp, are as accurate), as `2ⁿ·p(r)` with
/// `|r| ≤ ln2/2` and a degree-5 minimax polynomial (relative error 7.5e-8 before rounding, below
/// 3e-7 in f32 arithmetic: tested below).
///
/// Each step runs over all `N` values before the next one starts. Why: one value's exponential
/// is a chain of about twenty dependent operations, and written value by value the compiler
/// emits one vector's whole chain, then the next one's, which the CPU's out-of-order window does
/// not overlap well; step by step, the `N / 8` (AVX2) independent vectors of each step sit side by
/// side (measured in benches/RESULTS.md, 2026-12-06 07:45).
#[inline(always)]
fn exp_nonpositive_in_place<const FMA: bool, const N: usize>(x: &mut [f32; N]) {
    const LN2_HI: f32 = 0.693_145_75; // ln 2 split so that n·LN2_HI is exact
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding and subtracting it rounds to an integer

    // Minimax for the relative error of eʳ on [−ln2/2, ln2/2] (Remez exchange, 40 digits).
    const P: [f32; 6] = [
        1.000_000_1,
        0.999_999_7,
        0.499_988_95,
        0.166_675_75,
        0.041_915_383,
        0.008_297_655,
    ];
    // Clamped so that 2ⁿ below stays a normal number. A comparison, not `f32::max`: NaN passes
    // through, where max would turn it into −87, a weight of ~0 that hides it.
    for v in x.iter_mut() {
        *v = if *v < -87.0 { -87.0 } else { *v };
    }
    // Loops rather than `array::map`, whose closure is not always inlined into the caller's
    // copy: compiled on its own, without FMA, `mul_add` becomes a libm call per value.
    let mut t = [0.0f32; N];
    for (t, &v) in t.iter_mut().zip(x.iter()) {
        *t = mul_add::<FMA>(v, std::f32::consts::LOG2_E, ROUND);
    }
    let mut r = [0.0f32; N];
    for ((r, &v), &t) in r.iter_mut().zip(x.iter()).zip(&t) {
        let n = t - ROUND;
        *r = mul_add::<FMA>(-n, LN2_LO, mul_add::<FMA>(-n, LN2_HI, v));
    }
    let mut p = [P[5]; N];
    for &c in P[..5].iter().rev() {
        for (p, &r) in p.iter_mut().zip(&r) {
            *p = mul_add::<FMA>(*p, r, c);
        }
    }
    for ((v, &p), &t) in x.iter_mut().zip(&p).zip(&t) {
        // 2ⁿ from the integer n held in t's low mantissa bits: integer ops that vectorise, where
        // `n as i32` (saturating, NaN-checked) compiles to a scalar conversion per value.
        let biased = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
        *v = p * f32::from_bits(biased << 23);
    }
}

/// `eˣ` for one `x ≤ 0`: [`exp_nonpositive_in_place`] unfused, for kernels that vectorise over
/// their own loop.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    let mut v = [x];
    exp_nonpositive_in_place::<false, 1>(&mut v);
    v[0]
}

/// Values per block of [`exp_shifted_in_place_sum`]: eight AVX2 vectors side by side.
const EXP_BLOCK: usize = 64;

/// Replaces every `xᵢ` by `exp((xᵢ − max)·scale)` and returns their sum: a softmax row's
/// unnormalised probabilities when `max` is the row's maximum, its probabilities when `max` is
/// its log-sum-exp over `scale`. `max` is at least every `xᵢ`, or below one by rounding only.
#[inline(always)]
pub(crate) fn exp_shifted_in_place_sum<const FMA: bool>(
    x: &mut [f32],
    max: f32,
    scale: f32,
) -> f32 {
    #[inline(always)]
    fn exp_block<const FMA: bool>(block: &mut [f32; EXP_BLOCK], max: f32, scale: f32) {
        for v in block.iter_mut() {
            *v = (*v - max) * scale;
        }
        exp_nonpositive_in_place::<FMA, EXP_BLOCK>(block);
    }
    let mut acc = [0.0f32; EXP_BLOCK];
    let mut blocks = x.chunks_exact_mut(EXP_BLOCK);
    for block in &mut blocks {
        let block: &mut [f32; EXP_BLOCK] = block.try_into().expect("a block of EXP_BLOCK values");
        exp_block::<FMA>(block, max, scale);
        for (a, &v) in acc.iter_mut().zip(block.iter()) {
            *a += v;
        }
    }
    let rest = blocks.into_remainder();
    if !rest.is_empty() {
        let mut padded = [max; EXP_BLOCK];
        padded[..rest.len()].copy_from_slice(rest);
        exp_block::<FMA>(&mut padded, max, scale);
        rest.copy_from_slice(&padded[..rest.len()]);
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// `1 / (1 + e⁻ᶻ)` without overflow for any `z`.
#[inline(always)]
pub(crate) fn sigmoid(z: f32) -> f32 {
    let e = exp_nonpositive(-z.abs());
    let s = 1.0 / (1.0 + e);
    if z >= 0.0 {
        s
    } else {
        e * s
    }
}

/// Independent accumulators of a reduction: one AVX-512 register, two AVX2 ones.
const LANES: usize = 16;

/// `Σ f(aᵢ, bᵢ)` over [`LANES`] lanes.
#[inline(always)]
pub(crate) fn sum_zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += f(x[i], y[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ f(xᵢ)` over [`LANES`] lanes.
#[inline(always)]
pub(crate) fn sum_map(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    sum_zip(x, x, |v, _| f(v))
}

/// The largest value (−∞ for none). NaN is skipped: the softmax that uses this carries a NaN
/// score into its row through [`exp_shifted_in_place_sum`].
///
/// Over [`MAX_LANES`] lanes, as a comparison rather than `f32::max`: `f32::max`'s NaN rule costs
/// two more instructions per vector, and one vector of lanes is a chain of dependent maxima that
/// left the reduction at a third of the softmax's time.
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let larger = |m: f32, v: f32| if v > m { v } else { m };
    let mut acc = [f32::NEG_INFINITY; MAX_LANES];
    let chunks = x.chunks_exact(MAX_LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| larger(m, v));
    for c in chunks {
        for i in 0..MAX_LANES {
            acc[i] = larger(acc[i], c[i]);
        }
    }
    acc.iter().fold(tail, |m, &v| larger(m, v))
}

/// Lanes of [`max`]: four AVX-512 vectors side by side.
const MAX_LANES: usize = 64;

/// Whether this CPU has AVX2 and FMA (the detection result is cached by std).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Whether this CPU has the AVX-512 subsets the AVX-512 copies are built with (F, BW, DQ, VL:
/// Skylake-SP, Ice Lake, Sapphire Rapids, Zen 4 and later).
#[cfg(all(target_arch = "x86_64", not(lora_avx2_only)))]
pub(crate) fn has_avx512() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vl")
        && has_avx2_fma()
}

/// Whether the baseline copy of a [`simd_dispatch!`] kernel runs on a CPU with fused
/// multiply-add: aarch64 has it in its base architecture, x86-64 only from AVX2's generation on.
pub(crate) const BASELINE_FMA: bool = cfg!(target_arch = "aarch64");

/// Defines `fn name(args) -> ret { body }` three times on x86-64 (compiled for AVX-512, for
/// AVX2 + FMA and for the baseline; twice with `lora_avx2_only`) and calls the widest copy the
/// CPU runs. When declared as `fn name<const FMA: bool>(…)`, the body learns whether its copy
/// has fused multiply-add (for [`mul_add`]).
///
/// Only what is inlined into a copy is compiled for its features: the body's own loops and
/// `#[inline(always)]` helpers always are; a closure usually is, but nothing guarantees it, and
/// one left as a function of its own is compiled without the copy's features yet keeps its
/// `FMA`, so [`mul_add`] there becomes a libm call per value. So hot code uses loops rather than
/// closures (`array::map` and the like).
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $crate::engine::kernels::cpu::math::simd_dispatch! {
            $(#[$meta])* $vis fn $name<const _FMA: bool>($($arg: $ty),*) $(-> $ret)? $body
        }
    };
    ($(#[$meta:meta])* $vis:vis fn $name:ident<const $fma:ident: bool>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic<const $fma: bool>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(all(target_arch = "x86_64", not(lora_avx2_only)))]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    generic::<true>($($arg),*)
                }
                if $crate::engine::kernels::cpu::math::has_avx512() {
                    // SAFETY: the CPU was just checked for the features `avx512` is built with.
                    return unsafe { avx512($($arg),*) };
                }
            }
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    generic::<true>($($arg),*)
                }
                if $crate::engine::kernels::cpu::math::has_avx2_fma() {
                    // SAFETY: the CPU was just checked for the features `avx2` is built with.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic::<{ $crate::engine::kernels::cpu::math::BASELINE_FMA }>($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

#[cfg(test)]
mod tests {
    use super::*;

    /// Both forms (fused and unfused multiply-add) against libm's `expf` over softmax's range.
    #[test]
    fn fast_exp_matches_libm() {
        // Down to the clamp, and just above 0 (a recomputed score over its log-sum-exp).
        let xs: Vec<f32> = (0..=100_000)
            .map(|i| -87.0 * i as f32 / 100_000.0)
            .chain((1..=1000).map(|i| i as f32 * 1e-6))
            .collect();
        let rel = |got: f32, x: f32| ((got - x.exp()) / x.exp()).abs();
        let unfused = xs.iter().map(|&x| rel(exp_nonpositive(x), x));
        let fused = xs.chunks(EXP_BLOCK).flat_map(|chunk| {
            let mut block = [0.0f32; EXP_BLOCK];
            block[..chunk.len()].copy_from_slice(chunk);
            exp_nonpositive_in_place::<true, EXP_BLOCK>(&mut block);
            chunk
                .iter()
                .zip(block)
                .map(|(&x, e)| rel(e, x))
                .collect::<Vec<_>>()
        });
        for (form, errors) in [
            ("unfused", unfused.collect::<Vec<_>>()),
            ("fused", fused.collect()),
        ] {
            assert_eq!(errors.len(), xs.len(), "{form}");
            let worst = errors
                .iter()
                .fold(0.0f32, |m, &e| if e > m || e.is_nan() { e } else { m });
            assert!(worst < 3e-7, "{form}: worst relative error {worst}");
        }
        assert!(exp_nonpositive(-1000.0) < 1e-37);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    /// The unnormalised softmax of a row: values and sum against libm, with a tail shorter than a
    /// block.
    #[test]
    fn shifted_exponentials_and_their_sum() {
        type Shifted = fn(&mut [f32], f32, f32) -> f32;
        let forms: [(&str, Shifted); 2] = [
            ("unfused", exp_shifted_in_place_sum::<false>),
            ("fused", exp_shifted_in_place_sum::<true>),
        ];
        for (form, shifted) in forms {
            for len in [1, 63, 64, 65, 200] {
                let x: Vec<f32> = (0..len)
                    .map(|i| ((i * 37) % 19) as f32 * 0.7 - 9.0)
                    .collect();
                let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let mut got = x.clone();
                let sum = shifted(&mut got, max, 0.3);
                let expected: Vec<f64> =
                    x.iter().map(|&v| ((v - max) as f64 * 0.3).exp()).collect();
                assert_eq!(got.len(), expected.len());
                for (g, e) in got.iter().zip(&expected) {
                    let rel = ((*g as f64 - e) / e).abs();
                    assert!(rel < 5e-7, "{form} {len}: {g} against {e}");
                }
                let total: f64 = expected.iter().sum();
                let rel = ((sum as f64 - total) / total).abs();
                assert!(rel < 1e-6, "{form} {len}: {sum} against {total}");
            }
            // A NaN in a full block and one in the tail: it stays NaN, and so does the sum,
            // while the other values stay finite.
            for at in [10, 130] {
                let mut x: Vec<f32> = (0..140).map(|i| -(i as f32) * 0.05).collect();
                x[at] = f32::NAN;
                let sum = shifted(&mut x, 0.0, 1.0);
                assert!(sum.is_nan(), "{form}: NaN at {at} gave the sum {sum}");
                let finite = x.iter().filter(|v| v.is_finite()).count();
                assert!(x[at].is_nan() && finite == 139, "{form}: NaN at {at}");
            }
        }
    }

    #[test]
    fn sigmoid_matches_its_definition() {
        for z in [-100.0f32, -20.0, -1.5, 0.0, 0.3, 7.0, 100.0] {
            let expected = 1.0 / (1.0 + (-z as f64).exp());
            assert!((sigmoid(z) as f64 - expected).abs() < 1e-7, "{z}");
        }
        assert!(sigmoid(f32::NAN).is_nan());
    }

    #[test]
    fn lane_reductions_match_sequential_ones() {
        let x: Vec<f32> = (0..29).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let y: Vec<f32> = (0..29).map(|i| i as f32 * 0.5).collect();
        assert_eq!(sum_map(&x, |v| v * v), x.iter().map(|v| v * v).sum::<f32>());
        let dot: f32 = x.iter().zip(&y).map(|(a, b)| a * b).sum();
        assert!((sum_zip(&x, &y, |a, b| a * b) - dot).abs() < 1e-4);
        assert_eq!(max(&x), 5.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }

    /// `max` over several blocks of lanes and a tail skips NaN, wherever the largest value sits.
    #[test]
    fn max_over_blocks_of_lanes_skips_nan() {
        for len in [63, 64, 200, 257] {
            for top in [0, len / 2, len - 1] {
                let mut x: Vec<f32> = (0..len).map(|i| -((i * 13 % 29) as f32)).collect();
                x[top] = 3.5;
                x[(top + 1) % len] = f32::NAN;
                assert_eq!(max(&x), 3.5, "{len} values, largest at {top}");
            }
        }
        assert_eq!(max(&[f32::NAN; 100]), f32::NEG_INFINITY);
    }
}
