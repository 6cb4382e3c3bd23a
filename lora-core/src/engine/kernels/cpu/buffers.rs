//! The kernels' output buffers, zeroed by the pool when large. A zeroed `Vec` is filled on the
//! calling thread (calloc clears a reused heap block with `memset`), and the kernels are
//! called from outside the worker pool, so a large buffer kept the other cores idle: the Winograd
//! filter transforms' buffers alone took ~2.5 % of a 32² training step's samples that way
//! (benches/RESULTS.md, 2026-12-06 20:33 section).

use rayon::prelude::*;

/// Below this many values (4 MiB) a buffer is zeroed where it is asked for: waking a sleeping
/// worker took ~150 µs on the Intel Xeon kind, about what clearing 4 MiB takes on one core.
const PARALLEL_FROM: usize = 1 << 20;

/// `len` zeros, written by the pool when the buffer is large.
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    if len < PARALLEL_FROM {
        return vec![0.0; len];
    }
    let mut buffer = Vec::with_capacity(len);
    buffer.par_extend(rayon::iter::repeat_n(0.0f32, len));
    buffer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_has_the_length_and_only_zeros_on_both_sides_of_the_threshold() {
        for len in [
            0,
            1,
            PARALLEL_FROM - 1,
            PARALLEL_FROM,
            3 * PARALLEL_FROM + 7,
        ] {
            let buffer = zeroed(len);
            assert_eq!(buffer.len(), len);
            assert!(
                buffer.iter().all(|&v| v == 0.0 && v.is_sign_positive()),
                "len {len}"
            );
        }
    }
}
