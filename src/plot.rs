//! Small raster pictures for the quick start: the before/after grid and the loss curve, drawn
//! straight into RGB pixels (with a 3×5 pixel font for the few labels) so no plotting or font
//! stack is needed. `plotters`' bitmap backend would draw the curves, but any text through it
//! needs a system font (its `ttf` feature) or a TrueType file shipped with us (`ab_glyph`); the
//! quick start must run on a fresh offline machine, and a few labels do not justify either.

use lora_infer::output::Image8;

type Rgb = [u8; 3];

const WHITE: Rgb = [255, 255, 255];
const INK: Rgb = [40, 40, 40];
const GRID_LINE: Rgb = [225, 225, 225];
const RAW_LOSS: Rgb = [170, 190, 230];
const SMOOTH_LOSS: Rgb = [20, 70, 200];

/// 3×5 glyphs, one row per 3-bit number (MSB = left column).
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 3, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 2, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '+' => [0, 2, 7, 2, 0],
        ' ' => [0, 0, 0, 0, 0],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'L' => [4, 4, 4, 4, 7],
        'N' => [5, 7, 7, 7, 5],
        'O' => [7, 5, 5, 5, 7],
        'P' => [6, 5, 6, 4, 4],
        'R' => [6, 5, 6, 5, 5],
        'S' => [7, 4, 7, 1, 7],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        _ => return None,
    })
}

/// An RGB drawing surface.
struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize, background: Rgb) -> Self {
        Self {
            width,
            height,
            pixels: background.repeat(width * height),
        }
    }

    fn set(&mut self, x: i64, y: i64, colour: Rgb) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            let i = (y as usize * self.width + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&colour);
        }
    }

    fn fill(&mut self, x: i64, y: i64, w: i64, h: i64, colour: Rgb) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, colour);
            }
        }
    }

    /// A line of width `thickness` from `a` to `b` (dense point sampling).
    fn line(&mut self, a: (f64, f64), b: (f64, f64), thickness: i64, colour: Rgb) {
        let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (a.0 + t * (b.0 - a.0), a.1 + t * (b.1 - a.1));
            let half = thickness / 2;
            self.fill(
                x.round() as i64 - half,
                y.round() as i64 - half,
                thickness,
                thickness,
                colour,
            );
        }
    }

    /// Text in the 3×5 font at `scale` pixels per font pixel; unknown characters are skipped.
    fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, colour: Rgb) {
        let mut cx = x;
        for c in text.chars() {
            if let Some(rows) = glyph(c.to_ascii_uppercase()) {
                for (ry, bits) in rows.iter().enumerate() {
                    for rx in 0..3 {
                        if bits & (4 >> rx) != 0 {
                            self.fill(cx + rx * scale, y + ry as i64 * scale, scale, scale, colour);
                        }
                    }
                }
            }
            cx += 4 * scale;
        }
    }

    fn text_width(text: &str, scale: i64) -> i64 {
        text.chars().count() as i64 * 4 * scale - scale
    }

    /// `image` scaled up `zoom`× (nearest neighbour) with its top-left corner at `(x, y)`.
    fn blit(&mut self, x: i64, y: i64, image: &Image8, zoom: usize) {
        for py in 0..image.height * zoom {
            for px in 0..image.width * zoom {
                let i = ((py / zoom) * image.width + px / zoom) * image.channels;
                let rgb = match image.channels {
                    1 => [image.pixels[i]; 3],
                    _ => [image.pixels[i], image.pixels[i + 1], image.pixels[i + 2]],
                };
                self.set(x + px as i64, y + py as i64, rgb);
            }
        }
    }

    fn into_image(self) -> Image8 {
        Image8 {
            width: self.width,
            height: self.height,
            channels: 3,
            pixels: self.pixels,
        }
    }
}

/// A grid of equally sized pictures: `rows[r][c]`, each shown `zoom`× enlarged, under one header
/// per group of columns (e.g. "BASE" over the first half, "BASE + LORA" over the second).
pub fn picture_grid(rows: &[Vec<Image8>], headers: &[&str], zoom: usize) -> Image8 {
    let cols = rows.first().map_or(0, Vec::len);
    let (cell_w, cell_h) = rows
        .first()
        .and_then(|r| r.first())
        .map_or((0, 0), |i| (i.width * zoom, i.height * zoom));
    let gap = 4;
    let header_h = 28;
    // A wider gap between header groups.
    let group = cols / headers.len().max(1);
    let group_gap = 16;
    let x_of = |c: usize| (gap + c * (cell_w + gap) + (c / group.max(1)) * group_gap) as i64;
    let width = x_of(cols) as usize + gap;
    let height = header_h + rows.len() * (cell_h + gap) + gap;
    let mut canvas = Canvas::new(width, height, WHITE);
    for (g, header) in headers.iter().enumerate() {
        let left = x_of(g * group);
        let right = x_of((g + 1) * group) - gap as i64 - group_gap as i64;
        let x = left + (right - left - Canvas::text_width(header, 3)) / 2;
        canvas.text(x, 6, header, 3, INK);
    }
    for (r, row) in rows.iter().enumerate() {
        for (c, image) in row.iter().enumerate() {
            let y = (header_h + r * (cell_h + gap)) as i64;
            canvas.blit(x_of(c), y, image, zoom);
        }
    }
    canvas.into_image()
}

/// The training loss per step: raw values as light points, an exponential moving average as a
/// line, with the y-axis from 0 to the largest loss and a few labelled grid lines.
pub fn loss_curve(losses: &[f64]) -> Image8 {
    let (width, height) = (640usize, 360usize);
    let (left, right, top, bottom) = (56i64, 16i64, 16i64, 40i64);
    let mut canvas = Canvas::new(width, height, WHITE);
    let plot_w = width as i64 - left - right;
    let plot_h = height as i64 - top - bottom;
    let max = losses
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-12);
    let to_xy = |i: usize, v: f64| {
        let x = left as f64 + plot_w as f64 * i as f64 / (losses.len().max(2) - 1) as f64;
        let y = (top + plot_h) as f64 - plot_h as f64 * (v / max).clamp(0.0, 1.0);
        (x, y)
    };
    for k in 0..=4 {
        let v = max * k as f64 / 4.0;
        let y = to_xy(0, v).1.round() as i64;
        canvas.fill(left, y, plot_w, 1, GRID_LINE);
        let label = format!("{v:.2}");
        canvas.text(
            left - 8 - Canvas::text_width(&label, 2),
            y - 5,
            &label,
            2,
            INK,
        );
    }
    for (i, &v) in losses.iter().enumerate() {
        let (x, y) = to_xy(i, v);
        canvas.fill(x.round() as i64 - 1, y.round() as i64 - 1, 3, 3, RAW_LOSS);
    }
    let mut smoothed: Option<f64> = None;
    let mut previous = None;
    for (i, &v) in losses.iter().enumerate() {
        let s = smoothed.map_or(v, |s| 0.9 * s + 0.1 * v);
        smoothed = Some(s);
        let point = to_xy(i, s);
        if let Some(p) = previous {
            canvas.line(p, point, 2, SMOOTH_LOSS);
        }
        previous = Some(point);
    }
    canvas.fill(left, top, 1, plot_h + 1, INK);
    canvas.fill(left, top + plot_h, plot_w, 1, INK);
    let steps = losses.len().to_string();
    canvas.text(left, top + plot_h + 8, "0", 2, INK);
    canvas.text(
        left + plot_w - Canvas::text_width(&steps, 2),
        top + plot_h + 8,
        &steps,
        2,
        INK,
    );
    canvas.text(
        left + (plot_w - Canvas::text_width("STEP", 2)) / 2,
        top + plot_h + 20,
        "STEP",
        2,
        INK,
    );
    canvas.into_image()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_curve_draws_the_smoothed_line_inside_the_plot() {
        let losses: Vec<f64> = (0..100).map(|i| 1.0 / (1.0 + i as f64 * 0.1)).collect();
        let image = loss_curve(&losses);
        assert_eq!((image.width, image.height), (640, 360));
        let blue = image
            .pixels
            .chunks_exact(3)
            .filter(|p| *p == SMOOTH_LOSS)
            .count();
        assert!(blue > 500, "{blue} line pixels");
    }

    #[test]
    fn grid_places_every_picture() {
        let red = Image8 {
            width: 2,
            height: 2,
            channels: 3,
            pixels: [255, 0, 0].repeat(4),
        };
        let rows = vec![vec![red.clone(), red.clone()], vec![red.clone(), red]];
        let image = picture_grid(&rows, &["BASE", "LORA"], 10);
        let reds = image
            .pixels
            .chunks_exact(3)
            .filter(|p| *p == [255, 0, 0])
            .count();
        assert_eq!(reds, 4 * 20 * 20);
    }
}
