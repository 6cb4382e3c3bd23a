//! The kernels' output buffers: zeroed by the pool when large ([`zeroed`]), written whole a chunk
//! at a time without being cleared first ([`from_chunks`]), and filled by the pool a band at a
//! time ([`for_each_band`]). A zeroed `Vec` is filled on the calling thread (calloc clears a
//! reused heap block with `memset`), and the kernels are called from outside the worker pool, so
//! a large buffer kept the other cores idle: the Winograd filter transforms' buffers alone took
//! ~2.5 % of a 32² training step's samples that way (benches/RESULTS.md, 2026-12-06 20:33
//! section).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::gemm::with_scratch;

/// Below this many values (4 MiB) a buffer is zeroed where it is asked for: waking a sleeping
/// worker took ~150 µs on the Intel Xeon kind, about what clearing 4 MiB takes on one core.
const PARALLEL_FROM: usize = 1 << 20;

/// Values per task when the pool zeroes a buffer (1 MiB).
const ZEROED_PER_TASK: usize = 1 << 18;

/// `len` zeros, written by the pool when the buffer is large. Each task clears its chunk with
/// one `fill` of a constant zero, which becomes a `memset`: on the Intel kind's two threads a
/// 236 MiB buffer took 13.3 ms that way against 21–23 ms through rayon's `repeat_n`, whose
/// store loop is 16 bytes wide in the baseline build.
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    if len < PARALLEL_FROM {
        return vec![0.0; len];
    }
    let clear = |_, chunk: &mut [MaybeUninit<f32>]| chunk.fill(MaybeUninit::new(0.0));
    // SAFETY: `clear` writes every value of its chunk.
    unsafe { written_by_pool(len, ZEROED_PER_TASK, clear) }
}

/// `len` values written by the pool a chunk of `chunk_len` values at a time (the last one may be
/// shorter): `fill(i, chunk)` writes every value of chunk `i` into this thread's work buffer,
/// from which the chunk is copied into place (a `chunk_len` of 0 counts as 1). `fill` runs inside
/// [`with_scratch`], so it must use neither that nor the pool (whose other tasks might), and
/// `from_chunks` itself must not be called inside [`with_scratch`]. Unlike a [`zeroed`] buffer
/// that a kernel then writes over, the output is not cleared first: a pass over memory saved
/// where the buffer is larger than the caches (Winograd's transformed filters, a linear layer's
/// output). In debug builds the work buffer holds NaN before `fill`, so that a value `fill`
/// leaves out shows in tests.
pub(crate) fn from_chunks(
    len: usize,
    chunk_len: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let copy_filled = |i, chunk: &mut [MaybeUninit<f32>]| {
        with_scratch(chunk.len(), |values| {
            if cfg!(debug_assertions) {
                values.fill(f32::NAN);
            }
            fill(i, values);
            // SAFETY: both are `chunk.len()` f32 values, and a thread's buffer cannot overlap
            // the new one.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    values.as_ptr(),
                    chunk.as_mut_ptr().cast(),
                    chunk.len(),
                )
            };
        })
    };
    // SAFETY: `copy_filled` writes every value of its chunk, from a work buffer of the chunk's
    // length that holds initialised values whatever `fill` did.
    unsafe { written_by_pool(len, chunk_len.max(1), copy_filled) }
}

/// A new buffer of `len` values, written by the pool a chunk of `chunk_len > 0` values at a time
/// (the last one may be shorter) straight into the `Vec`'s spare capacity: `write(i, chunk)`
/// gets chunk `i`.
///
/// # Safety
///
/// `write` must initialise every value of every chunk it is given.
unsafe fn written_by_pool(
    len: usize,
    chunk_len: usize,
    write: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let mut buffer = Vec::with_capacity(len);
    buffer.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk_len)
        .enumerate()
        .for_each(|(i, chunk)| write(i, chunk));
    // SAFETY: the chunks cover the first `len` values, within the capacity, and the caller's
    // `write` initialised each of them.
    unsafe { buffer.set_len(len) };
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

    /// How many values are not their own index (NaN never is).
    fn misplaced(values: &[f32]) -> usize {
        let placed = |(at, &v): (usize, &f32)| v == at as f32;
        values.iter().enumerate().filter(|&x| !placed(x)).count()
    }

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

    /// Every value is the one `fill` wrote for its chunk and place, with a short last chunk, a
    /// chunk as long as the buffer, and no values at all.
    #[test]
    fn from_chunks_holds_what_each_chunk_was_filled_with() {
        for (len, chunk_len) in [
            (10, 4),
            (12, 4),
            (7, 7),
            (3 * PARALLEL_FROM + 5, 1 << 16),
            (0, 3),
        ] {
            let buffer = from_chunks(len, chunk_len, |i, chunk| {
                assert!(!chunk.is_empty() && chunk.len() <= chunk_len);
                for (at, value) in chunk.iter_mut().enumerate() {
                    *value = (i * chunk_len + at) as f32;
                }
            });
            assert_eq!(buffer.len(), len);
            let wrong = misplaced(&buffer);
            assert_eq!(wrong, 0, "{len} values in chunks of {chunk_len}");
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
            let wrong = misplaced(&out);
            assert_eq!(wrong, 0, "{samples} × {sample_len} in bands of {band_len}");
        }
        for_each_band(&mut [], 0, 4, |_, _, _| panic!("no sample, no call"));
    }
}
