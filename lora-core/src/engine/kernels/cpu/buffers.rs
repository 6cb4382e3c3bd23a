//! The kernels' output buffers, zeroed by the pool when large, and filled by the pool a band at
//! a time ([`for_each_band`]). A zeroed `Vec` is filled on the calling thread (calloc clears a
//! reused heap block with `memset`), and the kernels are called from outside the worker pool, so
//! a large buffer kept the other cores idle: the Winograd filter transforms' buffers alone took
//! ~2.5 % of a 32² training step's samples that way (benches/RESULTS.md, 2026-12-06 20:33
//! section).

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

/// Below this many values [`for_each_band`] stays on the calling thread: waking the pool would
/// cost more than a copy of this size.
const PARALLEL_BANDS_FROM: usize = 1 << 16;

/// Calls `fill(sample, band, values)` for every band of `band_len` values (a sample's last one
/// may be shorter) of every sample of `sample_len` values of `out`, on the pool from
/// [`PARALLEL_BANDS_FROM`] values on. Layout changes (a transpose, a merge of heads) fill their
/// output this way, a band of output rows per task.
pub(crate) fn for_each_band(
    out: &mut [f32],
    sample_len: usize,
    band_len: usize,
    fill: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    if sample_len == 0 || band_len == 0 {
        return;
    }
    if out.len() < PARALLEL_BANDS_FROM {
        for (sample, values) in out.chunks_exact_mut(sample_len).enumerate() {
            for (band, values) in values.chunks_mut(band_len).enumerate() {
                fill(sample, band, values);
            }
        }
        return;
    }
    out.par_chunks_exact_mut(sample_len)
        .enumerate()
        .for_each(|(sample, values)| {
            values
                .par_chunks_mut(band_len)
                .enumerate()
                .for_each(|(band, values)| fill(sample, band, values));
        });
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

    /// Each value written once with its sample, band and place in the band, on both sides of the
    /// threshold and with a short last band per sample.
    #[test]
    fn for_each_band_visits_every_value_once_with_its_sample_and_band() {
        for (samples, sample_len, band_len) in [(3, 10, 4), (2, PARALLEL_BANDS_FROM / 2 + 3, 96)] {
            let mut out = vec![-1.0f32; samples * sample_len];
            for_each_band(&mut out, sample_len, band_len, |sample, band, values| {
                assert!(values.len() <= band_len && !values.is_empty());
                for (i, v) in values.iter_mut().enumerate() {
                    assert_eq!(*v, -1.0, "written twice");
                    *v = (sample * sample_len + band * band_len + i) as f32;
                }
            });
            let wrong = out
                .iter()
                .enumerate()
                .filter(|&(at, &v)| v != at as f32)
                .count();
            assert_eq!(wrong, 0, "{samples} × {sample_len} in bands of {band_len}");
        }
        for_each_band(&mut [], 0, 4, |_, _, _| panic!("no sample, no call"));
    }
}
