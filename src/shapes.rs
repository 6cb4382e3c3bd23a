//! Procedurally drawn, captioned pictures: one flat shape (circle, square, triangle) of one colour
//! on a plain background, captioned the way people caption ("a red circle on a white
//! background"). The embedded default model learns them; the quick start's concept is a colour
//! the model never saw, named by the rare token `sks`. Everything comes from a seeded [`Rng`], so a
//! dataset is reproducible from its seed.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use lora_core::io::write_atomic;
use lora_core::Rng;
use lora_infer::output::Image8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeKind {
    Circle,
    Square,
    Triangle,
}

impl ShapeKind {
    pub const ALL: [ShapeKind; 3] = [ShapeKind::Circle, ShapeKind::Square, ShapeKind::Triangle];

    pub fn name(self) -> &'static str {
        match self {
            ShapeKind::Circle => "circle",
            ShapeKind::Square => "square",
            ShapeKind::Triangle => "triangle",
        }
    }
}

/// A named colour, as it appears in captions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Colour {
    pub name: &'static str,
    pub rgb: [u8; 3],
}

/// Shape colours of the default model's training pictures.
pub const COLOURS: [Colour; 4] = [
    Colour {
        name: "red",
        rgb: [220, 30, 30],
    },
    Colour {
        name: "green",
        rgb: [30, 170, 50],
    },
    Colour {
        name: "blue",
        rgb: [30, 70, 220],
    },
    Colour {
        name: "yellow",
        rgb: [240, 200, 20],
    },
];

/// Backgrounds of the default model's training pictures.
pub const BACKGROUNDS: [Colour; 2] = [
    Colour {
        name: "white",
        rgb: [255, 255, 255],
    },
    Colour {
        name: "black",
        rgb: [0, 0, 0],
    },
];

/// The quick start's concept: magenta, which the default model never saw, called `sks` (a rare
/// CLIP token, as in DreamBooth), so the model must learn it from the adapter's pictures alone.
pub const CONCEPT: Colour = Colour {
    name: "sks",
    rgb: [230, 40, 230],
};

/// How far (per axis, in fractions of the side) a training picture's shape may lie from the
/// picture's centre: the default model is trained on centred shapes, and the quick start's
/// adapter on the same kind of picture (why: `crate::default_model`).
pub const POSITION_SPREAD: f32 = 0.0;

/// A spread that lets the shape lie anywhere inside the picture.
pub const ANYWHERE: f32 = 0.5;

/// One picture: a shape of `colour` centred at `(cx, cy)` with "radius" `size` (fractions of
/// the side) on `background`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scene {
    pub shape: ShapeKind,
    pub colour: Colour,
    pub background: Colour,
    pub cx: f32,
    pub cy: f32,
    pub size: f32,
}

impl Scene {
    /// A shape of random kind, colour (from `colours`), background (from `backgrounds`), size and
    /// position (centre at most `spread` from the picture's, per axis, in fractions of the side);
    /// the shape always lies wholly inside the picture.
    pub fn random(rng: &mut Rng, colours: &[Colour], backgrounds: &[Colour], spread: f32) -> Self {
        let pick = |rng: &mut Rng, n: usize| rng.below(n as u64) as usize;
        let shape = ShapeKind::ALL[pick(rng, ShapeKind::ALL.len())];
        let colour = colours[pick(rng, colours.len())];
        let background = backgrounds[pick(rng, backgrounds.len())];
        Self::placed(rng, shape, colour, background, spread)
    }

    /// The `index`-th scene of a balanced set: kind, background and colour cycle through every
    /// combination (the kind fastest), so any run of `3 × backgrounds × colours` scenes shows each
    /// once; size is random, position within `spread` of the centre. A small dataset drawn at
    /// random can miss a combination entirely, and what a dataset never shows an adapter does not
    /// learn.
    pub fn balanced(
        rng: &mut Rng,
        index: usize,
        colours: &[Colour],
        backgrounds: &[Colour],
        spread: f32,
    ) -> Self {
        let kinds = ShapeKind::ALL.len();
        let shape = ShapeKind::ALL[index % kinds];
        let background = backgrounds[(index / kinds) % backgrounds.len()];
        let colour = colours[(index / (kinds * backgrounds.len())) % colours.len()];
        Self::placed(rng, shape, colour, background, spread)
    }

    /// `shape` in `colour` on `background` at a random size, centred at most `spread` from the
    /// picture's centre per axis and wholly inside the picture (`spread` ≥ [`ANYWHERE`]: anywhere).
    fn placed(
        rng: &mut Rng,
        shape: ShapeKind,
        colour: Colour,
        background: Colour,
        spread: f32,
    ) -> Self {
        debug_assert!(spread >= 0.0, "a spread is a distance, not {spread}");
        let size = 0.22 + 0.14 * rng.uniform() as f32;
        let margin = size + 0.04;
        let (low, high) = ((0.5 - spread).max(margin), (0.5 + spread).min(1.0 - margin));
        let coord = |rng: &mut Rng| low + (high - low) * rng.uniform() as f32;
        let (cx, cy) = (coord(rng), coord(rng));
        Self {
            shape,
            colour,
            background,
            cx,
            cy,
            size,
        }
    }

    pub fn caption(&self) -> String {
        format!(
            "a {} {} on a {} background",
            self.colour.name,
            self.shape.name(),
            self.background.name
        )
    }

    /// Whether the point `(x, y)` (fractions of the side) is inside the shape.
    fn covers(&self, x: f32, y: f32) -> bool {
        let (dx, dy) = (x - self.cx, y - self.cy);
        let r = self.size;
        match self.shape {
            ShapeKind::Circle => dx * dx + dy * dy <= r * r,
            ShapeKind::Square => dx.abs() <= 0.8 * r && dy.abs() <= 0.8 * r,
            // The equilateral triangle inscribed in the circle of radius r, apex up: apex at
            // -r, base at r/2, half-width growing linearly to r·√3/2 at the base.
            ShapeKind::Triangle => {
                let top = -r;
                let bottom = 0.5 * r;
                if dy < top || dy > bottom {
                    return false;
                }
                let half_width = (dy - top) / (bottom - top) * r * 0.866;
                dx.abs() <= half_width
            }
        }
    }

    /// The picture at `side × side` pixels, each pixel the average of 4×4 sub-samples (smooth
    /// edges, as a photographed or rendered shape has).
    pub fn render(&self, side: usize) -> Image8 {
        const SUB: usize = 4;
        let mut pixels = Vec::with_capacity(side * side * 3);
        for py in 0..side {
            for px in 0..side {
                let mut inside = 0;
                for sy in 0..SUB {
                    for sx in 0..SUB {
                        let x = (px as f32 + (sx as f32 + 0.5) / SUB as f32) / side as f32;
                        let y = (py as f32 + (sy as f32 + 0.5) / SUB as f32) / side as f32;
                        inside += usize::from(self.covers(x, y));
                    }
                }
                let t = inside as f32 / (SUB * SUB) as f32;
                for c in 0..3 {
                    let v = t * f32::from(self.colour.rgb[c])
                        + (1.0 - t) * f32::from(self.background.rgb[c]);
                    pixels.push(v.round() as u8);
                }
            }
        }
        Image8 {
            width: side,
            height: side,
            channels: 3,
            pixels,
        }
    }
}

/// One centred scene per caption the default model was trained on (every shape × colour ×
/// background), in a fixed order: what each caption asks for.
pub fn caption_grammar() -> Vec<Scene> {
    let mut scenes = Vec::new();
    for background in BACKGROUNDS {
        for colour in COLOURS {
            for shape in ShapeKind::ALL {
                scenes.push(Scene {
                    shape,
                    colour,
                    background,
                    cx: 0.5,
                    cy: 0.5,
                    size: 0.3,
                });
            }
        }
    }
    scenes
}

/// Every caption the default model was trained on, in [`caption_grammar`]'s order.
pub fn all_captions() -> Vec<String> {
    caption_grammar().iter().map(Scene::caption).collect()
}

/// `[3, H, W]` f32 in [-1, 1], the UNet's pixel-space input.
pub fn image_tensor(image: &Image8, device: &Device) -> Result<Tensor> {
    ensure!(image.channels == 3, "expected an RGB image");
    let values: Vec<f32> = image
        .pixels
        .iter()
        .map(|&v| f32::from(v) / 127.5 - 1.0)
        .collect();
    Ok(Tensor::from_vec(values, (image.height, image.width, 3), device)?.permute((2, 0, 1))?)
}

/// Writes `scenes` into `dir` (created if needed) as `<prefix>-NNNN.png` with a
/// `<prefix>-NNNN.txt` caption beside each (the layout lora-train reads). Existing files are
/// never overwritten.
pub fn write_dataset(dir: &Path, prefix: &str, scenes: &[Scene], side: usize) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (i, scene) in scenes.iter().enumerate() {
        let stem = format!("{prefix}-{i:04}");
        for ext in ["png", "txt"] {
            let path = dir.join(format!("{stem}.{ext}"));
            ensure!(!path.exists(), "{} already exists", path.display());
        }
        let image = scene.render(side);
        lora_infer::output::write_png(
            &dir.join(format!("{stem}.png")),
            &image,
            &Default::default(),
        )?;
        let caption = scene.caption();
        write_atomic(&dir.join(format!("{stem}.txt")), |temp| {
            std::fs::write(temp, &caption)
                .with_context(|| format!("cannot write {}", temp.display()))
        })?;
    }
    Ok(())
}

/// How magenta an image is: the mean over pixels of `max(0, min(R, B) − G) / 255`. Zero for
/// every colour the default model knows (red, green, blue and yellow each lack red or blue or
/// have as much green) and for white and black; up to ~0.75 for a picture filled with
/// [`CONCEPT`]. Unlike a distance to one exact colour, it also credits a desaturated magenta.
pub fn magenta_score(image: &Image8) -> f64 {
    let total: f64 = image
        .pixels
        .chunks_exact(image.channels)
        .map(|p| {
            let (r, g, b) = (f64::from(p[0]), f64::from(p[1]), f64::from(p[2]));
            (r.min(b) - g).max(0.0) / 255.0
        })
        .sum();
    total / (image.width * image.height) as f64
}

/// Mean absolute difference of two equally sized images, in 0–255 units.
pub fn mean_abs_diff(a: &Image8, b: &Image8) -> f64 {
    let total: u64 = a
        .pixels
        .iter()
        .zip(&b.pixels)
        .map(|(&x, &y)| u64::from(x.abs_diff(y)))
        .sum();
    total as f64 / a.pixels.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fraction of an image's pixels within `radius` (Euclidean, 0–255 RGB) of `rgb`: how much of
    /// the picture shows that colour.
    fn colour_fraction(image: &Image8, rgb: [u8; 3], radius: f32) -> f64 {
        let near = image
            .pixels
            .chunks_exact(image.channels)
            .filter(|p| {
                let d2: f32 = p
                    .iter()
                    .zip(rgb)
                    .map(|(&a, b)| (f32::from(a) - f32::from(b)).powi(2))
                    .sum();
                d2 <= radius * radius
            })
            .count();
        near as f64 / (image.width * image.height) as f64
    }

    #[test]
    fn scenes_render_their_colours_inside_the_picture() {
        let mut rng = Rng::new(7);
        for _ in 0..50 {
            let scene = Scene::random(&mut rng, &COLOURS, &BACKGROUNDS, ANYWHERE);
            let image = scene.render(32);
            let shape = colour_fraction(&image, scene.colour.rgb, 1.0);
            let background = colour_fraction(&image, scene.background.rgb, 1.0);
            assert!(
                shape > 0.03 && background > 0.3,
                "{scene:?}: {shape} {background}"
            );
            // Nothing touches the border: the outermost pixels are pure background.
            for i in 0..32 {
                for (x, y) in [(i, 0), (i, 31), (0, i), (31, i)] {
                    let p = &image.pixels[(y * 32 + x) * 3..][..3];
                    assert_eq!(p, scene.background.rgb, "{scene:?} at {x},{y}");
                }
            }
        }
    }

    #[test]
    fn shapes_lie_within_their_spread_and_inside_the_picture() {
        let mut rng = Rng::new(5);
        for spread in [0.0, 0.06, 0.2, ANYWHERE] {
            let (mut lowest, mut highest) = (1.0f32, 0.0f32);
            for _ in 0..200 {
                let scene = Scene::random(&mut rng, &COLOURS, &BACKGROUNDS, spread);
                for c in [scene.cx, scene.cy] {
                    assert!((c - 0.5).abs() <= spread + 1e-6, "{spread}: {scene:?}");
                    assert!(c - scene.size > 0.0 && c + scene.size < 1.0, "{scene:?}");
                    (lowest, highest) = (lowest.min(c), highest.max(c));
                }
            }
            // The centres spread over the range allowed: within 0.05 of both ends (the smallest
            // shape, radius 0.22, reaches the border's 0.04 margin at 0.26 from it).
            let reach = spread.min(ANYWHERE - 0.22 - 0.04);
            assert!(
                lowest <= 0.5 - reach + 0.05 && highest >= 0.5 + reach - 0.05,
                "{spread}: centres only in {lowest}..{highest}"
            );
        }
        let centred = Scene::random(&mut rng, &COLOURS, &BACKGROUNDS, 0.0);
        assert_eq!((centred.cx, centred.cy), (0.5, 0.5));
    }

    #[test]
    fn a_balanced_run_shows_every_combination_once() {
        let mut rng = Rng::new(3);
        let n = ShapeKind::ALL.len() * BACKGROUNDS.len() * COLOURS.len();
        let mut captions: Vec<String> = (0..n)
            .map(|i| Scene::balanced(&mut rng, i, &COLOURS, &BACKGROUNDS, ANYWHERE).caption())
            .collect();
        captions.sort();
        let mut expected = all_captions();
        expected.sort();
        assert_eq!(captions, expected);
        // With one colour, every 6 in a row cover the shapes × backgrounds.
        let mut concept: Vec<String> = (6..12)
            .map(|i| Scene::balanced(&mut rng, i, &[CONCEPT], &BACKGROUNDS, ANYWHERE).caption())
            .collect();
        concept.sort();
        concept.dedup();
        assert_eq!(concept.len(), 6, "{concept:?}");
    }

    #[test]
    fn only_the_concept_colour_scores_as_magenta() {
        let mut rng = Rng::new(8);
        for _ in 0..20 {
            let known = Scene::random(&mut rng, &COLOURS, &BACKGROUNDS, ANYWHERE);
            assert_eq!(magenta_score(&known.render(32)), 0.0, "{known:?}");
            let concept = Scene::random(&mut rng, &[CONCEPT], &BACKGROUNDS, ANYWHERE);
            assert!(magenta_score(&concept.render(32)) > 0.05, "{concept:?}");
        }
    }

    #[test]
    fn captions_name_the_scene() {
        let scene = Scene {
            shape: ShapeKind::Triangle,
            colour: CONCEPT,
            background: BACKGROUNDS[0],
            cx: 0.5,
            cy: 0.5,
            size: 0.3,
        };
        assert_eq!(scene.caption(), "a sks triangle on a white background");
        assert_eq!(all_captions().len(), 24);
    }
}
