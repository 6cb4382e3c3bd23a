//! Resizing 8-bit images the way the Python tools do it, pixel for pixel: Pillow's
//! `Image.resize` (what diffusers' and kohya's training transforms call on PIL images) and
//! torchvision's antialiased `resize` of uint8 tensors (what transformers' image processors call).
//!
//! Both are the same separable algorithm: per axis, each output pixel is a weighted sum of the
//! input pixels under the filter, widened by the downscale factor (antialiasing); the weights are
//! computed in f64, normalised per output pixel and rounded to fixed point; the width pass is
//! rounded to uint8 before the height pass; an axis whose size does not change is not filtered.
//! They differ only in the fixed point ([`Arithmetic`]). (Pillow 13's `Image.resize` runs the height
//! pass first for some sizes, by an undocumented rule; there it can differ from this by a few
//! levels at hard edges. Each single pass is Pillow's exactly: `tests/fixtures/resample`.)
//! Integer arithmetic makes the result exact
//! on every machine, and the fixed-point inner loops are what make it fast: the height pass runs
//! over whole rows, which the compiler vectorises.

use image::{ImageBuffer, Pixel, Rgb, RgbImage, Rgba, RgbaImage};

/// The resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Keys' cubic convolution with a = −0.5 (PIL `BICUBIC`, torchvision `BICUBIC`).
    Bicubic,
    /// A sinc windowed by a sinc three lobes wide (PIL `LANCZOS`).
    Lanczos3,
}

impl Filter {
    /// How far the filter reaches, in input pixels at scale 1.
    fn support(self) -> f64 {
        match self {
            Filter::Bicubic => 2.0,
            Filter::Lanczos3 => 3.0,
        }
    }

    /// The filter at `x`, written as each library writes it so the f64 weights round alike.
    fn weight(self, x: f64, arithmetic: Arithmetic) -> f64 {
        const A: f64 = -0.5;
        match (self, arithmetic) {
            (Filter::Bicubic, Arithmetic::Pillow) => {
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            (Filter::Bicubic, Arithmetic::Torchvision) => {
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
                } else {
                    0.0
                }
            }
            (Filter::Lanczos3, _) => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// The fixed point the weights are rounded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arithmetic {
    /// Pillow: 22 fractional bits (`PRECISION_BITS = 32 - 8 - 2`), 32-bit weights.
    Pillow,
    /// PyTorch's uint8 antialiased kernel (torchvision on uint8 tensors): 16-bit weights at the
    /// most fractional bits (up to 22) that keep the largest weight below 2^15.
    Torchvision,
}

/// One axis: for each output index, its first input index and its fixed-point weights.
struct AxisFilter {
    taps: Vec<(usize, Vec<i32>)>,
    precision: u32,
}

impl AxisFilter {
    fn new(input: usize, output: usize, filter: Filter, arithmetic: Arithmetic) -> Self {
        let scale = input as f64 / output as f64;
        let widen = scale.max(1.0);
        // Both libraries multiply by the reciprocal (a division can differ in the last bit).
        let inverse_widen = 1.0 / widen;
        let support = filter.support() * widen;
        let max_taps = support.ceil() as usize * 2 + 1;
        let mut largest = 0.0f64;
        let float_taps: Vec<(usize, Vec<f64>)> = (0..output)
            .map(|i| {
                let centre = scale * (i as f64 + 0.5);
                // `as i64` truncates toward zero, as the C casts do.
                let first = ((centre - support + 0.5) as i64).max(0);
                let end = ((centre + support + 0.5) as i64).min(input as i64);
                let count = (end - first).clamp(0, max_taps as i64) as usize;
                let first = first as usize;
                let mut weights: Vec<f64> = (0..count)
                    .map(|j| {
                        filter.weight(
                            ((first + j) as f64 - centre + 0.5) * inverse_widen,
                            arithmetic,
                        )
                    })
                    .collect();
                let total: f64 = weights.iter().sum();
                if total != 0.0 {
                    for w in &mut weights {
                        *w /= total;
                        largest = largest.max(*w);
                    }
                }
                (first, weights)
            })
            .collect();
        let precision = match arithmetic {
            Arithmetic::Pillow => 22,
            Arithmetic::Torchvision => {
                let mut precision = 0u32;
                while precision < 22
                    && ((0.5 + largest * f64::from(1u32 << (precision + 1))) as i32) < (1 << 15)
                {
                    precision += 1;
                }
                precision
            }
        };
        let unit = f64::from(1u32 << precision);
        let taps = float_taps
            .into_iter()
            .map(|(first, weights)| {
                let fixed = weights
                    .iter()
                    .map(|w| {
                        let v = w * unit;
                        let rounded = (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32;
                        match arithmetic {
                            Arithmetic::Pillow => rounded,
                            // The kernel stores the weights as int16.
                            Arithmetic::Torchvision => i32::from(rounded as i16),
                        }
                    })
                    .collect();
                (first, fixed)
            })
            .collect();
        Self { taps, precision }
    }

    /// An accumulator's fixed-point value as a uint8: rounded (the accumulator started at one
    /// half) and clamped.
    fn to_u8(&self, acc: i32) -> u8 {
        (acc >> self.precision).clamp(0, 255) as u8
    }
}

/// `pixels`, `width`×`height` with `C` interleaved channels, resized to `new_width`×`new_height`;
/// each channel on its own (no premultiplied alpha).
pub fn resize_interleaved<const C: usize>(
    pixels: &[u8],
    (width, height): (usize, usize),
    (new_width, new_height): (usize, usize),
    filter: Filter,
    arithmetic: Arithmetic,
) -> Vec<u8> {
    assert_eq!(
        pixels.len(),
        width * height * C,
        "pixels of a {width}×{height} image"
    );
    assert!(new_width > 0 && new_height > 0, "an empty output size");
    let widened;
    let (pixels, width) = if new_width != width {
        widened = resize_width::<C>(pixels, (width, height), new_width, filter, arithmetic);
        (widened.as_slice(), new_width)
    } else {
        (pixels, width)
    };
    if new_height != height {
        resize_height(pixels, width * C, height, new_height, filter, arithmetic)
    } else {
        pixels.to_vec()
    }
}

fn resize_width<const C: usize>(
    pixels: &[u8],
    (width, height): (usize, usize),
    new_width: usize,
    filter: Filter,
    arithmetic: Arithmetic,
) -> Vec<u8> {
    let axis = AxisFilter::new(width, new_width, filter, arithmetic);
    let half = 1i32 << (axis.precision - 1);
    let mut out = vec![0u8; new_width * height * C];
    for (src, dst) in pixels
        .chunks_exact(width * C)
        .zip(out.chunks_exact_mut(new_width * C))
    {
        for ((first, weights), px) in axis.taps.iter().zip(dst.chunks_exact_mut(C)) {
            let mut acc = [half; C];
            let window = &src[first * C..(first + weights.len()) * C];
            for (w, input) in weights.iter().zip(window.chunks_exact(C)) {
                for c in 0..C {
                    acc[c] += i32::from(input[c]) * w;
                }
            }
            for c in 0..C {
                px[c] = axis.to_u8(acc[c]);
            }
        }
    }
    out
}

/// The height pass over rows of `row_len` bytes: a whole output row accumulated at once.
fn resize_height(
    pixels: &[u8],
    row_len: usize,
    height: usize,
    new_height: usize,
    filter: Filter,
    arithmetic: Arithmetic,
) -> Vec<u8> {
    let axis = AxisFilter::new(height, new_height, filter, arithmetic);
    let half = 1i32 << (axis.precision - 1);
    let mut out = vec![0u8; row_len * new_height];
    let mut acc = vec![0i32; row_len];
    for ((first, weights), dst) in axis.taps.iter().zip(out.chunks_exact_mut(row_len)) {
        acc.fill(half);
        for (j, &w) in weights.iter().enumerate() {
            let row = &pixels[(first + j) * row_len..(first + j + 1) * row_len];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += i32::from(p) * w;
            }
        }
        for (d, &a) in dst.iter_mut().zip(&acc) {
            *d = axis.to_u8(a);
        }
    }
    out
}

fn resize_buffer<P: Pixel<Subpixel = u8>, const C: usize>(
    image: &ImageBuffer<P, Vec<u8>>,
    width: u32,
    height: u32,
    filter: Filter,
    arithmetic: Arithmetic,
) -> ImageBuffer<P, Vec<u8>> {
    let (w, h) = image.dimensions();
    let pixels = resize_interleaved::<C>(
        image.as_raw(),
        (w as usize, h as usize),
        (width as usize, height as usize),
        filter,
        arithmetic,
    );
    ImageBuffer::from_raw(width, height, pixels).expect("sized for the image")
}

/// An RGB image resized to `width`×`height`.
pub fn resize_rgb(
    image: &RgbImage,
    width: u32,
    height: u32,
    filter: Filter,
    arithmetic: Arithmetic,
) -> RgbImage {
    resize_buffer::<Rgb<u8>, 3>(image, width, height, filter, arithmetic)
}

/// An RGBA image resized to `width`×`height`, alpha filtered like the colours (Pillow
/// premultiplies alpha first; for opaque images the two agree).
pub fn resize_rgba(
    image: &RgbaImage,
    width: u32,
    height: u32,
    filter: Filter,
    arithmetic: Arithmetic,
) -> RgbaImage {
    resize_buffer::<Rgba<u8>, 4>(image, width, height, filter, arithmetic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for arithmetic in [Arithmetic::Pillow, Arithmetic::Torchvision] {
            for filter in [Filter::Bicubic, Filter::Lanczos3] {
                for (input, output) in [(40, 32), (23, 32), (640, 224), (7, 3), (3, 7)] {
                    let axis = AxisFilter::new(input, output, filter, arithmetic);
                    assert_eq!(axis.taps.len(), output);
                    let unit = 1i64 << axis.precision;
                    for (first, weights) in &axis.taps {
                        assert!(first + weights.len() <= input);
                        let sum: i64 = weights.iter().map(|&w| i64::from(w)).sum();
                        // Each weight is rounded on its own: off by at most half a unit each.
                        assert!(
                            (sum - unit).abs() <= weights.len() as i64,
                            "{sum} vs {unit}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat_and_an_unchanged_size_is_a_copy() {
        let flat = vec![77u8; 13 * 9 * 3];
        for filter in [Filter::Bicubic, Filter::Lanczos3] {
            let out = resize_interleaved::<3>(&flat, (13, 9), (5, 21), filter, Arithmetic::Pillow);
            assert_eq!(out.len(), 5 * 21 * 3);
            assert!(out.iter().all(|&v| v == 77), "{out:?}");
        }
        let noise: Vec<u8> = (0..13 * 9 * 3).map(|i| (i * 37 % 251) as u8).collect();
        let same = resize_interleaved::<3>(
            &noise,
            (13, 9),
            (13, 9),
            Filter::Lanczos3,
            Arithmetic::Pillow,
        );
        assert_eq!(same, noise);
    }
}
