//! Our CUDA kernels (`kernels/lora_kernels.cu`, compiled to PTX by `build.rs`), each one op in
//! place of several of candle's generic kernels that run far below memory bandwidth: strided
//! copies, softmax, broadcast binary ops and the f32 elementwise passes of the normalisations'
//! backward (benches/RESULTS.md has the kernel traces). The engine's layers and blocked attention
//! use these where [`applies`]
//! and candle's ops otherwise; every kernel is checked against those ops in this module's tests,
//! which run on a GPU (`cargo test --features cuda`).
//!
//! `LORA_CUDA_KERNELS=0` in the environment turns them off (candle's ops everywhere), for
//! measuring what they change.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{kernel_name, Map1, Map2, Map3, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result,
    Shape, Tensor, WithDType,
};

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// The name our PTX module is loaded under in candle's per-device module cache.
const MODULE: &str = "lora-toolkit-kernels";

/// Whether our kernels serve these tensors: all on a CUDA device, in f32, f16 or bf16, and not
/// turned off by `LORA_CUDA_KERNELS=0`.
pub(crate) fn applies(tensors: &[&Tensor]) -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    let enabled = *ENABLED.get_or_init(|| std::env::var("LORA_CUDA_KERNELS").as_deref() != Ok("0"));
    enabled
        && tensors.iter().all(|t| {
            t.device().is_cuda() && matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16)
        })
}

fn u32_of(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{what} {n} exceeds u32")))
}

/// Up to 65 535 blocks along one grid axis; the kernels loop over what a grid does not cover.
fn grid(n: usize, per_block: usize) -> u32 {
    n.div_ceil(per_block).clamp(1, 65_535) as u32
}

/// `(rows, cols)` of `t` viewed as a matrix over its last axis.
fn rows_and_cols(t: &Tensor) -> Result<(usize, usize)> {
    let cols = t.dim(candle_core::D::Minus1)?;
    Ok((t.elem_count() / cols.max(1), cols))
}

/// Whether rows of `cols` elements of these tensors can be read in 16-byte packs (whole packs
/// per row, each tensor starting on a pack), as the `_packed` kernels do.
fn packed(cols: usize, tensors: &[&Tensor]) -> bool {
    let pack = 16 / tensors[0].dtype().size_in_bytes();
    cols.is_multiple_of(pack)
        && tensors
            .iter()
            .all(|t| t.layout().start_offset().is_multiple_of(pack))
}

fn cuda_storage(
    dev: &CudaDevice,
    slice: candle_core::cuda_backend::S,
    shape: Shape,
) -> (CudaStorage, Shape) {
    (
        CudaStorage {
            slice,
            device: dev.clone(),
        },
        shape,
    )
}

fn not_on_cpu<T>() -> Result<T> {
    Err(candle_core::Error::Msg(
        "lora-toolkit CUDA kernel called on the CPU".into(),
    ))
}

/// A scalar kernel argument, after the pointers.
#[derive(Clone, Copy)]
enum Arg {
    U32(u32),
    I32(i32),
    F32(f32),
}

/// One launch of a float kernel `NAME_{f32,f16,bf16}(inputs…, output, scalars…)` on contiguous
/// inputs of one dtype, writing a fresh output of `shape` in that dtype.
struct FloatKernel {
    name: &'static str,
    shape: Shape,
    grid: (u32, u32, u32),
    block: u32,
    scalars: Vec<Arg>,
}

impl FloatKernel {
    /// A kernel with one warp per row of `rows` (four rows per block of 128 threads) and the
    /// scalars `rows, cols`.
    fn warp_per_row(name: &'static str, shape: Shape, rows: usize, cols: usize) -> Result<Self> {
        Ok(Self {
            name,
            shape,
            grid: (grid(rows, 4), 1, 1),
            block: 128,
            scalars: vec![
                Arg::U32(u32_of(rows, "rows")?),
                Arg::U32(u32_of(cols, "columns")?),
            ],
        })
    }

    fn launch<T: DeviceRepr + WithDType>(
        &self,
        dev: &CudaDevice,
        inputs: &[CudaView<'_, T>],
    ) -> Result<CudaSlice<T>> {
        let func =
            dev.get_or_load_custom_func(&kernel_name::<T>(self.name), MODULE, ptx::LORA_KERNELS)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(self.shape.elem_count())? };
        let mut builder = func.builder();
        for input in inputs {
            builder.arg(input);
        }
        builder.arg(&out);
        for scalar in &self.scalars {
            match scalar {
                Arg::U32(v) => builder.arg(v),
                Arg::I32(v) => builder.arg(v),
                Arg::F32(v) => builder.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: self.grid,
            block_dim: (self.block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel's parameters are the pointers and scalars pushed above, in order.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(out)
    }

    fn storage(
        &self,
        dev: &CudaDevice,
        slice: candle_core::cuda_backend::S,
    ) -> (CudaStorage, Shape) {
        cuda_storage(dev, slice, self.shape.clone())
    }
}

fn contiguous_view<'a, T>(slice: &'a CudaSlice<T>, layout: &Layout) -> Result<CudaView<'a, T>> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("lora-toolkit CUDA kernel: input must be contiguous".into())
    })?;
    Ok(slice.slice(start..end))
}

impl Map1 for FloatKernel {
    fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
        &self,
        src: &CudaSlice<T>,
        dev: &CudaDevice,
        layout: &Layout,
    ) -> Result<CudaSlice<T>> {
        self.launch(dev, &[contiguous_view(src, layout)?])
    }
}

impl Map2 for FloatKernel {
    fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
        &self,
        a: &CudaSlice<T>,
        la: &Layout,
        b: &CudaSlice<T>,
        lb: &Layout,
        dev: &CudaDevice,
    ) -> Result<CudaSlice<T>> {
        self.launch(dev, &[contiguous_view(a, la)?, contiguous_view(b, lb)?])
    }
}

impl Map3 for FloatKernel {
    fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
        &self,
        a: &CudaSlice<T>,
        la: &Layout,
        b: &CudaSlice<T>,
        lb: &Layout,
        c: &CudaSlice<T>,
        lc: &Layout,
        dev: &CudaDevice,
    ) -> Result<CudaSlice<T>> {
        let views = [
            contiguous_view(a, la)?,
            contiguous_view(b, lb)?,
            contiguous_view(c, lc)?,
        ];
        self.launch(dev, &views)
    }
}

impl CustomOp1 for FloatKernel {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        not_on_cpu()
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = s.device();
        Ok(self.storage(dev, Map1::map(self, &s.slice, dev, l)?))
    }
}

impl CustomOp2 for FloatKernel {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        not_on_cpu()
    }

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = a.device();
        Ok(self.storage(dev, Map2::map(self, &a.slice, la, &b.slice, lb, dev)?))
    }
}

impl CustomOp3 for FloatKernel {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        not_on_cpu()
    }

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
        c: &CudaStorage,
        lc: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = a.device();
        let slice = Map3::map(self, &a.slice, la, &b.slice, lb, &c.slice, lc, dev)?;
        Ok(self.storage(dev, slice))
    }
}

/// Softmax over the last axis (values in f32), one warp per row.
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let x = contiguous(x)?;
    let (rows, cols) = rows_and_cols(&x)?;
    let name = match packed(cols, &[&x]) {
        true => "softmax_packed",
        false => "softmax",
    };
    x.apply_op1_no_bwd(&FloatKernel::warp_per_row(
        name,
        x.shape().clone(),
        rows,
        cols,
    )?)
}

/// `(P, dS)` for attention's backward: `P = softmax(S)` over the last axis and `dS = P ⊙ D`, from
/// the scores `S` and `D = dP − δ` of one shape, in one kernel after the row statistics.
pub(crate) fn softmax_times(s: &Tensor, d: &Tensor) -> Result<(Tensor, Tensor)> {
    let s = contiguous(s)?;
    let d = contiguous(&d.to_dtype(s.dtype())?)?;
    let (rows, cols) = rows_and_cols(&s)?;
    let name = match packed(cols, &[&s, &d]) {
        true => "softmax_times_packed",
        false => "softmax_times",
    };
    let mut dims = vec![2];
    dims.extend_from_slice(s.dims());
    let kernel = FloatKernel::warp_per_row(name, Shape::from_dims(&dims), rows, cols)?;
    let out = s.apply_op2_no_bwd(&d, &kernel)?;
    Ok((out.get(0)?, out.get(1)?))
}

/// `[g | −rowsum(g ⊙ o)]` over the last axis (`[…, d]` → `[…, d + 1]`, the sum in f32): the left
/// operand of attention's backward product `[dO | −δ]·[v | 1]ᵀ`.
pub(crate) fn append_neg_row_dot(g: &Tensor, o: &Tensor) -> Result<Tensor> {
    let g = contiguous(g)?;
    let o = contiguous(&o.to_dtype(g.dtype())?)?;
    let (rows, d) = rows_and_cols(&g)?;
    let mut dims = g.dims().to_vec();
    *dims.last_mut().expect("checked above: a last axis") = d + 1;
    let kernel = FloatKernel::warp_per_row("append_neg_row_dot", Shape::from_dims(&dims), rows, d)?;
    g.apply_op2_no_bwd(&o, &kernel)
}

/// Where a per-channel affine finds its channel in `[rows, cols]`.
pub(crate) enum ChannelAxis {
    /// An NCHW map viewed as `[B·C, H·W]`: the channel is the row modulo `channels`.
    Rows { channels: usize },
    /// `[…, C]`: the channel is the column.
    Columns,
}

/// Where a bias `b` added to `y` finds its channel: `[1, C, 1, 1]` on an NCHW map, or `[C]` on
/// `[…, C]`; `None` for any other broadcast.
pub(crate) fn bias_axis(y: &[usize], b: &[usize]) -> Option<ChannelAxis> {
    match (y, b) {
        ([_, c, _, _], [1, bc, 1, 1]) if c == bc => Some(ChannelAxis::Rows { channels: *c }),
        ([.., c], [bc]) if c == bc => Some(ChannelAxis::Columns),
        _ => None,
    }
}

/// `act(x·scale + shift)` per channel, for `x` viewed as `[rows, cols]`: `params` `[k, C]` holds
/// the scale in row `scale_at` and the shift in row `shift_at` (either may be absent), `act` is
/// SiLU when `silu`.
pub(crate) fn channel_affine(
    x: &Tensor,
    params: &Tensor,
    axis: ChannelAxis,
    scale_at: Option<usize>,
    shift_at: Option<usize>,
    silu: bool,
) -> Result<Tensor> {
    let x = contiguous(x)?;
    let params = contiguous(&params.to_dtype(x.dtype())?)?;
    let n = x.elem_count();
    let (rows, cols, channels, per_row) = match axis {
        ChannelAxis::Rows { channels } => {
            let rows = x.dim(0)? * x.dim(1)?;
            (rows, n / rows.max(1), channels, 1)
        }
        ChannelAxis::Columns => {
            let (rows, cols) = rows_and_cols(&x)?;
            (rows, cols, cols, 0)
        }
    };
    let row_of = |at: Option<usize>| at.map_or(-1, |r| r as i32);
    let block = 256;
    let kernel = FloatKernel {
        name: "channel_affine",
        shape: x.shape().clone(),
        grid: (grid(cols, block).min(64), grid(rows, 1), 1),
        block: block as u32,
        scalars: vec![
            Arg::U32(u32_of(rows, "rows")?),
            Arg::U32(u32_of(cols, "columns")?),
            Arg::U32(u32_of(channels, "channels")?),
            Arg::I32(per_row),
            Arg::I32(row_of(scale_at)),
            Arg::I32(row_of(shift_at)),
            Arg::I32(silu as i32),
        ],
    };
    x.apply_op2_no_bwd(&params, &kernel)
}

/// Group norm's input gradient for `x` `[B, C, H, W]`, output gradient `dy`, the frozen affine
/// `wb` = `[weight; bias]` `[2, C]`, through the SiLU that followed when `silu`.
pub(crate) fn group_norm_backward(
    x: &Tensor,
    dy: &Tensor,
    wb: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let (x, dy) = (contiguous(x)?, contiguous(&dy.to_dtype(x.dtype())?)?);
    let wb = contiguous(&wb.to_dtype(x.dtype())?)?;
    let (b, c, h, w) = x.dims4()?;
    let kernel = FloatKernel {
        name: "group_norm_backward",
        shape: x.shape().clone(),
        grid: (u32_of(b * groups, "groups")?, 1, 1),
        block: 512,
        scalars: vec![
            Arg::U32(u32_of(c, "channels")?),
            Arg::U32(u32_of(h * w, "pixels")?),
            Arg::U32(u32_of(groups, "groups")?),
            Arg::F32(eps as f32),
            Arg::I32(silu as i32),
        ],
    };
    x.apply_op3_no_bwd(&dy, &wb, &kernel)
}

/// Layer norm's input gradient over the last axis of `x`, with the frozen weight `w` `[C]`.
pub(crate) fn layer_norm_backward(x: &Tensor, dy: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let (x, dy) = (contiguous(x)?, contiguous(&dy.to_dtype(x.dtype())?)?);
    let w = contiguous(&w.to_dtype(x.dtype())?)?;
    let (rows, c) = rows_and_cols(&x)?;
    let mut kernel = FloatKernel::warp_per_row("layer_norm_backward", x.shape().clone(), rows, c)?;
    kernel.scalars.push(Arg::F32(eps as f32));
    x.apply_op3_no_bwd(&dy, &w, &kernel)
}

/// `[rows, n]` for a GEGLU input `[…, 2n]`, and the output shape `[…, n]`.
fn geglu_shape(h: &Tensor) -> Result<(usize, usize, Shape)> {
    let (rows, width) = rows_and_cols(h)?;
    let n = width / 2;
    let mut dims = h.dims().to_vec();
    *dims.last_mut().expect("a GEGLU input has a last axis") = n;
    Ok((rows, n, Shape::from_dims(&dims)))
}

fn geglu_kernel(name: &'static str, rows: usize, n: usize, shape: Shape) -> Result<FloatKernel> {
    Ok(FloatKernel {
        name,
        shape,
        grid: (grid(n, 256).min(64), grid(rows, 1), 1),
        block: 256,
        scalars: vec![
            Arg::U32(u32_of(rows, "rows")?),
            Arg::U32(u32_of(n, "width")?),
        ],
    })
}

/// GEGLU `hidden·gelu(gate)` of `h = [hidden | gate]` (exact GELU).
pub(crate) fn geglu_forward(h: &Tensor) -> Result<Tensor> {
    let h = contiguous(h)?;
    let (rows, n, shape) = geglu_shape(&h)?;
    h.apply_op1_no_bwd(&geglu_kernel("geglu_forward", rows, n, shape)?)
}

/// GEGLU's input gradient for the output gradient `dy`.
pub(crate) fn geglu_backward(h: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let (h, dy) = (contiguous(h)?, contiguous(&dy.to_dtype(h.dtype())?)?);
    let (rows, n, _) = geglu_shape(&h)?;
    h.apply_op2_no_bwd(
        &dy,
        &geglu_kernel("geglu_backward", rows, n, h.shape().clone())?,
    )
}

/// The stride-1 adjoint `[I, O, k, k]` of a convolution kernel `[O, I, k, k]`: channel axes
/// swapped, both spatial axes flipped.
pub(crate) fn conv_adjoint(weight: &Tensor) -> Result<Tensor> {
    let weight = contiguous(weight)?;
    let (o, i, kh, kw) = weight.dims4()?;
    let kernel = FloatKernel {
        name: "conv_adjoint",
        shape: Shape::from((i, o, kh, kw)),
        grid: (grid(weight.elem_count(), 256), 1, 1),
        block: 256,
        scalars: vec![
            Arg::U32(u32_of(o, "output channels")?),
            Arg::U32(u32_of(i, "input channels")?),
            Arg::U32(u32_of(kh * kw, "taps")?),
        ],
    };
    weight.apply_op1_no_bwd(&kernel)
}

/// How a strided layout is copied into a contiguous one, all in units of `unit` bytes.
#[derive(Debug, PartialEq)]
enum CopyPlan {
    /// Runs of `run` contiguous units under up to six strided axes (`outer`: extent, stride).
    Runs {
        unit: usize,
        outer: Vec<(u32, u32)>,
        run: u32,
        total: u32,
    },
    /// `[batch, P, Q]` whose source has unit stride along P: dst[b][p][q] = src[b·bs + p + q·qs].
    Transpose {
        unit: usize,
        batch: u32,
        p: u32,
        q: u32,
        batch_stride: u32,
        q_stride: u32,
    },
}

/// The plan for copying `dims`/`strides` (elements of `elem` bytes, from `start`), or `None` where
/// candle's copy has to do it (an already contiguous layout is not asked for).
fn copy_plan(dims: &[usize], strides: &[usize], start: usize, elem: usize) -> Option<CopyPlan> {
    if dims.contains(&0) {
        return None;
    }
    // Axes of extent 1 dropped; neighbours merged where the outer one steps over the inner one.
    let mut axes: Vec<(usize, usize)> = Vec::new();
    for (&d, &s) in dims.iter().zip(strides) {
        if d == 1 {
            continue;
        }
        match axes.last_mut() {
            Some(last) if last.1 == s * d => *last = (last.0 * d, s),
            _ => axes.push((d, s)),
        }
    }
    let total: usize = axes.iter().map(|a| a.0).product();
    let span = start + axes.iter().map(|&(d, s)| (d - 1) * s).sum::<usize>() + 1;
    let (&(run, last_stride), outer) = axes.split_last()?;
    if last_stride == 1 {
        if outer.len() > 6 {
            return None;
        }
        let unit = [16, 8, 4, 2].into_iter().find(|&u| {
            u % elem == 0
                && (run * elem).is_multiple_of(u)
                && (start * elem).is_multiple_of(u)
                && outer.iter().all(|&(_, s)| (s * elem).is_multiple_of(u))
        })?;
        let per = unit / elem;
        // The kernel indexes in u32 with grid-stride steps: keep every index below 2³¹.
        if i32::try_from(span.max(total) / per).is_err() {
            return None;
        }
        return Some(CopyPlan::Runs {
            unit,
            outer: outer
                .iter()
                .map(|&(d, s)| (d as u32, (s / per) as u32))
                .collect(),
            run: (run / per) as u32,
            total: (total / per) as u32,
        });
    }
    let (batch, batch_stride, (p, p_stride)) = match *outer {
        [p] => (1, 0, p),
        [(b, bs), p] => (b, bs, p),
        _ => return None,
    };
    if p_stride != 1 || !matches!(elem, 2 | 4) || i32::try_from(span.max(total)).is_err() {
        return None;
    }
    Some(CopyPlan::Transpose {
        unit: elem,
        batch: batch as u32,
        p: p as u32,
        q: run as u32,
        batch_stride: batch_stride as u32,
        q_stride: last_stride as u32,
    })
}

/// The kernel's view of a run copy's outer axes.
#[repr(C)]
#[derive(Clone, Copy)]
struct Runs {
    dims: [u32; 6],
    strides: [u32; 6],
}

// SAFETY: a plain `#[repr(C)]` struct of integers, passed by value as the kernel's `Runs`.
unsafe impl DeviceRepr for Runs {}

/// `x` copied to a contiguous tensor by [`CopyPlan`]; its gradient is the output gradient.
struct StridedCopy {
    plan: CopyPlan,
}

impl Map1 for StridedCopy {
    fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
        &self,
        src: &CudaSlice<T>,
        dev: &CudaDevice,
        layout: &Layout,
    ) -> Result<CudaSlice<T>> {
        let src = src.slice(layout.start_offset()..);
        let n = layout.shape().elem_count();
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(n)? };
        let (name, cfg) = match &self.plan {
            CopyPlan::Runs { unit, total, .. } => (
                format!("copy_runs_u{}", unit * 8),
                LaunchConfig {
                    grid_dim: (grid(*total as usize, 256).min(8192), 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
            ),
            CopyPlan::Transpose {
                unit, batch, p, q, ..
            } => (
                format!("transpose_tiles_u{}", unit * 8),
                LaunchConfig {
                    grid_dim: (p.div_ceil(32), q.div_ceil(32), (*batch).clamp(1, 65_535)),
                    block_dim: (32, 8, 1),
                    shared_mem_bytes: 0,
                },
            ),
        };
        let func = dev.get_or_load_custom_func(&name, MODULE, ptx::LORA_KERNELS)?;
        let mut builder = func.builder();
        builder.arg(&src);
        builder.arg(&out);
        match &self.plan {
            CopyPlan::Runs {
                outer, run, total, ..
            } => {
                let mut runs = Runs {
                    dims: [1; 6],
                    strides: [0; 6],
                };
                for (k, &(d, s)) in outer.iter().enumerate() {
                    runs.dims[k] = d;
                    runs.strides[k] = s;
                }
                let rank = outer.len() as i32;
                builder.arg(&runs).arg(&rank).arg(run).arg(total);
                // SAFETY: `copy_runs(src, dst, Runs, outer_rank, run, total)`.
                unsafe { builder.launch(cfg) }.w()?;
            }
            CopyPlan::Transpose {
                batch,
                p,
                q,
                batch_stride,
                q_stride,
                ..
            } => {
                builder
                    .arg(batch)
                    .arg(p)
                    .arg(q)
                    .arg(batch_stride)
                    .arg(q_stride);
                // SAFETY: `transpose_tiles(src, dst, batch, P, Q, batch_stride, q_stride)`.
                unsafe { builder.launch(cfg) }.w()?;
            }
        }
        Ok(out)
    }
}

impl CustomOp1 for StridedCopy {
    fn name(&self) -> &'static str {
        "strided-copy"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        not_on_cpu()
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = s.device();
        Ok(cuda_storage(
            dev,
            Map1::map(self, &s.slice, dev, l)?,
            l.shape().clone(),
        ))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}

/// `x` as a contiguous tensor (itself when it already is), recorded in the graph like candle's
/// `contiguous`: by [`StridedCopy`] where a plan exists, else by candle.
pub(crate) fn contiguous(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() || !applies(&[x]) {
        return x.contiguous();
    }
    let layout = x.layout();
    match copy_plan(
        layout.dims(),
        layout.stride(),
        layout.start_offset(),
        x.dtype().size_in_bytes(),
    ) {
        Some(plan) => x.apply_op1(StridedCopy { plan }),
        None => x.contiguous(),
    }
}

#[cfg(test)]
mod tests;
