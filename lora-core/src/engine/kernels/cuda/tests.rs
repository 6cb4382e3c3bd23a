//! Our CUDA kernels against candle's ops on the GPU (`cargo test --features cuda`), and the copy
//! planner on the CPU.

use super::*;

#[test]
fn copy_plans_merge_axes_and_pick_the_widest_unit() {
    // Split heads: [B=2, N=5, H=8, d=40] viewed as [B, H, N, d], bf16.
    let plan = copy_plan(&[2, 8, 5, 40], &[1600, 40, 320, 1], 0, 2).unwrap();
    assert_eq!(
        plan,
        CopyPlan::Runs {
            unit: 16,
            outer: vec![(2, 200), (8, 5), (5, 40)],
            run: 5,
            total: 400,
        }
    );
    // A narrowed row [6, 64] of [6, 66] f16: 132-byte rows, 4-byte units.
    let plan = copy_plan(&[6, 64], &[66, 1], 0, 2).unwrap();
    assert_eq!(
        plan,
        CopyPlan::Runs {
            unit: 4,
            outer: vec![(6, 33)],
            run: 32,
            total: 192,
        }
    );
    // NCHW [2, 3, 4, 5] permuted to [B, H, W, C]: H and W merge, C is the strided axis.
    let plan = copy_plan(&[2, 4, 5, 3], &[60, 5, 1, 20], 0, 4).unwrap();
    assert_eq!(
        plan,
        CopyPlan::Transpose {
            unit: 4,
            batch: 2,
            p: 20,
            q: 3,
            batch_stride: 60,
            q_stride: 20,
        }
    );
    // A broadcast (stride 0) last axis over a unit-stride one is a transpose that re-reads.
    assert!(matches!(
        copy_plan(&[4, 3], &[1, 0], 0, 4),
        Some(CopyPlan::Transpose { q_stride: 0, .. })
    ));
    // No axis of unit stride, or nothing to copy: candle's copy.
    assert_eq!(copy_plan(&[4, 3], &[6, 2], 0, 4), None);
    assert_eq!(copy_plan(&[0, 3], &[1, 0], 0, 4), None);
}

/// Every kernel against candle's ops on the GPU, in each dtype, on shapes that exercise the
/// packed and unpacked paths, several rows per block and grid-stride loops.
#[test]
fn kernels_match_candle_on_the_gpu() -> Result<()> {
    let dev = match candle_core::Device::new_cuda(0) {
        Ok(dev) => dev,
        Err(_) => {
            eprintln!("no CUDA device: skipped");
            return Ok(());
        }
    };
    let mut rng = crate::rng::Rng::new(11);
    let mut normal = |dims: &[usize]| -> Result<Tensor> {
        rng.normal_tensor(dims, &candle_core::Device::Cpu)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .to_device(&dev)
    };
    let max_err = |a: &Tensor, b: &Tensor| -> Result<f32> {
        let scale = b
            .abs()?
            .max_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?
            .max(1e-6);
        let diff = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?;
        Ok(diff.to_scalar::<f32>()? / scale)
    };
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 4e-3), (DType::BF16, 3e-2)] {
        // softmax: packed (cols % 8 == 0) and not.
        for cols in [4096, 77, 8] {
            let x = (normal(&[3, 5, cols])? * 3.0)?.to_dtype(dtype)?;
            let ours = softmax_last_dim(&x)?;
            let theirs = candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)?;
            let err = max_err(&ours, &theirs)?;
            assert!(err < tol, "softmax {dtype:?} cols {cols}: {err}");
        }
        // attention backward: softmax times, [g | −rowsum(g ⊙ o)].
        for cols in [4096, 77] {
            let scores = (normal(&[2, 3, cols])? * 3.0)?.to_dtype(dtype)?;
            let d = normal(&[2, 3, cols])?.to_dtype(dtype)?;
            let (p, ds) = softmax_times(&scores, &d)?;
            let p32 = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?;
            let ds32 = (&p32 * d.to_dtype(DType::F32)?)?;
            let err = max_err(&p, &p32)?.max(max_err(&ds, &ds32)?);
            assert!(err < tol, "softmax times {dtype:?} cols {cols}: {err}");
        }
        let g = normal(&[2, 5, 40])?.to_dtype(dtype)?;
        let o = normal(&[2, 5, 40])?.to_dtype(dtype)?;
        let (g32, o32) = (g.to_dtype(DType::F32)?, o.to_dtype(DType::F32)?);
        let delta = (&g32 * &o32)?.sum_keepdim(2)?.neg()?;
        let theirs = Tensor::cat(&[&g32, &delta], 2)?;
        let err = max_err(&append_neg_row_dot(&g, &o)?, &theirs)?;
        assert!(err < tol, "append −row dot {dtype:?}: {err}");
        // copies: split heads, narrowed rows, NCHW ↔ tokens.
        let x = normal(&[2, 7, 8, 40])?.to_dtype(dtype)?;
        let views = [
            x.transpose(1, 2)?,
            x.narrow(3, 0, 38)?,
            x.reshape((2, 7, 320))?.transpose(1, 2)?,
            x.reshape((2, 56, 40))?
                .transpose(1, 2)?
                .reshape((2, 40, 7, 8))?,
            x.permute((0, 2, 3, 1))?,
        ];
        for (k, view) in views.iter().enumerate() {
            let ours = contiguous(view)?;
            assert!(ours.is_contiguous());
            let err = max_err(&ours, &view.contiguous()?)?;
            assert_eq!(err, 0.0, "copy {k} {dtype:?}");
        }
        // channel affine, per row (NCHW) with SiLU and per column (a bias).
        let x = normal(&[2, 6, 5, 7])?.to_dtype(dtype)?;
        let params = normal(&[2, 6])?.to_dtype(dtype)?;
        let (w, b) = (
            params.get(0)?.reshape((1, 6, 1, 1))?,
            params.get(1)?.reshape((1, 6, 1, 1))?,
        );
        let ours = channel_affine(
            &x,
            &params,
            ChannelAxis::Rows { channels: 6 },
            Some(0),
            Some(1),
            true,
        )?;
        let theirs = x.broadcast_mul(&w)?.broadcast_add(&b)?.silu()?;
        let err = max_err(&ours, &theirs)?;
        assert!(err < tol, "affine rows {dtype:?}: {err}");
        let y = normal(&[3, 4, 6])?.to_dtype(dtype)?;
        let ours = channel_affine(
            &y,
            &params.narrow(0, 1, 1)?,
            ChannelAxis::Columns,
            None,
            Some(0),
            false,
        )?;
        let theirs = y.broadcast_add(&params.get(1)?)?;
        let err = max_err(&ours, &theirs)?;
        assert!(err < tol, "affine columns {dtype:?}: {err}");
        // GEGLU forward and backward against candle's gelu_erf and autograd.
        let h = normal(&[2, 9, 16])?.to_dtype(dtype)?;
        let dy = normal(&[2, 9, 8])?.to_dtype(dtype)?;
        let h64 = candle_core::Var::from_tensor(&h.to_dtype(DType::F32)?)?;
        let theirs = (h64.narrow(2, 0, 8)? * h64.narrow(2, 8, 8)?.gelu_erf()?)?;
        let grads = (&theirs * dy.to_dtype(DType::F32)?)?
            .sum_all()?
            .backward()?;
        let err = max_err(&geglu_forward(&h)?, &theirs)?;
        assert!(err < tol, "geglu {dtype:?}: {err}");
        let err = max_err(
            &geglu_backward(&h, &dy)?,
            grads.get(&h64).expect("gradient"),
        )?;
        assert!(err < tol, "geglu backward {dtype:?}: {err}");
        // Normalisations' input gradients against autograd of the composed norms in f32.
        let standardize = |x: &Tensor| -> Result<Tensor> {
            let centered = x.broadcast_sub(&x.mean_keepdim(candle_core::D::Minus1)?)?;
            let var = centered.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
            centered.broadcast_div(&(var + 1e-5)?.sqrt()?)
        };
        let x = (normal(&[2, 8, 3, 5])? + 0.5)?.to_dtype(dtype)?;
        let dy = normal(&[2, 8, 3, 5])?.to_dtype(dtype)?;
        let wb = normal(&[2, 8])?.to_dtype(dtype)?;
        for silu in [false, true] {
            let x32 = candle_core::Var::from_tensor(&x.to_dtype(DType::F32)?)?;
            let wb32 = wb.to_dtype(DType::F32)?;
            let x_hat = standardize(&x32.reshape((2, 4, 30))?)?.reshape((2, 8, 3, 5))?;
            let z = x_hat
                .broadcast_mul(&wb32.get(0)?.reshape((1, 8, 1, 1))?)?
                .broadcast_add(&wb32.get(1)?.reshape((1, 8, 1, 1))?)?;
            let y = if silu { z.silu()? } else { z };
            let grads = (y * dy.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
            let ours = group_norm_backward(&x, &dy, &wb, 4, 1e-5, silu)?;
            let err = max_err(&ours, grads.get(&x32).expect("gradient"))?;
            assert!(
                err < tol,
                "group norm backward {dtype:?} silu {silu}: {err}"
            );
        }
        let x = (normal(&[3, 7, 40])? + 0.5)?.to_dtype(dtype)?;
        let dy = normal(&[3, 7, 40])?.to_dtype(dtype)?;
        let w = normal(&[40])?.to_dtype(dtype)?;
        let x32 = candle_core::Var::from_tensor(&x.to_dtype(DType::F32)?)?;
        let y = standardize(&x32)?.broadcast_mul(&w.to_dtype(DType::F32)?)?;
        let grads = (y * dy.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
        let ours = layer_norm_backward(&x, &dy, &w, 1e-5)?;
        let err = max_err(&ours, grads.get(&x32).expect("gradient"))?;
        assert!(err < tol, "layer norm backward {dtype:?}: {err}");
        // The adjoint kernel, exact.
        let w = normal(&[5, 3, 3, 2])?.to_dtype(dtype)?;
        let theirs = w.flip(&[2, 3])?.transpose(0, 1)?;
        assert_eq!(
            max_err(&conv_adjoint(&w)?, &theirs)?,
            0.0,
            "adjoint {dtype:?}"
        );
    }
    Ok(())
}
