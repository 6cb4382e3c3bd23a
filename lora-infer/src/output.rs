//! Files lora-infer reads and writes: PNGs with generation metadata in text chunks, contact
//! sheets, and latents as safetensors (`latents`, `image`), all written atomically.

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use lora_core::io::{read_safetensors, write_atomic, write_safetensors_atomic};

/// Key of the initial / final latents in a latents file (as `--latents` and `--save-latents`).
pub const LATENTS_KEY: &str = "latents";
/// Key of the decoded images (before clamping) in a `--save-latents` file.
pub const IMAGE_KEY: &str = "image";

/// An 8-bit image, row-major, `channels` interleaved (1 = gray, 3 = RGB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image8 {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub pixels: Vec<u8>,
}

/// `[N, C, H, W]` images in [-1, 1] to 8-bit images, as diffusers' postprocessing does:
/// `round(clamp(x/2 + 0.5, 0, 1) · 255)`. Pixel-space models with 4 channels generate RGBA:
/// the picture is the colour, so the fourth channel is dropped.
pub fn to_images8(images: &Tensor) -> Result<Vec<Image8>> {
    let (_, channels, _, _) = images.dims4().context("images: expected [N, C, H, W]")?;
    let images = match channels {
        4 => &images.narrow(1, 0, 3)?,
        _ => images,
    };
    let (n, channels, height, width) = images.dims4()?;
    ensure!(
        channels == 1 || channels == 3,
        "images have {channels} channels; PNG output needs 1 (gray), 3 (RGB) or 4 (RGBA, \
         written as RGB)"
    );
    let scaled = ((images.to_dtype(DType::F32)? * 0.5)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))?
        .to_device(&Device::Cpu)?;
    (0..n)
        .map(|i| {
            let values = scaled.get(i)?.flatten_all()?.to_vec1::<f32>()?;
            Ok(Image8 {
                width,
                height,
                channels,
                pixels: values.iter().map(|v| (v * 255.0).round() as u8).collect(),
            })
        })
        .collect()
}

/// Writes `image` as a PNG with `text` as text chunks (tEXt when Latin-1-safe ASCII, iTXt
/// otherwise), atomically.
pub fn write_png(path: &Path, image: &Image8, text: &BTreeMap<String, String>) -> Result<()> {
    write_atomic(path, |temp| {
        let file = std::fs::File::create(temp)
            .with_context(|| format!("cannot create {}", temp.display()))?;
        let mut encoder = png::Encoder::new(
            BufWriter::new(file),
            u32::try_from(image.width)?,
            u32::try_from(image.height)?,
        );
        encoder.set_color(match image.channels {
            1 => png::ColorType::Grayscale,
            3 => png::ColorType::Rgb,
            c => bail!("cannot write a {c}-channel PNG"),
        });
        encoder.set_depth(png::BitDepth::Eight);
        for (key, value) in text {
            if value.is_ascii() {
                encoder.add_text_chunk(key.clone(), value.clone())?;
            } else {
                encoder.add_itxt_chunk(key.clone(), value.clone())?;
            }
        }
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&image.pixels)?;
        writer.finish()?;
        Ok(())
    })
}

/// Reads a PNG's pixels (8-bit gray or RGB) and its text chunks (tEXt, zTXt, iTXt).
pub fn read_png(path: &Path) -> Result<(Image8, BTreeMap<String, String>)> {
    let read = || -> Result<(Image8, BTreeMap<String, String>)> {
        let file = std::io::BufReader::new(std::fs::File::open(path)?);
        let mut reader = png::Decoder::new(file).read_info()?;
        let mut pixels = vec![0; reader.output_buffer_size().context("image too large")?];
        let frame = reader.next_frame(&mut pixels)?;
        pixels.truncate(frame.buffer_size());
        let channels = match (frame.color_type, frame.bit_depth) {
            (png::ColorType::Grayscale, png::BitDepth::Eight) => 1,
            (png::ColorType::Rgb, png::BitDepth::Eight) => 3,
            other => bail!("unsupported PNG format {other:?}"),
        };
        let info = reader.info();
        let mut text = BTreeMap::new();
        for chunk in &info.uncompressed_latin1_text {
            text.insert(chunk.keyword.clone(), chunk.text.clone());
        }
        for chunk in &info.compressed_latin1_text {
            text.insert(chunk.keyword.clone(), chunk.get_text()?);
        }
        for chunk in &info.utf8_text {
            text.insert(chunk.keyword.clone(), chunk.get_text()?);
        }
        let image = Image8 {
            width: frame.width as usize,
            height: frame.height as usize,
            channels,
            pixels,
        };
        Ok((image, text))
    };
    read().with_context(|| format!("cannot read PNG {}", path.display()))
}

/// Tiles equally sized images into a near-square grid, row by row (blank cells stay black).
pub fn contact_sheet(images: &[Image8]) -> Result<Image8> {
    let first = images.first().context("no images for a contact sheet")?;
    ensure!(
        images
            .iter()
            .all(|i| (i.width, i.height, i.channels) == (first.width, first.height, first.channels)),
        "contact sheet images differ in size"
    );
    let cols = (images.len() as f64).sqrt().ceil() as usize;
    let rows = images.len().div_ceil(cols);
    let (w, h, c) = (first.width, first.height, first.channels);
    let mut pixels = vec![0u8; cols * w * rows * h * c];
    for (i, image) in images.iter().enumerate() {
        let (col, row) = (i % cols, i / cols);
        for y in 0..h {
            let src = &image.pixels[y * w * c..(y + 1) * w * c];
            let start = ((row * h + y) * cols * w + col * w) * c;
            pixels[start..start + w * c].copy_from_slice(src);
        }
    }
    Ok(Image8 {
        width: cols * w,
        height: rows * h,
        channels: c,
        pixels,
    })
}

/// The PNG paths for `count` images: `output` itself for one image, `stem-0.png`, `stem-1.png`…
/// for several; inside `output` as `image-0.png`… when it is a directory (existing, or written
/// with a trailing `/`). The second value is the contact sheet's path.
pub fn image_paths(output: &Path, count: usize) -> Result<(Vec<PathBuf>, PathBuf)> {
    let is_dir = output.is_dir() || output.as_os_str().to_string_lossy().ends_with('/');
    if is_dir {
        let paths = (0..count)
            .map(|i| output.join(format!("image-{i}.png")))
            .collect();
        return Ok((paths, output.join("grid.png")));
    }
    let extension = output.extension().and_then(|e| e.to_str());
    ensure!(
        extension.is_some_and(|e| e.eq_ignore_ascii_case("png")),
        "--output {}: expected a .png path or a directory",
        output.display()
    );
    let stem = output
        .file_stem()
        .and_then(|s| s.to_str())
        .context("--output has no file name")?;
    let sibling = |suffix: &str| output.with_file_name(format!("{stem}-{suffix}.png"));
    let paths = if count == 1 {
        vec![output.to_path_buf()]
    } else {
        (0..count).map(|i| sibling(&i.to_string())).collect()
    };
    Ok((paths, sibling("grid")))
}

/// Reads an image file (PNG, JPEG, WebP) as a `[1, 3, H, W]` f32 tensor in [-1, 1], the range
/// the VAE encodes (diffusers' `2·x/255 − 1`).
pub fn read_image(path: &Path, device: &Device) -> Result<Tensor> {
    let rgb = image::open(path)
        .with_context(|| format!("cannot read image {}", path.display()))?
        .to_rgb8();
    let (width, height) = (rgb.width() as usize, rgb.height() as usize);
    let values: Vec<f32> = rgb
        .into_raw()
        .iter()
        .map(|&v| f32::from(v) / 127.5 - 1.0)
        .collect();
    Ok(Tensor::from_vec(values, (1, height, width, 3), device)?
        .permute((0, 3, 1, 2))?
        .contiguous()?)
}

/// Reads `--latents`: the `latents` tensor of a safetensors file, as f32 on `device`.
pub fn read_latents(path: &Path, device: &Device) -> Result<Tensor> {
    let mut contents = read_safetensors(path, device)?;
    let latents = contents.tensors.remove(LATENTS_KEY).with_context(|| {
        format!(
            "{} has no `{LATENTS_KEY}` tensor (found: {:?})",
            path.display(),
            contents.tensors.keys().collect::<Vec<_>>()
        )
    })?;
    ensure!(
        latents.rank() == 4,
        "{}: `{LATENTS_KEY}` has shape {:?}; expected [N, C, h, w]",
        path.display(),
        latents.dims()
    );
    Ok(latents.to_dtype(DType::F32)?)
}

/// Writes `--save-latents`: final latents and decoded images (f32), with string metadata.
pub fn write_latents(
    path: &Path,
    latents: &Tensor,
    images: &Tensor,
    metadata: BTreeMap<String, String>,
) -> Result<()> {
    let on_cpu = |t: &Tensor| -> Result<Tensor> {
        Ok(t.to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .contiguous()?)
    };
    let tensors = [
        (LATENTS_KEY.to_owned(), on_cpu(latents)?),
        (IMAGE_KEY.to_owned(), on_cpu(images)?),
    ];
    write_safetensors_atomic(path, &tensors, metadata)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_outputs() {
        let (one, grid) = image_paths(Path::new("out/cat.png"), 1).unwrap();
        assert_eq!(one, [PathBuf::from("out/cat.png")]);
        assert_eq!(grid, PathBuf::from("out/cat-grid.png"));
        let (two, _) = image_paths(Path::new("cat.png"), 2).unwrap();
        assert_eq!(
            two,
            [PathBuf::from("cat-0.png"), PathBuf::from("cat-1.png")]
        );
        let (dir, grid) = image_paths(Path::new("samples/"), 2).unwrap();
        assert_eq!(dir[1], PathBuf::from("samples/image-1.png"));
        assert_eq!(grid, PathBuf::from("samples/grid.png"));
        let err = image_paths(Path::new("cat.jpg"), 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected a .png path"), "{err}");
    }

    #[test]
    fn tiles_a_contact_sheet() {
        let image = |v: u8| Image8 {
            width: 2,
            height: 1,
            channels: 1,
            pixels: vec![v, v],
        };
        let sheet = contact_sheet(&[image(1), image(2), image(3)]).unwrap();
        assert_eq!((sheet.width, sheet.height), (4, 2));
        assert_eq!(sheet.pixels, [1, 1, 2, 2, 3, 3, 0, 0]);
    }

    #[test]
    fn converts_like_diffusers_postprocessing() {
        let t = Tensor::new(&[-1.5f32, -1.0, 0.0, 0.5, 1.0, 2.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 6))
            .unwrap();
        let images = to_images8(&t).unwrap();
        assert_eq!(images[0].pixels, [0, 0, 128, 191, 255, 255]);
    }

    #[test]
    fn four_channels_are_written_as_their_colour() {
        // One pixel: r = -1, g = 0, b = 1, alpha 0.5.
        let t = Tensor::new(&[-1.0f32, 0.0, 1.0, 0.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 4, 1, 1))
            .unwrap();
        let images = to_images8(&t).unwrap();
        assert_eq!(
            (images[0].channels, images[0].pixels.clone()),
            (3, vec![0, 128, 255])
        );
        let two = Tensor::zeros((1, 2, 1, 1), DType::F32, &Device::Cpu).unwrap();
        let err = to_images8(&two).unwrap_err().to_string();
        assert!(err.contains("2 channels"), "{err}");
    }
}
