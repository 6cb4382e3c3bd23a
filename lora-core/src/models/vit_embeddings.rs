//! The input of a vision transformer (CLIP's and BLIP's towers): the image cut into patches,
//! each projected by the patch "convolution" (stride = kernel, so a matrix on flattened
//! patches), a class token in front, and a learned position embedding added.

use anyhow::{ensure, Context, Result};
use candle_core::Tensor;

/// The positions a ViT sees: the class token and one per patch of the `image_size`² image.
pub fn positions(image_size: usize, patch_size: usize) -> usize {
    (image_size / patch_size).pow(2) + 1
}

pub struct VitEmbeddings {
    /// `[hidden, 3·patch·patch]`
    patch_weight: Tensor,
    /// `[hidden]` where the patch convolution has a bias (BLIP's; CLIP's has none).
    patch_bias: Option<Tensor>,
    /// `[1, 1, hidden]`
    class_embedding: Tensor,
    /// `[1, positions, hidden]`: the class token's, then the patches' in row-major order.
    position_embedding: Tensor,
    image_size: usize,
    patch_size: usize,
}

impl VitEmbeddings {
    /// From the checkpoint's tensors: the patch convolution's `[hidden, 3, patch, patch]` weight
    /// (and bias), the class embedding and the position embeddings (any shapes holding `hidden`
    /// and `positions × hidden` values).
    pub fn new(
        patch_conv_weight: Tensor,
        patch_bias: Option<Tensor>,
        class_embedding: Tensor,
        position_embedding: Tensor,
        image_size: usize,
    ) -> Result<Self> {
        let (hidden, channels, patch, _) = patch_conv_weight
            .dims4()
            .context("patch embedding weight: expected [hidden, 3, patch, patch]")?;
        ensure!(
            channels == 3 && patch > 0 && image_size.is_multiple_of(patch),
            "patch embedding {hidden}×{channels}×{patch}×{patch} does not cut a 3×{image_size}² image"
        );
        let positions = positions(image_size, patch);
        Ok(Self {
            patch_weight: patch_conv_weight.reshape((hidden, 3 * patch * patch))?,
            patch_bias,
            class_embedding: class_embedding.reshape((1, 1, hidden))?,
            position_embedding: position_embedding.reshape((1, positions, hidden))?,
            image_size,
            patch_size: patch,
        })
    }

    /// `[batch, 3, image_size, image_size]` normalised pixels → `[batch, positions, hidden]`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = pixel_values
            .dims4()
            .context("pixel values: expected [batch, 3, height, width]")?;
        let size = self.image_size;
        ensure!(
            (channels, height, width) == (3, size, size),
            "pixel values are {channels}×{height}×{width}; the model takes 3×{size}×{size}"
        );
        let patch = self.patch_size;
        let grid = size / patch;
        let patches = pixel_values
            .to_dtype(self.patch_weight.dtype())?
            .reshape(vec![batch, 3, grid, patch, grid, patch])?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((batch, grid * grid, 3 * patch * patch))?
            .broadcast_matmul(&self.patch_weight.t()?)?;
        let patches = match &self.patch_bias {
            Some(bias) => patches.broadcast_add(bias)?,
            None => patches,
        };
        let hidden = self.patch_weight.dim(0)?;
        let class = self.class_embedding.broadcast_as((batch, 1, hidden))?;
        Ok(Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)?)
    }
}
