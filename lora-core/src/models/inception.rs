//! The feature network of FID, IS and KID: Inception-v3 as pytorch-fid's `fid_inception_v3`
//! builds it (the TensorFlow 2015-12-05 graph ported to torchvision's layer names), inference only.
//!
//! It differs from torchvision's Inception-v3 in the blocks pytorch-fid patches: the average
//! pools of `Mixed_5b`–`Mixed_5d` (A), `Mixed_6b`–`Mixed_6e` (C) and `Mixed_7b` (E) leave the zero
//! padding out of their averages (`count_include_pad=False`, as TensorFlow pools), `Mixed_7c`'s
//! pool branch max-pools instead, and the classifier has 1008 outputs. Every convolution is followed by
//! a batch norm (ε = 1e-3, running statistics) and a ReLU; the batch norm is folded into the
//! convolution at load time, so each layer is one engine convolution with its ReLU fused
//! (`Conv2dLayer::forward_relu`). `fc.bias` is not read: no output uses it.
//!
//! The input is `[N, 3, 299, 299]` in [−1, 1], already resized by the caller: resizing is part of
//! each metric's definition, not of the network. Outputs are the 2048 pooled features after
//! `Mixed_7c` (pytorch-fid's FID features) and `logits_unbiased` = pool · fc.weightᵀ without the
//! bias (torch-fidelity's input to the Inception Score).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use sha2::{Digest, Sha256};

use crate::engine::pool::{avg_pool_3x3_inside, max_pool_3x3};
use crate::engine::Conv2dLayer;
use crate::io::weights;

/// The side of the square input the network is defined on.
pub const INPUT_SIZE: usize = 299;
/// Width of the pooled features.
pub const FEATURES: usize = 2048;
/// Outputs of the classifier (1000 ImageNet classes plus TensorFlow's 8 unused ones).
pub const CLASSES: usize = 1008;
/// torchvision's `BasicConv2d` batch norm epsilon.
const BN_EPS: f64 = 1e-3;

/// What [`FidInception::forward`] returns for a batch of `N` images.
#[derive(Debug, Clone)]
pub struct InceptionFeatures {
    /// `[N, 2048]`: the average-pooled output of `Mixed_7c`.
    pub pool: Tensor,
    /// `[N, 1008]`: `pool · fc.weightᵀ`, without the classifier's bias.
    pub logits_unbiased: Tensor,
}

/// torchvision's `BasicConv2d` (convolution without bias, batch norm, ReLU) with the batch norm
/// folded into the convolution: `w' = w·γ/√(var+ε)`, `b' = β − mean·γ/√(var+ε)`.
struct ConvBn {
    conv: Conv2dLayer,
}

impl ConvBn {
    fn load(
        vb: &VarBuilder,
        (in_ch, out_ch): (usize, usize),
        (kh, kw): (usize, usize),
        stride: usize,
        padding: (usize, usize),
    ) -> Result<Self> {
        let weight = vb.get((out_ch, in_ch, kh, kw), "conv.weight")?;
        let bn = |name: &str| vb.get(out_ch, &format!("bn.{name}"));
        let (gamma, beta) = (bn("weight")?, bn("bias")?);
        let (mean, var) = (bn("running_mean")?, bn("running_var")?);
        let scale = (gamma / (var + BN_EPS)?.sqrt()?)?;
        let bias = (beta - (mean * &scale)?)?;
        let weight = weight.broadcast_mul(&scale.reshape((out_ch, 1, 1, 1))?)?;
        Ok(Self {
            conv: Conv2dLayer::new(weight, bias, stride, padding)?,
        })
    }

    /// A square `k`×`k` layer with padding `padding` on both axes.
    fn square(
        vb: &VarBuilder,
        channels: (usize, usize),
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Self::load(vb, channels, (k, k), stride, (padding, padding))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.conv.forward_relu(x)?)
    }

    /// This 1×1 layer applied to [`avg_pool_3x3_inside`]`(x)`, computed as the pool of the
    /// convolution (ReLU after): both are linear in `x` and the pool's weights at a position sum
    /// to 1, so the folded bias passes through unchanged. Pooling the layer's 32–192 output
    /// channels instead of its 192–1280 input channels is 4–7× less pooling.
    fn forward_after_avg_pool(&self, x: &Tensor) -> Result<Tensor> {
        Ok(avg_pool_3x3_inside(&self.conv.forward(x)?)?.relu()?)
    }
}

/// A chain of layers applied one after the other.
fn chain(layers: &[ConvBn], x: &Tensor) -> Result<Tensor> {
    layers
        .iter()
        .try_fold(x.clone(), |h, layer| layer.forward(&h))
}

/// `Mixed_5b`–`Mixed_5d`: pytorch-fid's `FIDInceptionA`.
struct InceptionA {
    branch1x1: ConvBn,
    branch5x5: [ConvBn; 2],
    branch3x3dbl: [ConvBn; 3],
    branch_pool: ConvBn,
}

impl InceptionA {
    fn load(vb: &VarBuilder, in_ch: usize, pool_features: usize) -> Result<Self> {
        Ok(Self {
            branch1x1: ConvBn::square(&vb.pp("branch1x1"), (in_ch, 64), 1, 1, 0)?,
            branch5x5: [
                ConvBn::square(&vb.pp("branch5x5_1"), (in_ch, 48), 1, 1, 0)?,
                ConvBn::square(&vb.pp("branch5x5_2"), (48, 64), 5, 1, 2)?,
            ],
            branch3x3dbl: [
                ConvBn::square(&vb.pp("branch3x3dbl_1"), (in_ch, 64), 1, 1, 0)?,
                ConvBn::square(&vb.pp("branch3x3dbl_2"), (64, 96), 3, 1, 1)?,
                ConvBn::square(&vb.pp("branch3x3dbl_3"), (96, 96), 3, 1, 1)?,
            ],
            branch_pool: ConvBn::square(&vb.pp("branch_pool"), (in_ch, pool_features), 1, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let branches = [
            self.branch1x1.forward(x)?,
            chain(&self.branch5x5, x)?,
            chain(&self.branch3x3dbl, x)?,
            self.branch_pool.forward_after_avg_pool(x)?,
        ];
        Ok(Tensor::cat(&branches, 1)?)
    }
}

/// `Mixed_6a`: torchvision's `InceptionB`, the 35×35 → 17×17 reduction.
struct InceptionB {
    branch3x3: ConvBn,
    branch3x3dbl: [ConvBn; 3],
}

impl InceptionB {
    fn load(vb: &VarBuilder, in_ch: usize) -> Result<Self> {
        Ok(Self {
            branch3x3: ConvBn::square(&vb.pp("branch3x3"), (in_ch, 384), 3, 2, 0)?,
            branch3x3dbl: [
                ConvBn::square(&vb.pp("branch3x3dbl_1"), (in_ch, 64), 1, 1, 0)?,
                ConvBn::square(&vb.pp("branch3x3dbl_2"), (64, 96), 3, 1, 1)?,
                ConvBn::square(&vb.pp("branch3x3dbl_3"), (96, 96), 3, 2, 0)?,
            ],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let branches = [
            self.branch3x3.forward(x)?,
            chain(&self.branch3x3dbl, x)?,
            max_pool_3x3(x, 2, 0)?,
        ];
        Ok(Tensor::cat(&branches, 1)?)
    }
}

/// `Mixed_6b`–`Mixed_6e`: pytorch-fid's `FIDInceptionC`, with factorized 7×7 convolutions.
struct InceptionC {
    branch1x1: ConvBn,
    branch7x7: [ConvBn; 3],
    branch7x7dbl: [ConvBn; 5],
    branch_pool: ConvBn,
}

impl InceptionC {
    fn load(vb: &VarBuilder, in_ch: usize, c7: usize) -> Result<Self> {
        let (row, col) = (((1, 7), (0, 3)), ((7, 1), (3, 0)));
        let conv = |name: &str, channels, (kernel, padding)| {
            ConvBn::load(&vb.pp(name), channels, kernel, 1, padding)
        };
        Ok(Self {
            branch1x1: ConvBn::square(&vb.pp("branch1x1"), (in_ch, 192), 1, 1, 0)?,
            branch7x7: [
                ConvBn::square(&vb.pp("branch7x7_1"), (in_ch, c7), 1, 1, 0)?,
                conv("branch7x7_2", (c7, c7), row)?,
                conv("branch7x7_3", (c7, 192), col)?,
            ],
            branch7x7dbl: [
                ConvBn::square(&vb.pp("branch7x7dbl_1"), (in_ch, c7), 1, 1, 0)?,
                conv("branch7x7dbl_2", (c7, c7), col)?,
                conv("branch7x7dbl_3", (c7, c7), row)?,
                conv("branch7x7dbl_4", (c7, c7), col)?,
                conv("branch7x7dbl_5", (c7, 192), row)?,
            ],
            branch_pool: ConvBn::square(&vb.pp("branch_pool"), (in_ch, 192), 1, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let branches = [
            self.branch1x1.forward(x)?,
            chain(&self.branch7x7, x)?,
            chain(&self.branch7x7dbl, x)?,
            self.branch_pool.forward_after_avg_pool(x)?,
        ];
        Ok(Tensor::cat(&branches, 1)?)
    }
}

/// `Mixed_7a`: torchvision's `InceptionD`, the 17×17 → 8×8 reduction.
struct InceptionD {
    branch3x3: [ConvBn; 2],
    branch7x7x3: [ConvBn; 4],
}

impl InceptionD {
    fn load(vb: &VarBuilder, in_ch: usize) -> Result<Self> {
        Ok(Self {
            branch3x3: [
                ConvBn::square(&vb.pp("branch3x3_1"), (in_ch, 192), 1, 1, 0)?,
                ConvBn::square(&vb.pp("branch3x3_2"), (192, 320), 3, 2, 0)?,
            ],
            branch7x7x3: [
                ConvBn::square(&vb.pp("branch7x7x3_1"), (in_ch, 192), 1, 1, 0)?,
                ConvBn::load(&vb.pp("branch7x7x3_2"), (192, 192), (1, 7), 1, (0, 3))?,
                ConvBn::load(&vb.pp("branch7x7x3_3"), (192, 192), (7, 1), 1, (3, 0))?,
                ConvBn::square(&vb.pp("branch7x7x3_4"), (192, 192), 3, 2, 0)?,
            ],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let branches = [
            chain(&self.branch3x3, x)?,
            chain(&self.branch7x7x3, x)?,
            max_pool_3x3(x, 2, 0)?,
        ];
        Ok(Tensor::cat(&branches, 1)?)
    }
}

/// Which pool `InceptionE`'s pool branch takes: `Mixed_7b` (pytorch-fid's `FIDInceptionE_1`)
/// averages without the padding, `Mixed_7c` (`FIDInceptionE_2`) max-pools, as the TensorFlow
/// graph does.
#[derive(Debug, Clone, Copy)]
enum PoolKind {
    Average,
    Max,
}

/// `Mixed_7b`, `Mixed_7c`: torchvision's `InceptionE` with pytorch-fid's pools; its 3×3
/// branches split into parallel 1×3 and 3×1 convolutions.
struct InceptionE {
    branch1x1: ConvBn,
    branch3x3_1: ConvBn,
    branch3x3_2: [ConvBn; 2],
    branch3x3dbl: [ConvBn; 2],
    branch3x3dbl_3: [ConvBn; 2],
    branch_pool: ConvBn,
    pool: PoolKind,
}

impl InceptionE {
    fn load(vb: &VarBuilder, in_ch: usize, pool: PoolKind) -> Result<Self> {
        let split = |prefix: &str| -> Result<[ConvBn; 2]> {
            Ok([
                ConvBn::load(&vb.pp(format!("{prefix}a")), (384, 384), (1, 3), 1, (0, 1))?,
                ConvBn::load(&vb.pp(format!("{prefix}b")), (384, 384), (3, 1), 1, (1, 0))?,
            ])
        };
        Ok(Self {
            branch1x1: ConvBn::square(&vb.pp("branch1x1"), (in_ch, 320), 1, 1, 0)?,
            branch3x3_1: ConvBn::square(&vb.pp("branch3x3_1"), (in_ch, 384), 1, 1, 0)?,
            branch3x3_2: split("branch3x3_2")?,
            branch3x3dbl: [
                ConvBn::square(&vb.pp("branch3x3dbl_1"), (in_ch, 448), 1, 1, 0)?,
                ConvBn::square(&vb.pp("branch3x3dbl_2"), (448, 384), 3, 1, 1)?,
            ],
            branch3x3dbl_3: split("branch3x3dbl_3")?,
            branch_pool: ConvBn::square(&vb.pp("branch_pool"), (in_ch, 192), 1, 1, 0)?,
            pool,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let both = |layers: &[ConvBn; 2], h: &Tensor| -> Result<[Tensor; 2]> {
            Ok([layers[0].forward(h)?, layers[1].forward(h)?])
        };
        let b3 = self.branch3x3_1.forward(x)?;
        let [b3a, b3b] = both(&self.branch3x3_2, &b3)?;
        let dbl = chain(&self.branch3x3dbl, x)?;
        let [dbl_a, dbl_b] = both(&self.branch3x3dbl_3, &dbl)?;
        let pooled = match self.pool {
            PoolKind::Average => self.branch_pool.forward_after_avg_pool(x)?,
            PoolKind::Max => self.branch_pool.forward(&max_pool_3x3(x, 1, 1)?)?,
        };
        let branches = [self.branch1x1.forward(x)?, b3a, b3b, dbl_a, dbl_b, pooled];
        Ok(Tensor::cat(&branches, 1)?)
    }
}

/// pytorch-fid's FID Inception-v3 up to the pooled features, plus the classifier's weight for
/// the unbiased logits.
pub struct FidInception {
    stem: [ConvBn; 5],
    mixed_5: [InceptionA; 3],
    mixed_6a: InceptionB,
    mixed_6: [InceptionC; 4],
    mixed_7a: InceptionD,
    mixed_7: [InceptionE; 2],
    /// `fc.weight` transposed, `[2048, 1008]`.
    fc_t: Tensor,
    sha256: Option<String>,
}

impl FidInception {
    /// Loads a `.safetensors` file holding the `pt_inception-2015-12-05` state dict under its
    /// torchvision names (`scripts/convert_fid_inception.py` converts pytorch-fid's `.pth`), f32
    /// or f16, computing in f32 on `device`. Also hashes the file: see
    /// [`weights_sha256`](Self::weights_sha256).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let sha256 = file_sha256(path)?;
        let vb = weights::var_builder(&[path.to_path_buf()], DType::F32, device, BTreeMap::new())?;
        // Tensor errors name the file already (the builder's backend adds it).
        let model = Self::new(vb).context(
            "loading FID Inception-v3 weights (pytorch-fid's pt_inception-2015-12-05 state dict \
             under torchvision's names)",
        )?;
        Ok(Self {
            sha256: Some(sha256),
            ..model
        })
    }

    /// Builds the network from weights under pytorch-fid's names; they are read in f32 whatever
    /// the builder's dtype.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let vb = vb.to_dtype(DType::F32);
        let conv = |name: &str, channels, k, stride, padding| {
            ConvBn::square(&vb.pp(name), channels, k, stride, padding)
        };
        let a = |name: &str, in_ch, pool| InceptionA::load(&vb.pp(name), in_ch, pool);
        let c = |name: &str, c7| InceptionC::load(&vb.pp(name), 768, c7);
        Ok(Self {
            stem: [
                conv("Conv2d_1a_3x3", (3, 32), 3, 2, 0)?,
                conv("Conv2d_2a_3x3", (32, 32), 3, 1, 0)?,
                conv("Conv2d_2b_3x3", (32, 64), 3, 1, 1)?,
                conv("Conv2d_3b_1x1", (64, 80), 1, 1, 0)?,
                conv("Conv2d_4a_3x3", (80, 192), 3, 1, 0)?,
            ],
            mixed_5: [
                a("Mixed_5b", 192, 32)?,
                a("Mixed_5c", 256, 64)?,
                a("Mixed_5d", 288, 64)?,
            ],
            mixed_6a: InceptionB::load(&vb.pp("Mixed_6a"), 288)?,
            mixed_6: [
                c("Mixed_6b", 128)?,
                c("Mixed_6c", 160)?,
                c("Mixed_6d", 160)?,
                c("Mixed_6e", 192)?,
            ],
            mixed_7a: InceptionD::load(&vb.pp("Mixed_7a"), 768)?,
            mixed_7: [
                InceptionE::load(&vb.pp("Mixed_7b"), 1280, PoolKind::Average)?,
                InceptionE::load(&vb.pp("Mixed_7c"), 2048, PoolKind::Max)?,
            ],
            fc_t: vb
                .get((CLASSES, FEATURES), "fc.weight")?
                .t()?
                .contiguous()?,
            sha256: None,
        })
    }

    /// The sha256 (hex) of the file [`load`](Self::load) read, so a report can say which
    /// weights its features came from; `None` for a network built by [`new`](Self::new).
    pub fn weights_sha256(&self) -> Option<&str> {
        self.sha256.as_deref()
    }

    /// The pooled features and unbiased logits of `x` `[N, 3, 299, 299]`, values in [−1, 1].
    pub fn forward(&self, x: &Tensor) -> Result<InceptionFeatures> {
        let (_, c, h, w) = x.dims4().context("FID Inception input")?;
        ensure!(
            (c, h, w) == (3, INPUT_SIZE, INPUT_SIZE),
            "FID Inception input has shape {:?}, expected [N, 3, {INPUT_SIZE}, {INPUT_SIZE}] \
             (resize the images first)",
            x.dims()
        );
        let x = x.to_dtype(DType::F32)?;
        let [c1a, c2a, c2b, c3b, c4a] = &self.stem;
        let x = c2b.forward(&c2a.forward(&c1a.forward(&x)?)?)?;
        let x = max_pool_3x3(&x, 2, 0)?;
        let x = c4a.forward(&c3b.forward(&x)?)?;
        let mut x = max_pool_3x3(&x, 2, 0)?;
        for block in &self.mixed_5 {
            x = block.forward(&x)?;
        }
        x = self.mixed_6a.forward(&x)?;
        for block in &self.mixed_6 {
            x = block.forward(&x)?;
        }
        x = self.mixed_7a.forward(&x)?;
        for block in &self.mixed_7 {
            x = block.forward(&x)?;
        }
        let pool = x.mean((2, 3))?;
        let logits_unbiased = pool.matmul(&self.fc_t)?;
        Ok(InceptionFeatures {
            pool,
            logits_unbiased,
        })
    }
}

/// The sha256 of a file, as lowercase hex.
fn file_sha256(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path)
        .with_context(|| format!("cannot open weights file {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!("{:x}", hasher.finalize()))
}
