//! Small raster pictures: labelled grids of generated images, the training loss curve and a
//! metric over training steps (the quick start, lora-eval's comparisons), drawn straight into
//! RGB pixels (with a 3×5 pixel font for the few labels) so no plotting or font
//! stack is needed. `plotters`' bitmap backend would draw the curves, but any text through it
//! needs a system font (its `ttf` feature) or a TrueType file shipped with us (`ab_glyph`); the
//! quick start must run on a fresh offline machine, and a few labels do not justify either.

use crate::output::Image8;

type Rgb = [u8; 3];

const WHITE: Rgb = [255, 255, 255];
const INK: Rgb = [40, 40, 40];
const GRID_LINE: Rgb = [225, 225, 225];
const RAW_LOSS: Rgb = [170, 190, 230];
const SMOOTH_LOSS: Rgb = [20, 70, 200];
const FIXED_NOISE_LOSS: Rgb = [230, 120, 20];

/// 3×5 glyphs, one row per 3-bit number (MSB = left column): digits, capitals (lower case is
/// drawn as capitals) and the punctuation of file names and numbers.
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
        '-' => [0, 0, 7, 0, 0],
        '_' => [0, 0, 0, 0, 7],
        ':' => [0, 2, 0, 2, 0],
        '/' => [1, 1, 2, 4, 4],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        ',' => [0, 0, 0, 2, 4],
        '=' => [0, 7, 0, 7, 0],
        '%' => [5, 1, 2, 4, 5],
        '\'' => [2, 2, 0, 0, 0],
        '!' => [2, 2, 2, 0, 2],
        '?' => [6, 1, 2, 0, 2],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [5, 7, 7, 7, 5],
        'O' => [7, 5, 5, 5, 7],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [7, 4, 7, 1, 7],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
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

/// `text` broken at spaces into lines of at most `width` characters (a longer word is cut).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        let word: String = word.chars().take(width.max(1)).collect();
        match lines.last_mut() {
            Some(line) if line.chars().count() + 1 + word.chars().count() <= width => {
                line.push(' ');
                line.push_str(&word);
            }
            _ => lines.push(word),
        }
    }
    lines
}

/// A grid of equally sized pictures: `rows[r][c]`, each shown `zoom`× enlarged, with the row's
/// label beside it (wrapped at spaces), one header per group of columns (e.g. "BASE" over the
/// first half, "BASE + LORA" over the second) and a one-line `legend` under the grid.
pub fn picture_grid(
    rows: &[Vec<Image8>],
    row_labels: &[String],
    headers: &[&str],
    legend: &str,
    zoom: usize,
) -> Image8 {
    let cols = rows.first().map_or(0, Vec::len);
    let (cell_w, cell_h) = rows
        .first()
        .and_then(|r| r.first())
        .map_or((0, 0), |i| (i.width * zoom, i.height * zoom));
    let gap = 4;
    let header_h = 28;
    let legend_h = 24;
    let (label_scale, line_h) = (2i64, 14i64);
    let label_chars = 20;
    let label_w = if row_labels.is_empty() {
        0
    } else {
        label_chars * 4 * label_scale as usize + 2 * gap
    };
    // A wider gap between header groups.
    let group = cols / headers.len().max(1);
    let group_gap = 16;
    let x_of =
        |c: usize| (label_w + gap + c * (cell_w + gap) + (c / group.max(1)) * group_gap) as i64;
    let grid_right = x_of(cols) as usize + gap;
    let width = grid_right.max(Canvas::text_width(legend, 2).max(0) as usize + 2 * gap);
    // Rows are as tall as a picture, or as the longest label's lines where those are taller.
    let label_lines = row_labels
        .iter()
        .map(|label| wrap(label, label_chars).len())
        .max()
        .unwrap_or(0);
    let row_h = cell_h.max(label_lines * line_h as usize);
    let grid_bottom = header_h + rows.len() * (row_h + gap) + gap;
    let height = grid_bottom + if legend.is_empty() { 0 } else { legend_h };
    let mut canvas = Canvas::new(width, height, WHITE);
    for (g, header) in headers.iter().enumerate() {
        let left = x_of(g * group);
        let right = x_of((g + 1) * group) - gap as i64 - group_gap as i64;
        let x = left + (right - left - Canvas::text_width(header, 3)) / 2;
        canvas.text(x, 6, header, 3, INK);
    }
    for (r, row) in rows.iter().enumerate() {
        let y = (header_h + r * (row_h + gap)) as i64;
        if let Some(label) = row_labels.get(r) {
            let lines = wrap(label, label_chars);
            let top = y + (row_h as i64 - lines.len() as i64 * line_h) / 2;
            for (k, line) in lines.iter().enumerate() {
                canvas.text(gap as i64, top + k as i64 * line_h, line, label_scale, INK);
            }
        }
        for (c, image) in row.iter().enumerate() {
            canvas.blit(x_of(c), y, image, zoom);
        }
    }
    canvas.text(gap as i64, grid_bottom as i64 + 4, legend, 2, INK);
    canvas.into_image()
}

/// A plot area with a y-axis from 0 to `max` (five labelled grid lines) and an x-axis from
/// `x_range.0` to `x_range.1` labelled at both ends and named `x_name`.
struct Axes {
    left: i64,
    top: i64,
    width: i64,
    height: i64,
    max: f64,
    x_range: (f64, f64),
}

impl Axes {
    const SIZE: (usize, usize) = (640, 360);

    fn draw(canvas: &mut Canvas, max: f64, x_range: (f64, f64), x_name: &str, title: &str) -> Self {
        let (left, right, top, bottom) = (72i64, 16i64, 24i64, 40i64);
        let axes = Self {
            left,
            top,
            width: Self::SIZE.0 as i64 - left - right,
            height: Self::SIZE.1 as i64 - top - bottom,
            max: max.max(1e-12),
            x_range,
        };
        for k in 0..=4 {
            let v = axes.max * k as f64 / 4.0;
            let y = axes.point(x_range.0, v).1.round() as i64;
            canvas.fill(left, y, axes.width, 1, GRID_LINE);
            let label = format!("{v:.2}");
            canvas.text(
                left - 8 - Canvas::text_width(&label, 2),
                y - 5,
                &label,
                2,
                INK,
            );
        }
        canvas.fill(left, top, 1, axes.height + 1, INK);
        canvas.fill(left, top + axes.height, axes.width, 1, INK);
        let (first, last) = (format_tick(x_range.0), format_tick(x_range.1));
        let below = top + axes.height + 8;
        canvas.text(left, below, &first, 2, INK);
        canvas.text(
            left + axes.width - Canvas::text_width(&last, 2),
            below,
            &last,
            2,
            INK,
        );
        let centre = |text: &str| left + (axes.width - Canvas::text_width(text, 2)) / 2;
        canvas.text(centre(x_name), below + 12, x_name, 2, INK);
        canvas.text(centre(title), 6, title, 2, INK);
        axes
    }

    /// Pixel coordinates of the value `v` at `x`.
    fn point(&self, x: f64, v: f64) -> (f64, f64) {
        let span = (self.x_range.1 - self.x_range.0).max(1e-12);
        let px = self.left as f64 + self.width as f64 * (x - self.x_range.0) / span;
        let py =
            (self.top + self.height) as f64 - self.height as f64 * (v / self.max).clamp(0.0, 1.0);
        (px, py)
    }
}

fn format_tick(x: f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

fn finite_max(values: impl Iterator<Item = f64>) -> f64 {
    values.filter(|v| v.is_finite()).fold(0.0f64, f64::max)
}

/// The training loss per step: raw values as light points, an exponential moving average as a
/// line, with the y-axis from 0 to the largest loss and a few labelled grid lines; and the
/// fixed-noise (validation) loss at its steps, `(step, loss)` with step 0 before the first
/// update, as marked points joined by a line; a title and a legend naming each.
pub fn loss_curve(losses: &[f64], fixed_noise: &[(f64, f64)]) -> Image8 {
    let mut canvas = Canvas::new(Axes::SIZE.0, Axes::SIZE.1, WHITE);
    let last = losses.len().max(2) - 1;
    let max = finite_max(
        losses
            .iter()
            .copied()
            .chain(fixed_noise.iter().map(|p| p.1)),
    );
    // Step s of the log is drawn at x = s - 1 (the first update's loss at 0); a fixed-noise
    // loss after step s is drawn there too, its step-0 baseline at the left edge.
    let axes = Axes::draw(&mut canvas, max, (0.0, last as f64), "STEP", "LOSS (MSE)");
    for (i, &v) in losses.iter().enumerate() {
        let (x, y) = axes.point(i as f64, v);
        canvas.fill(x.round() as i64 - 1, y.round() as i64 - 1, 3, 3, RAW_LOSS);
    }
    let mut smoothed: Option<f64> = None;
    let mut previous = None;
    for (i, &v) in losses.iter().enumerate() {
        let s = smoothed.map_or(v, |s| 0.9 * s + 0.1 * v);
        smoothed = Some(s);
        let point = axes.point(i as f64, s);
        if let Some(p) = previous {
            canvas.line(p, point, 2, SMOOTH_LOSS);
        }
        previous = Some(point);
    }
    if !fixed_noise.is_empty() {
        let at_steps: Vec<(f64, f64)> = fixed_noise
            .iter()
            .map(|&(step, v)| ((step - 1.0).max(0.0), v))
            .collect();
        marked_series(&mut canvas, &axes, &at_steps, FIXED_NOISE_LOSS);
    }
    let legend = [
        ("EACH STEP", RAW_LOSS),
        ("MOVING AVERAGE", SMOOTH_LOSS),
        ("FIXED-NOISE LOSS", FIXED_NOISE_LOSS),
    ];
    let shown = if fixed_noise.is_empty() { 2 } else { 3 };
    let right = Axes::SIZE.0 as i64 - 20;
    for (row, (label, colour)) in legend.iter().take(shown).enumerate() {
        let x = right - Canvas::text_width(label, 2);
        canvas.text(x, 12 + 14 * row as i64, label, 2, *colour);
    }
    canvas.into_image()
}

/// One metric at several training steps: points joined by a line, titled `title`.
pub fn metric_curve(title: &str, points: &[(f64, f64)]) -> Image8 {
    let mut canvas = Canvas::new(Axes::SIZE.0, Axes::SIZE.1, WHITE);
    let (lo, hi) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.0), hi.max(p.0))
        });
    let x_range = if lo < hi {
        (lo, hi)
    } else {
        (lo - 1.0, lo + 1.0)
    };
    let max = finite_max(points.iter().map(|p| p.1)) * 1.1;
    let axes = Axes::draw(&mut canvas, max, x_range, "STEP", title);
    marked_series(&mut canvas, &axes, points, SMOOTH_LOSS);
    canvas.into_image()
}

/// The finite `(x, value)` points as 7-pixel squares joined by a line.
fn marked_series(canvas: &mut Canvas, axes: &Axes, points: &[(f64, f64)], colour: Rgb) {
    let mut previous = None;
    for &(x, v) in points.iter().filter(|p| p.1.is_finite()) {
        let point = axes.point(x, v);
        canvas.fill(
            point.0.round() as i64 - 3,
            point.1.round() as i64 - 3,
            7,
            7,
            colour,
        );
        if let Some(p) = previous {
            canvas.line(p, point, 2, colour);
        }
        previous = Some(point);
    }
}

/// A grid of equally sized pictures, `rows[r][c]` shown `zoom`× enlarged, with a label over each
/// column and a label beside each row (long labels are cut to fit).
pub fn labelled_grid(
    rows: &[Vec<Image8>],
    row_labels: &[String],
    column_labels: &[String],
    zoom: usize,
) -> Image8 {
    let cols = rows.first().map_or(0, Vec::len);
    let (cell_w, cell_h) = rows
        .first()
        .and_then(|r| r.first())
        .map_or((0, 0), |i| (i.width * zoom, i.height * zoom));
    let (gap, scale) = (6usize, 2i64);
    let label_w = 200usize;
    let header_h = 24usize;
    let x_of = |c: usize| (label_w + gap + c * (cell_w + gap)) as i64;
    let y_of = |r: usize| (header_h + r * (cell_h + gap)) as i64;
    let width = x_of(cols) as usize + gap;
    let height = y_of(rows.len()) as usize + gap;
    let mut canvas = Canvas::new(width, height, WHITE);
    let fit = |text: &str, pixels: usize| -> String {
        let chars = (pixels as i64 + scale) / (4 * scale);
        text.chars().take(chars.max(0) as usize).collect()
    };
    for (c, label) in column_labels.iter().enumerate().take(cols) {
        let label = fit(label, cell_w);
        let x = x_of(c) + (cell_w as i64 - Canvas::text_width(&label, scale)) / 2;
        canvas.text(x, 6, &label, scale, INK);
    }
    for (r, row) in rows.iter().enumerate() {
        if let Some(label) = row_labels.get(r) {
            // Up to three lines of the row label beside the row.
            let per_line = (label_w as i64 - gap as i64 + scale) / (4 * scale);
            let chars: Vec<char> = label.chars().collect();
            for (line, chunk) in chars.chunks(per_line.max(1) as usize).take(3).enumerate() {
                let text: String = chunk.iter().collect();
                canvas.text(
                    gap as i64,
                    y_of(r) + 4 + line as i64 * 14,
                    &text,
                    scale,
                    INK,
                );
            }
        }
        for (c, image) in row.iter().enumerate() {
            canvas.blit(x_of(c), y_of(r), image, zoom);
        }
    }
    canvas.into_image()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_curve_draws_the_smoothed_line_inside_the_plot() {
        let losses: Vec<f64> = (0..100).map(|i| 1.0 / (1.0 + i as f64 * 0.1)).collect();
        let image = loss_curve(&losses, &[]);
        assert_eq!((image.width, image.height), (640, 360));
        let count = |image: &Image8, colour: Rgb| {
            image
                .pixels
                .chunks_exact(3)
                .filter(|p| *p == colour)
                .count()
        };
        assert!(count(&image, SMOOTH_LOSS) > 500, "line pixels");
        assert_eq!(count(&image, FIXED_NOISE_LOSS), 0);
        let with_fixed = loss_curve(&losses, &[(0.0, 1.2), (50.0, 0.4), (100.0, 0.2)]);
        assert!(
            count(&with_fixed, FIXED_NOISE_LOSS) > 3 * 49,
            "fixed-noise points"
        );
    }

    #[test]
    fn metric_curve_draws_its_points() {
        let image = metric_curve("FID", &[(100.0, 40.0), (200.0, 30.0), (300.0, 35.0)]);
        let marks = image
            .pixels
            .chunks_exact(3)
            .filter(|p| *p == SMOOTH_LOSS)
            .count();
        assert!(marks > 3 * 49, "{marks} point pixels");
    }

    #[test]
    fn labelled_grid_places_every_picture() {
        let green = Image8 {
            width: 3,
            height: 2,
            channels: 3,
            pixels: [0, 255, 0].repeat(6),
        };
        let rows = vec![vec![green.clone(); 3]; 2];
        let labels = ["A CAT".to_owned(), "A DOG".to_owned()];
        let columns = ["BASE".to_owned(), "X".to_owned(), "Y".to_owned()];
        let image = labelled_grid(&rows, &labels, &columns, 5);
        let greens = image
            .pixels
            .chunks_exact(3)
            .filter(|p| *p == [0, 255, 0])
            .count();
        assert_eq!(greens, 6 * 15 * 10);
    }

    #[test]
    fn grid_places_every_picture_and_writes_its_labels() {
        let red = Image8 {
            width: 2,
            height: 2,
            channels: 3,
            pixels: [255, 0, 0].repeat(4),
        };
        let rows = vec![vec![red.clone(), red.clone()], vec![red.clone(), red]];
        let ink = |image: &Image8| image.pixels.chunks_exact(3).filter(|p| *p == INK).count();
        let bare = picture_grid(&rows, &[], &["BASE", "LORA"], "", 10);
        let reds = bare
            .pixels
            .chunks_exact(3)
            .filter(|p| *p == [255, 0, 0])
            .count();
        assert_eq!(reds, 4 * 20 * 20);
        let labels = [
            "a sks circle on a white background".to_owned(),
            "x".to_owned(),
        ];
        let labelled = picture_grid(&rows, &labels, &["BASE", "LORA"], "LEFT: BASE", 10);
        assert!(labelled.width > bare.width && labelled.height > bare.height);
        // Row labels and the legend add ink: 4 scaled font pixels each at least per character.
        let letters = labels.concat().replace(' ', "").len() + "LEFT:BASE".len();
        assert!(
            ink(&labelled) >= ink(&bare) + 4 * letters,
            "{}",
            ink(&labelled)
        );
    }

    #[test]
    fn labels_wrap_at_spaces() {
        assert_eq!(
            wrap("a sks circle on a white background", 20),
            ["a sks circle on a", "white background"]
        );
        assert_eq!(wrap("abcdefghij", 4), ["abcd"]);
        assert!(wrap("", 5).is_empty());
    }
}
