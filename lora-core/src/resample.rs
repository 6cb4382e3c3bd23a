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
    size: (usize, usize),
    new_size: (usize, usize),
    filter: Filter,
    arithmetic: Arithmetic,
) -> Vec<u8> {
    let whole = Window::whole(new_size.0, new_size.1);
    resize_interleaved_window::<C>(pixels, size, new_size, whole, filter, arithmetic)
}

/// A rectangle of an image: `width`×`height` pixels from column `left` and row `top` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub left: usize,
    pub top: usize,
    pub width: usize,
    pub height: usize,
}

impl Window {
    /// All of a `width`×`height` image.
    pub fn whole(width: usize, height: usize) -> Self {
        Self {
            left: 0,
            top: 0,
            width,
            height,
        }
    }
}

/// `window` of [`resize_interleaved`]'s result: the same values, computed for the window alone
/// (the width pass only over the input rows the window's output rows read, and each pass only
/// for the window's columns and rows), which is what a resize-then-crop needs.
pub fn resize_interleaved_window<const C: usize>(
    pixels: &[u8],
    (width, height): (usize, usize),
    (new_width, new_height): (usize, usize),
    window: Window,
    filter: Filter,
    arithmetic: Arithmetic,
) -> Vec<u8> {
    assert_eq!(
        pixels.len(),
        width * height * C,
        "pixels of a {width}×{height} image"
    );
    assert!(new_width > 0 && new_height > 0, "an empty output size");
    let columns = window.left..window.left + window.width;
    let rows = window.top..window.top + window.height;
    assert!(
        window.width > 0 && window.height > 0,
        "an empty window {window:?}"
    );
    assert!(
        columns.end <= new_width && rows.end <= new_height,
        "{window:?} outside a {new_width}×{new_height} image"
    );
    let vertical =
        (new_height != height).then(|| AxisFilter::new(height, new_height, filter, arithmetic));
    // The input rows the window's output rows read.
    let read = match &vertical {
        Some(axis) => {
            let taps = &axis.taps[rows.clone()];
            let start = taps.iter().map(|(first, _)| *first).min().unwrap_or(0);
            let end = taps
                .iter()
                .map(|(first, w)| first + w.len())
                .max()
                .unwrap_or(0);
            start..end.max(start)
        }
        None => rows.clone(),
    };
    let band = &pixels[read.start * width * C..read.end * width * C];
    let narrowed = if new_width != width {
        let axis = AxisFilter::new(width, new_width, filter, arithmetic);
        resize_width::<C>(band, width, &axis, columns)
    } else {
        band.chunks_exact(width * C)
            .flat_map(|row| &row[columns.start * C..columns.end * C])
            .copied()
            .collect()
    };
    match &vertical {
        Some(axis) => resize_height(&narrowed, window.width * C, axis, rows, read.start),
        None => narrowed,
    }
}

/// The width pass of every row of `pixels` (rows of `width` pixels) for output columns
/// `columns` of `axis`.
fn resize_width<const C: usize>(
    pixels: &[u8],
    width: usize,
    axis: &AxisFilter,
    columns: std::ops::Range<usize>,
) -> Vec<u8> {
    let half = 1i32 << (axis.precision - 1);
    let taps = &axis.taps[columns];
    let mut out = vec![0u8; pixels.len() / (width * C) * taps.len() * C];
    for (src, dst) in pixels
        .chunks_exact(width * C)
        .zip(out.chunks_exact_mut(taps.len() * C))
    {
        for ((first, weights), px) in taps.iter().zip(dst.chunks_exact_mut(C)) {
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

/// The height pass over rows of `row_len` bytes for output rows `rows` of `axis`, where
/// `pixels` starts at input row `first_row`: a whole output row accumulated at once.
fn resize_height(
    pixels: &[u8],
    row_len: usize,
    axis: &AxisFilter,
    rows: std::ops::Range<usize>,
    first_row: usize,
) -> Vec<u8> {
    let half = 1i32 << (axis.precision - 1);
    let taps = &axis.taps[rows];
    let mut out = vec![0u8; row_len * taps.len()];
    let mut acc = vec![0i32; row_len];
    for ((first, weights), dst) in taps.iter().zip(out.chunks_exact_mut(row_len)) {
        acc.fill(half);
        for (j, &w) in weights.iter().enumerate() {
            let at = first + j - first_row;
            let row = &pixels[at * row_len..(at + 1) * row_len];
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
    new_size: (u32, u32),
    window: Window,
    filter: Filter,
    arithmetic: Arithmetic,
) -> ImageBuffer<P, Vec<u8>> {
    let (w, h) = image.dimensions();
    let pixels = resize_interleaved_window::<C>(
        image.as_raw(),
        (w as usize, h as usize),
        (new_size.0 as usize, new_size.1 as usize),
        window,
        filter,
        arithmetic,
    );
    ImageBuffer::from_raw(window.width as u32, window.height as u32, pixels)
        .expect("sized for the window")
}

/// An RGB image resized to `width`×`height`.
pub fn resize_rgb(
    image: &RgbImage,
    width: u32,
    height: u32,
    filter: Filter,
    arithmetic: Arithmetic,
) -> RgbImage {
    let window = Window::whole(width as usize, height as usize);
    resize_buffer::<Rgb<u8>, 3>(image, (width, height), window, filter, arithmetic)
}

/// `window` of an RGB image resized to `new_size` (see [`resize_interleaved_window`]).
pub fn resize_rgb_window(
    image: &RgbImage,
    new_size: (u32, u32),
    window: Window,
    filter: Filter,
    arithmetic: Arithmetic,
) -> RgbImage {
    resize_buffer::<Rgb<u8>, 3>(image, new_size, window, filter, arithmetic)
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
    let window = Window::whole(width as usize, height as usize);
    resize_buffer::<Rgba<u8>, 4>(image, (width, height), window, filter, arithmetic)
}

/// `window` of an RGBA image resized to `new_size` (see [`resize_rgba`] and
/// [`resize_interleaved_window`]).
pub fn resize_rgba_window(
    image: &RgbaImage,
    new_size: (u32, u32),
    window: Window,
    filter: Filter,
    arithmetic: Arithmetic,
) -> RgbaImage {
    resize_buffer::<Rgba<u8>, 4>(image, new_size, window, filter, arithmetic)
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

    /// A window of the resize is the same pixels as the whole resize cut there (the whole
    /// resize is Pillow's: tests/resample_parity.rs), for both passes, either alone, and none.
    #[test]
    fn a_window_is_the_whole_resize_cut() {
        let (width, height) = (23, 17);
        let noise: Vec<u8> = (0..width * height * 3)
            .map(|i| (i * 37 % 251) as u8)
            .collect();
        for (new_width, new_height) in [(11, 9), (40, 31), (23, 9), (11, 17), (23, 17)] {
            let full = resize_interleaved::<3>(
                &noise,
                (width, height),
                (new_width, new_height),
                Filter::Lanczos3,
                Arithmetic::Pillow,
            );
            let mut checked = 0;
            for (left, top) in [(0, 0), (1, 2), (new_width / 3, new_height / 2)] {
                let window = Window {
                    left,
                    top,
                    width: new_width - left - new_width / 4,
                    height: new_height - top - new_height / 5,
                };
                let got = resize_interleaved_window::<3>(
                    &noise,
                    (width, height),
                    (new_width, new_height),
                    window,
                    Filter::Lanczos3,
                    Arithmetic::Pillow,
                );
                let cut: Vec<u8> = full
                    .chunks_exact(new_width * 3)
                    .skip(top)
                    .take(window.height)
                    .flat_map(|row| &row[left * 3..(left + window.width) * 3])
                    .copied()
                    .collect();
                assert!(!cut.is_empty());
                assert_eq!(got, cut, "{new_width}×{new_height}, {window:?}");
                checked += 1;
            }
            assert_eq!(checked, 3);
        }
    }
}
