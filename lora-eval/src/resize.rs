//! The resizes that put an image into a feature network's input size, each as the reference
//! tool computes it.

use image::RgbImage;

/// pytorch-fid's input: the image as floats in [0, 1] (torchvision's `ToTensor`), resized with
/// `F.interpolate(mode="bilinear", align_corners=False)` (no antialiasing, so a large image is
/// sampled, not averaged), then scaled to [−1, 1]. Returns `[3, size, size]`, channel-major.
pub fn bilinear_to_unit_range(image: &RgbImage, size: usize) -> Vec<f32> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let xs = linear_taps(w, size);
    let ys = linear_taps(h, size);
    let pixels = image.as_raw();
    let value = |y: usize, x: usize, c: usize| f32::from(pixels[(y * w + x) * 3 + c]) / 255.0;
    let mut out = vec![0f32; 3 * size * size];
    for c in 0..3 {
        for (oy, ty) in ys.iter().enumerate() {
            for (ox, tx) in xs.iter().enumerate() {
                let top = tx.w0 * value(ty.i0, tx.i0, c) + tx.w1 * value(ty.i0, tx.i1, c);
                let bottom = tx.w0 * value(ty.i1, tx.i0, c) + tx.w1 * value(ty.i1, tx.i1, c);
                let v = ty.w0 * top + ty.w1 * bottom;
                out[(c * size + oy) * size + ox] = 2.0 * v - 1.0;
            }
        }
    }
    out
}

/// One output coordinate's two source samples and their weights.
struct Tap {
    i0: usize,
    i1: usize,
    w0: f32,
    w1: f32,
}

/// PyTorch's half-pixel source coordinates for `align_corners=False`:
/// `max((o + 0.5)·in/out − 0.5, 0)`, its floor and the next sample (clamped at the edge).
fn linear_taps(input: usize, output: usize) -> Vec<Tap> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let source = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (source as usize).min(input - 1);
            let lambda = (source - i0 as f32).clamp(0.0, 1.0);
            Tap {
                i0,
                i1: if i0 < input - 1 { i0 + 1 } else { i0 },
                w0: 1.0 - lambda,
                w1: lambda,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Same size: every tap lands on a pixel centre, so the image comes back unchanged.
    #[test]
    fn same_size_is_exact() {
        let square =
            RgbImage::from_fn(4, 4, |x, y| image::Rgb([(x * 60) as u8, (y * 60) as u8, 9]));
        let out = bilinear_to_unit_range(&square, 4);
        for y in 0..4 {
            for x in 0..4 {
                let expected = 2.0 * f32::from(square.get_pixel(x, y)[0]) / 255.0 - 1.0;
                assert!((out[(y * 4 + x) as usize] - expected).abs() < 1e-6);
            }
        }
    }
}
