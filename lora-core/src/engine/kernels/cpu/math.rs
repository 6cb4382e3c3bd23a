//! Elementwise math for the CPU kernels, written so the compiler vectorises it: an exponential
//! in plain f32 arithmetic, reductions over eight independent lanes (a single running sum is a
//! dependency chain the compiler may not reorder), and [`simd_dispatch!`], which compiles a
//! kernel again for AVX-512 and for AVX2 + FMA and picks the widest copy the CPU runs, at run
//! time. The default build targets baseline x86-64 (SSE2) so one binary runs anywhere; PyTorch
//! dispatches the same way. On aarch64 the baseline copy is the NEON one (NEON is part of the
//! architecture there).
//!
//! Building with `RUSTFLAGS="--cfg lora_avx2_only"` leaves out the AVX-512 copies, ours and the
//! `gemm` crate's (see lora-core's Cargo.toml), so that the AVX2 path can be measured on an
//! AVX-512 machine (`benches/run_all.sh --avx2`).

/// `eˣ` for `x ≤ 0` (softmax after its max is subtracted), as `2ⁿ·p(r)` with `|r| ≤ ln2/2` and
/// a degree-6 Taylor polynomial (relative error < 2e-7).
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75; // ln 2 split so that n·LN2_HI is exact
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding and subtracting it rounds to an integer

    // Clamped so that 2ⁿ below stays a normal number. A comparison, not `f32::max`: NaN passes
    // through, where max would turn it into −87, a weight of ~0 that hides it.
    let x = if x < -87.0 { -87.0 } else { x };
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2ⁿ from the integer n held in t's low mantissa bits: integer ops that vectorise, where
    // `n as i32` (saturating, NaN-checked) compiles to a scalar conversion per value.
    let biased = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    p * f32::from_bits(biased << 23)
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

/// Replaces every `xᵢ` by `f(xᵢ)` and returns their sum over [`LANES`] lanes: one pass where a
/// map and then [`sum_map`] would read the values twice.
#[inline(always)]
pub(crate) fn map_in_place_sum(x: &mut [f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = f(c[i]);
            acc[i] += c[i];
        }
    }
    let mut tail = 0.0f32;
    for v in chunks.into_remainder() {
        *v = f(*v);
        tail += *v;
    }
    acc.iter().sum::<f32>() + tail
}

/// The largest value (−∞ for none). NaN is skipped: the softmax that uses this carries a NaN
/// score into its row through [`exp_nonpositive`].
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i]);
        }
    }
    acc.iter().fold(tail, |m, &v| m.max(v))
}

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

/// Defines `fn name(args) -> ret { body }` three times on x86-64 (compiled for AVX-512, for
/// AVX2 + FMA and for the baseline; twice with `lora_avx2_only`) and calls the widest copy the CPU runs. The body must not
/// rely on closures being vectorised separately (they are inlined into whichever copy calls
/// them).
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(all(target_arch = "x86_64", not(lora_avx2_only)))]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    generic($($arg),*)
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
                    generic($($arg),*)
                }
                if $crate::engine::kernels::cpu::math::has_avx2_fma() {
                    // SAFETY: the CPU was just checked for the features `avx2` is built with.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_matches_libm() {
        let worst = (0..=100_000)
            .map(|i| -87.0 * i as f32 / 100_000.0)
            .map(|x| ((exp_nonpositive(x) - x.exp()) / x.exp()).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert!(exp_nonpositive(-1000.0) < 1e-37);
        assert!(exp_nonpositive(f32::NAN).is_nan());
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
        let mut squares = x.clone();
        assert_eq!(
            map_in_place_sum(&mut squares, |v| v * v),
            sum_map(&x, |v| v * v)
        );
        assert!(squares.iter().zip(&x).all(|(s, v)| *s == v * v));
        assert_eq!(max(&x), 5.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }
}
