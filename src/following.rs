//! How well a model follows the shapes captions: each generated picture is read back into the
//! scene it shows (background, shape colour, shape kind) and compared with its caption. The
//! reading is deliberately simple, so that it measures the picture and not a second model:
//! - the background is the (median) colour of the outermost ring of pixels (no drawn shape
//!   touches it), accepted when it lies near one of the known backgrounds;
//! - every other pixel at least halfway from the background to a shape colour (along the line
//!   between them, as edge blends lie) takes that colour; the shape colour is the majority among
//!   pixels three quarters of the way or more;
//! - the shape is the largest connected region of such pixels, told apart by how much of its
//!   bounding box it fills: a square (axis-aligned) all of it, a circle π/4, a triangle (apex up)
//!   one half (and rows widen downwards). A ring or an outline has holes; a smear fills the wrong
//!   share, or has the wrong aspect;
//! - edges are crisp when pixels halfway between the background and the shape colour (more than
//!   a quarter of the way from each) are no more than the shape's bounding box's outline, about
//!   one deep around the shape, as drawn edges are; a soft blob has a wide band of them, whatever
//!   its outline. This is reported on its own (`crisp`), so a blurred circle still counts as a
//!   circle.

use anyhow::Result;
use lora_infer::output::Image8;
use lora_infer::{GenerateOptions, Pipeline};
use serde::Serialize;

use crate::shapes::{caption_grammar, Colour, Scene, ShapeKind, BACKGROUNDS, COLOURS, CONCEPT};

/// A ring colour farther than this (Euclidean, 0–255 RGB) from every known background is no
/// background at all (a muddy or mottled frame).
const BACKGROUND_TOLERANCE: f32 = 60.0;

/// Regions smaller than this many pixels are not a shape (the smallest drawn shape, a triangle
/// of radius 0.22 at 32², covers about 64).
const MIN_SHAPE_PIXELS: usize = 16;

/// What a picture shows, as far as [`read_scene`] can tell.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SceneReading {
    pub background: Option<Colour>,
    pub colour: Option<Colour>,
    pub shape: Option<ShapeKind>,
    /// A shape was recognised and its edges are sharp.
    pub crisp: bool,
}

fn distance2(a: &[u8], b: [u8; 3]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(&x, y)| (f32::from(x) - f32::from(y)).powi(2))
        .sum()
}

/// Where `p` lies on the line from `bg` to `colour`: how far along it (0 at the background, 1 at
/// the colour) and its squared distance from the line. An edge pixel blends the two, so it lies
/// on the line; plain nearest-colour would read a half-strength yellow on black as green.
fn along(p: &[u8], bg: [u8; 3], colour: [u8; 3]) -> (f32, f32) {
    let d: [f32; 3] = std::array::from_fn(|c| f32::from(p[c]) - f32::from(bg[c]));
    let axis: [f32; 3] = std::array::from_fn(|c| f32::from(colour[c]) - f32::from(bg[c]));
    let length2 = axis.iter().map(|a| a * a).sum::<f32>().max(1.0);
    let t = (0..3).map(|c| d[c] * axis[c]).sum::<f32>() / length2;
    let off2 = (0..3).map(|c| (d[c] - t * axis[c]).powi(2)).sum();
    (t, off2)
}

/// Reads `image` back into a scene; see the module documentation. Shape colours are the known
/// ones and the concept's.
pub fn read_scene(image: &Image8) -> SceneReading {
    let nothing = SceneReading {
        background: None,
        colour: None,
        shape: None,
        crisp: false,
    };
    let (w, h) = (image.width, image.height);
    if w == 0 || h == 0 || image.channels < 3 {
        return nothing;
    }
    let pixel = |x: usize, y: usize| &image.pixels[(y * w + x) * image.channels..][..3];
    // The ring's colour, channel by channel the median: a shape that strays onto the edge moves
    // a mean, not a median.
    let mut ring: [Vec<u8>; 3] = Default::default();
    for y in 0..h {
        for x in 0..w {
            if x == 0 || y == 0 || x + 1 == w || y + 1 == h {
                for (values, &v) in ring.iter_mut().zip(pixel(x, y)) {
                    values.push(v);
                }
            }
        }
    }
    let ring: [u8; 3] = std::array::from_fn(|c| {
        ring[c].sort_unstable();
        ring[c][ring[c].len() / 2]
    });
    let nearest_background = BACKGROUNDS
        .iter()
        .min_by(|a, b| distance2(&ring, a.rgb).total_cmp(&distance2(&ring, b.rgb)))
        .copied()
        .expect("there are backgrounds");
    let background = (distance2(&ring, nearest_background.rgb)
        <= BACKGROUND_TOLERANCE * BACKGROUND_TOLERANCE)
        .then_some(nearest_background);
    let bg = nearest_background.rgb;

    // Each pixel's label: the shape colour whose line from the background it lies nearest to,
    // among those it is at least halfway along (`None`: background); only pixels at least three
    // quarters of the way vote for the shape's colour.
    let colours: Vec<Colour> = COLOURS.iter().copied().chain([CONCEPT]).collect();
    let mut votes = vec![0usize; colours.len()];
    let labels: Vec<Option<usize>> = (0..w * h)
        .map(|i| {
            let p = pixel(i % w, i / w);
            let (best, t, _) = colours
                .iter()
                .enumerate()
                .map(|(k, c)| {
                    let (t, off2) = along(p, bg, c.rgb);
                    (k, t, off2)
                })
                .filter(|&(_, t, _)| t >= 0.5)
                .min_by(|a, b| a.2.total_cmp(&b.2))?;
            if t >= 0.75 {
                votes[best] += 1;
            }
            Some(best)
        })
        .collect();
    let voters: usize = votes.iter().sum();
    let colour = (voters >= MIN_SHAPE_PIXELS)
        .then(|| {
            (0..votes.len())
                .max_by_key(|&k| votes[k])
                .map(|k| colours[k])
        })
        .flatten();
    // Halfway pixels on the line to the shape's colour (a quarter to three quarters along it,
    // and within a quarter of its length of it).
    let mixed = |fg: Colour| {
        let length2 = distance2(&fg.rgb, bg);
        (0..w * h)
            .filter(|&i| {
                let (t, off2) = along(pixel(i % w, i / w), bg, fg.rgb);
                (0.25..=0.75).contains(&t) && off2 <= 0.0625 * length2
            })
            .count()
    };
    let (shape, crisp) = match (colour, largest_region(&labels, w, h)) {
        (Some(fg), Some(region)) => {
            let (shape, outline) = classify(&region, w);
            (shape, shape.is_some() && mixed(fg) as f64 <= outline)
        }
        _ => (None, false),
    };
    SceneReading {
        background,
        colour,
        shape,
        crisp,
    }
}

/// The 4-connected neighbours of pixel `i` in a `w × h` picture, `None` past an edge.
fn neighbours(i: usize, w: usize, h: usize) -> [Option<usize>; 4] {
    let (x, y) = (i % w, i / w);
    [
        (x > 0).then(|| i - 1),
        (x + 1 < w).then(|| i + 1),
        (y > 0).then(|| i - w),
        (y + 1 < h).then(|| i + w),
    ]
}

/// The pixel indices of the largest 4-connected region of non-background pixels.
fn largest_region(labels: &[Option<usize>], w: usize, h: usize) -> Option<Vec<usize>> {
    let mut seen = vec![false; labels.len()];
    let mut best: Option<Vec<usize>> = None;
    for start in 0..labels.len() {
        if seen[start] || labels[start].is_none() {
            continue;
        }
        seen[start] = true;
        let mut region = vec![start];
        let mut next = 0;
        while next < region.len() {
            let i = region[next];
            next += 1;
            for j in neighbours(i, w, h).into_iter().flatten() {
                if !seen[j] && labels[j].is_some() {
                    seen[j] = true;
                    region.push(j);
                }
            }
        }
        if best.as_ref().is_none_or(|b| region.len() > b.len()) {
            best = Some(region);
        }
    }
    best.filter(|region| region.len() >= MIN_SHAPE_PIXELS)
}

/// The shape a region is, from the share of its bounding box it fills, the box's aspect and, for
/// a triangle, rows widening downwards (apex up, as drawn); none for a region with holes (a ring,
/// an outline). Also how many edge pixels a drawn shape of that box has at most: the box's
/// outline, a little more than a circle's or a triangle's own.
fn classify(region: &[usize], w: usize) -> (Option<ShapeKind>, f64) {
    let xs = region.iter().map(|i| i % w);
    let ys = region.iter().map(|i| i / w);
    let (Some(x0), Some(x1), Some(y0), Some(y1)) =
        (xs.clone().min(), xs.max(), ys.clone().min(), ys.max())
    else {
        return (None, 0.0);
    };
    let (bw, bh) = (x1 - x0 + 1, y1 - y0 + 1);
    let mut inside = vec![false; bw * bh];
    let mut widths = vec![0usize; bh];
    for &i in region {
        inside[(i / w - y0) * bw + (i % w - x0)] = true;
        widths[i / w - y0] += 1;
    }
    let outline = 2.0 * (bw + bh) as f64 + 4.0;
    if holes(&inside, bw, bh) > 2 {
        return (None, outline);
    }
    let fill = region.len() as f64 / (bw * bh) as f64;
    let aspect = bw as f64 / bh as f64;
    let third = (bh / 3).max(1);
    let mean = |rows: &[usize]| rows.iter().sum::<usize>() as f64 / rows.len().max(1) as f64;
    let widening = mean(&widths[..third]) < 0.7 * mean(&widths[bh - third..]);
    // Drawn shapes: square 1.6r × 1.6r (fill 1), circle 2r × 2r (π/4 ≈ 0.785), triangle
    // 1.73r wide × 1.5r high (aspect 1.15, fill 0.5). Pixel edges move these: over 3000 drawn
    // scenes at 32², circles filled 0.73–0.88 of their box, triangles 0.50–0.61 (aspect
    // 1.0–1.33), squares all of it (aspect 0.92–1.09); the bounds split the gaps.
    let shape = if (0.8..=1.25).contains(&aspect) && fill >= 0.94 {
        Some(ShapeKind::Square)
    } else if (0.8..=1.25).contains(&aspect) && (0.665..0.94).contains(&fill) {
        Some(ShapeKind::Circle)
    } else if (0.9..=1.5).contains(&aspect) && (0.4..0.665).contains(&fill) && widening {
        Some(ShapeKind::Triangle)
    } else {
        None
    };
    (shape, outline)
}

/// Pixels of a `bw × bh` box outside the region (`inside` false) that cannot reach the box's
/// border through other such pixels: holes in the region.
fn holes(inside: &[bool], bw: usize, bh: usize) -> usize {
    let mut reached = vec![false; inside.len()];
    let mut queue: Vec<usize> = (0..bw * bh)
        .filter(|&i| {
            let (x, y) = (i % bw, i / bw);
            !inside[i] && (x == 0 || y == 0 || x + 1 == bw || y + 1 == bh)
        })
        .collect();
    for &i in &queue {
        reached[i] = true;
    }
    while let Some(i) = queue.pop() {
        for j in neighbours(i, bw, bh).into_iter().flatten() {
            if !inside[j] && !reached[j] {
                reached[j] = true;
                queue.push(j);
            }
        }
    }
    (0..inside.len())
        .filter(|&i| !inside[i] && !reached[i])
        .count()
}

/// The share of pictures whose reading matches their caption, per attribute.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Following {
    pub colour: f64,
    pub background: f64,
    pub shape: f64,
    /// Pictures showing a shape with sharp edges (of any kind).
    pub crisp: f64,
    /// Pictures read.
    pub pictures: usize,
}

/// Scores `pictures`, each with the scene its caption asked for.
pub fn score<'a>(pictures: impl IntoIterator<Item = (&'a Image8, &'a Scene)>) -> Following {
    let (mut colour, mut background, mut shape, mut crisp, mut n) = (0, 0, 0, 0, 0usize);
    for (image, asked) in pictures {
        let reading = read_scene(image);
        colour += usize::from(reading.colour == Some(asked.colour));
        background += usize::from(reading.background == Some(asked.background));
        shape += usize::from(reading.shape == Some(asked.shape));
        crisp += usize::from(reading.crisp);
        n += 1;
    }
    let share = |k: usize| {
        if n == 0 {
            f64::NAN
        } else {
            k as f64 / n as f64
        }
    };
    Following {
        colour: share(colour),
        background: share(background),
        shape: share(shape),
        crisp: share(crisp),
        pictures: n,
    }
}

/// Generates `seeds` pictures of every caption of the grammar with `pipeline` and scores them.
pub fn measure(
    pipeline: &Pipeline,
    guidance: f64,
    steps: usize,
    seeds: usize,
    seed: u64,
) -> Result<Following> {
    let grammar = caption_grammar();
    let mut pictures = Vec::new();
    for asked in grammar.iter().filter(|_| seeds > 0) {
        let generated = pipeline.generate(&GenerateOptions {
            prompt: asked.caption(),
            steps,
            guidance,
            num_images: seeds,
            batch_size: seeds,
            seed,
            ..GenerateOptions::default()
        })?;
        for image in lora_infer::output::to_images8(&generated.images)? {
            pictures.push((image, asked));
        }
    }
    Ok(score(pictures.iter().map(|(image, asked)| (image, *asked))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapes::ANYWHERE;
    use lora_core::Rng;

    #[test]
    fn drawn_scenes_read_back_as_their_captions() {
        let mut rng = Rng::new(11);
        let mut checked = 0;
        for _ in 0..1000 {
            let scene = Scene::random(&mut rng, &COLOURS, &BACKGROUNDS, ANYWHERE);
            let reading = read_scene(&scene.render(32));
            assert_eq!(reading.background, Some(scene.background), "{scene:?}");
            assert_eq!(reading.colour, Some(scene.colour), "{scene:?}");
            assert_eq!(reading.shape, Some(scene.shape), "{scene:?}");
            assert!(reading.crisp, "{scene:?}");
            checked += 1;
        }
        let concept = Scene::random(&mut rng, &[CONCEPT], &BACKGROUNDS, ANYWHERE);
        assert_eq!(read_scene(&concept.render(32)).colour, Some(CONCEPT));
        assert_eq!(checked, 1000);
    }

    fn image(side: usize, f: impl Fn(usize, usize) -> [u8; 3]) -> Image8 {
        let mut pixels = Vec::new();
        for y in 0..side {
            for x in 0..side {
                pixels.extend(f(x, y));
            }
        }
        Image8 {
            width: side,
            height: side,
            channels: 3,
            pixels,
        }
    }

    #[test]
    fn blobs_rings_and_mud_are_not_read_as_scenes() {
        let c = 15.5f32;
        // A soft blob: a red disc fading into the white background (no clear edge).
        let blob = image(32, |x, y| {
            let d = ((x as f32 - c).powi(2) + (y as f32 - c).powi(2)).sqrt();
            let t = (1.0 - d / 12.0).clamp(0.0, 1.0);
            let v = |fg: u8, bg: u8| (t * f32::from(fg) + (1.0 - t) * f32::from(bg)) as u8;
            [v(220, 255), v(30, 255), v(30, 255)]
        });
        let reading = read_scene(&blob);
        assert_eq!(reading.colour, Some(COLOURS[0]), "{reading:?}");
        assert!(!reading.crisp, "{reading:?}");
        // A ring: the outline of a circle.
        let ring = image(32, |x, y| {
            let d = ((x as f32 - c).powi(2) + (y as f32 - c).powi(2)).sqrt();
            if (8.0..10.0).contains(&d) {
                [30, 70, 220]
            } else {
                [0, 0, 0]
            }
        });
        assert_eq!(read_scene(&ring).shape, None);
        // Upside down, a triangle is no triangle; an outline of a square is no square.
        let flipped = Scene {
            shape: ShapeKind::Triangle,
            colour: COLOURS[1],
            background: BACKGROUNDS[0],
            cx: 0.5,
            cy: 0.5,
            size: 0.3,
        }
        .render(32);
        let mut upside_down = flipped.clone();
        for y in 0..32 {
            let (src, dst) = (&flipped.pixels[(31 - y) * 96..][..96], y * 96);
            upside_down.pixels[dst..dst + 96].copy_from_slice(src);
        }
        assert_eq!(read_scene(&flipped).shape, Some(ShapeKind::Triangle));
        assert_eq!(read_scene(&upside_down).shape, None);
        let outline = image(32, |x, y| {
            let edge = (8..=23).contains(&x) && (8..=23).contains(&y);
            let inner = (10..=21).contains(&x) && (10..=21).contains(&y);
            if edge && !inner {
                [220, 30, 30]
            } else {
                [255, 255, 255]
            }
        });
        assert_eq!(read_scene(&outline).shape, None);
        // A muddy frame is no background.
        let mud = image(32, |_, _| [120, 110, 60]);
        let reading = read_scene(&mud);
        assert_eq!(reading.background, None);
        // Uniform white: a background and nothing on it.
        let empty = read_scene(&image(32, |_, _| [255, 255, 255]));
        assert_eq!(
            (empty.background, empty.colour, empty.shape, empty.crisp),
            (Some(BACKGROUNDS[0]), None, None, false)
        );
    }

    #[test]
    fn scores_are_shares_and_an_empty_set_is_nan() {
        let grammar = caption_grammar();
        assert_eq!(grammar.len(), 24);
        let drawn: Vec<(Image8, &Scene)> = grammar
            .iter()
            .map(|asked| (asked.render(32), asked))
            .collect();
        let all = score(drawn.iter().map(|(i, a)| (i, *a)));
        assert_eq!(
            (all.colour, all.background, all.shape, all.crisp),
            (1.0, 1.0, 1.0, 1.0)
        );
        assert_eq!(all.pictures, 24);
        // Every caption asked of the wrong picture: the shape is wrong for two thirds.
        let shifted = score(
            drawn
                .iter()
                .zip(grammar.iter().cycle().skip(1))
                .map(|((i, _), a)| (i, a)),
        );
        assert!(shifted.shape < 0.5, "{shifted:?}");
        assert!(score(std::iter::empty()).colour.is_nan());
    }
}
