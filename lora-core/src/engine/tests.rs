//! The engine's layers against candle's composed ops and plain autograd: values, input
//! gradients, no frozen-weight gradients, and trained parameters' gradients.

use candle_core::{DType, Module, Tensor, D};

use super::activation::*;
use super::conv::*;
use super::fused::*;
use super::linear::*;
use super::norm::*;
use super::tensor_ops::*;
use crate::rng::Rng;
use crate::test_support::{max_abs, max_diff, max_rel_diff};
use candle_core::{Device, Var};

/// The frozen op's input gradient equals candle's plain autograd, and the frozen weight gets
/// no gradient at all (plain autograd computes one).
fn check(
    frozen: impl Fn(&Tensor) -> Tensor,
    plain: impl Fn(&Tensor) -> Tensor,
    x: Tensor,
    weight: &Tensor,
) {
    let x = Var::from_tensor(&x).unwrap();
    let g_frozen = frozen(x.as_tensor())
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g_plain = plain(x.as_tensor())
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let (a, b) = (
        g_frozen.get(x.as_tensor()).unwrap(),
        g_plain.get(x.as_tensor()).unwrap(),
    );
    // Relative: summation order differs (the stride-1 conv adjoint is a forward conv).
    let scale = max_abs(b);
    assert!(
        max_diff(a, b) <= 1e-6 * scale.max(1.0),
        "input gradients differ by {} (scale {scale})",
        max_diff(a, b)
    );
    // Any gradient shaped like the weight (or its transpose) is a weight gradient.
    let weight_grads = |g: &candle_core::backprop::GradStore| {
        let mut t = weight.dims().to_vec();
        t.reverse();
        g.get_ids()
            .filter(|id| {
                let d = g.get_id(**id).unwrap().dims();
                d == weight.dims() || (weight.rank() == 2 && d == t.as_slice())
            })
            .count()
    };
    assert!(
        weight_grads(&g_plain) > 0,
        "plain autograd differentiates the weight"
    );
    assert_eq!(
        weight_grads(&g_frozen),
        0,
        "frozen op computed a weight gradient"
    );
}

#[test]
fn upsampling_matches_candle_and_its_gradient() {
    let dev = Device::Cpu;
    let mut rng = Rng::new(8);
    for (h, w) in [(8, 6), (7, 5)] {
        let x = Var::from_tensor(&rng.normal_tensor((2, 3, 4, 3), &dev).unwrap()).unwrap();
        let upstream = rng.normal_tensor((2, 3, h, w), &dev).unwrap();
        let ours = upsample_nearest(&x, h, w).unwrap();
        let reference = x.upsample_nearest2d(h, w).unwrap();
        assert_eq!(max_diff(&ours, &reference), 0.0);
        if (h, w) != (8, 6) {
            continue; // candle has no backward for non-integer factors
        }
        let grad = |y: &Tensor| {
            let grads = (y * &upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            grads.get(&x).unwrap().clone()
        };
        assert!(max_diff(&grad(&ours), &grad(&reference)) < 1e-5);
    }
}

/// f32 takes the CPU kernels; f64 the path every other device and dtype takes (the output
/// computed by candle, re-attached with its input gradient).
const PATHS: [DType; 2] = [DType::F32, DType::F64];

#[test]
fn frozen_linear_gives_input_gradient_only() {
    for dtype in PATHS {
        let mut rng = Rng::new(0);
        let w = normal(&[5, 3], dtype, &mut rng);
        let b = normal(&[5], dtype, &mut rng);
        let x = normal(&[2, 4, 3], dtype, &mut rng);
        check(
            |x| frozen_linear(x, &w, Some(&b)).unwrap(),
            |x| {
                x.broadcast_matmul(&w.t().unwrap())
                    .unwrap()
                    .broadcast_add(&b)
                    .unwrap()
            },
            x,
            &w,
        );
    }
}

/// A frozen linear layer with low-rank terms summed into its output, and its input gradient
/// with terms through the down-projections, equal the products composed from candle's ops: in
/// f32 (our kernels: the first product written into a new buffer, the terms accumulated) and
/// f64 (composed), with and without a bias, with no, one and two terms, on sizes past the
/// kernels' per-task bias copies; a term that does not fit is an error naming the shapes.
#[test]
fn frozen_linear_low_rank_terms_match_composed_products() {
    let matmul = |a: &Tensor, b: &Tensor| a.broadcast_matmul(b).unwrap();
    for dtype in PATHS {
        for (leading, outputs, inputs) in [([2, 5], 6, 7), ([3, 400], 96, 40)] {
            let rows = leading[0] * leading[1];
            let mut rng = Rng::new(7);
            let w = normal(&[outputs, inputs], dtype, &mut rng);
            let b = normal(&[outputs], dtype, &mut rng);
            let x = normal(&[leading[0], leading[1], inputs], dtype, &mut rng);
            let dy = normal(&[leading[0], leading[1], outputs], dtype, &mut rng);
            let ups: Vec<_> = [(rows, 4), (rows, 2)]
                .map(|(r, k)| {
                    (
                        normal(&[r, k], dtype, &mut rng),
                        normal(&[outputs, k], dtype, &mut rng),
                    )
                })
                .into();
            let downs: Vec<_> = [(rows, 4), (rows, 2)]
                .map(|(r, k)| {
                    (
                        normal(&[r, k], dtype, &mut rng),
                        normal(&[k, inputs], dtype, &mut rng),
                    )
                })
                .into();
            for terms in 0..=2 {
                for bias in [None, Some(&b)] {
                    let up_terms: Vec<_> = ups[..terms].iter().map(|(t, u)| (t, u)).collect();
                    let ours = frozen_linear_plus_low_rank(&x, &w, bias, &up_terms).unwrap();
                    let mut expected = matmul(&x, &w.t().unwrap());
                    if let Some(b) = bias {
                        expected = expected.broadcast_add(b).unwrap();
                    }
                    for (t, u) in &ups[..terms] {
                        let term = t.matmul(&u.t().unwrap()).unwrap();
                        expected = (expected + term.reshape(ours.shape()).unwrap()).unwrap();
                    }
                    let case = format!("{dtype:?} {rows}×{outputs} {terms} terms {bias:?}");
                    assert_eq!(ours.dims(), expected.dims(), "{case}");
                    assert!(max_rel_diff(&ours, &expected) < 1e-5, "{case}");
                }
                let down_terms: Vec<_> = downs[..terms].iter().map(|(g, d)| (g, d)).collect();
                let ours = frozen_linear_input_grad_plus_low_rank(&dy, &w, &down_terms).unwrap();
                let mut expected = matmul(&dy, &w);
                for (g, d) in &downs[..terms] {
                    let term = g.matmul(d).unwrap();
                    expected = (expected + term.reshape(ours.shape()).unwrap()).unwrap();
                }
                let case = format!("input gradient {dtype:?} {rows}×{inputs} {terms} terms");
                assert_eq!(ours.dims(), expected.dims(), "{case}");
                assert!(max_rel_diff(&ours, &expected) < 1e-5, "{case}");
            }
        }
    }
    let mut rng = Rng::new(8);
    let w = normal(&[6, 7], DType::F32, &mut rng);
    let x = normal(&[5, 7], DType::F32, &mut rng);
    let (t, up) = (
        normal(&[4, 3], DType::F32, &mut rng),
        normal(&[6, 3], DType::F32, &mut rng),
    );
    let err = frozen_linear_plus_low_rank(&x, &w, None, &[(&t, &up)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("term [4, 3] · [6, 3] does not fit 5 rows of 6 values"),
        "{err}"
    );
}

/// Where a gradient can flow to an operand (a trained input or up-projection), the low-rank sum
/// is recorded and gives the same gradients as candle's composed products.
#[test]
fn frozen_linear_low_rank_terms_keep_gradients_of_tracked_operands() {
    let mut rng = Rng::new(9);
    let w = normal(&[6, 7], DType::F32, &mut rng);
    let b = normal(&[6], DType::F32, &mut rng);
    let x = Var::from_tensor(&normal(&[2, 5, 7], DType::F32, &mut rng)).unwrap();
    let t = normal(&[10, 3], DType::F32, &mut rng);
    let up = Var::from_tensor(&normal(&[6, 3], DType::F32, &mut rng)).unwrap();
    let upstream = normal(&[2, 5, 6], DType::F32, &mut rng);
    let grads = |y: Tensor| {
        let g = (y * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        [x.as_tensor(), up.as_tensor()].map(|v| g.get(v).expect("a gradient").clone())
    };
    let ours = frozen_linear_plus_low_rank(&x, &w, Some(&b), &[(&t, &up)]).unwrap();
    assert!(ours.track_op());
    let term = t
        .matmul(&up.t().unwrap())
        .unwrap()
        .reshape((2, 5, 6))
        .unwrap();
    let composed = (x
        .broadcast_matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(&b)
        .unwrap()
        + term)
        .unwrap();
    for (ours, expected) in grads(ours).iter().zip(grads(composed).iter()) {
        assert!(max_rel_diff(ours, expected) < 1e-5);
    }
}

/// candle's convolution with a `(rows, columns)` padding, applied explicitly (candle pads both
/// axes alike).
fn padded_conv(x: &Tensor, w: &Tensor, (ph, pw): (usize, usize), stride: usize) -> Tensor {
    x.pad_with_zeros(2, ph, ph)
        .unwrap()
        .pad_with_zeros(3, pw, pw)
        .unwrap()
        .conv2d(w, 0, stride, 1, 1)
        .unwrap()
}

#[test]
fn frozen_conv_gives_input_gradient_only() {
    for dtype in PATHS {
        let mut rng = Rng::new(1);
        let w3 = normal(&[4, 3, 3, 3], dtype, &mut rng);
        let w1 = normal(&[4, 3, 1, 1], dtype, &mut rng);
        let w17 = normal(&[4, 3, 1, 7], dtype, &mut rng);
        let w31 = normal(&[4, 3, 3, 1], dtype, &mut rng);
        // Odd and even sizes, stride 1 and 2 (the UNet's downsamplers), padding 0 and 1;
        // 1×1 kernels (shortcuts and projections), which are products off the CPU kernel;
        // rectangular kernels padded on one axis (Inception's factorized convolutions).
        for (w, size, stride, padding) in [
            (&w3, 7, 2, (1, 1)),
            (&w3, 8, 2, (1, 1)),
            (&w3, 6, 1, (1, 1)),
            (&w3, 5, 1, (0, 0)),
            (&w1, 6, 1, (0, 0)),
            (&w17, 8, 1, (0, 3)),
            (&w31, 5, 1, (1, 0)),
            (&w17, 9, 2, (0, 3)),
            (&w3, 7, 2, (0, 1)),
        ] {
            // Without a kept adjoint kernel, then twice with one (built, then reused).
            let kept = AdjointKernel::default();
            for adjoint in [None, Some(&kept), Some(&kept)] {
                let x = normal(&[2, 3, size, size], dtype, &mut rng);
                check(
                    |x| frozen_conv2d(x, w, None, padding, stride, adjoint).unwrap(),
                    |x| padded_conv(x, w, padding, stride),
                    x,
                    w,
                );
            }
        }
    }
}

/// A conv layer's fused ReLU gives the values and input gradient of `relu(conv(x) + b)` composed
/// from candle's ops, on both paths, for square, rectangular, strided and 1×1 kernels.
#[test]
fn conv_relu_matches_composed_ops() {
    for dtype in PATHS {
        let mut rng = Rng::new(9);
        for (kernel, padding, stride) in [
            ((3, 3), (1, 1), 1),
            ((1, 7), (0, 3), 1),
            ((3, 3), (0, 0), 2),
            ((1, 1), (0, 0), 1),
        ] {
            let w = normal(&[4, 3, kernel.0, kernel.1], dtype, &mut rng);
            let b = normal(&[4], dtype, &mut rng);
            let layer = Conv2dLayer::new(w.clone(), b.clone(), stride, padding).unwrap();
            let plain = |x: &Tensor| {
                padded_conv(x, &w, padding, stride)
                    .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
                    .unwrap()
                    .relu()
                    .unwrap()
            };
            let x = normal(&[2, 3, 7, 9], dtype, &mut rng);
            let ours = layer.forward_relu(&x).unwrap();
            assert!(max_diff(&ours, &plain(&x)) < 1e-5, "{kernel:?} {dtype:?}");
            check(|x| layer.forward_relu(x).unwrap(), plain, x, &w);
        }
    }
}

#[test]
fn frozen_ops_record_nothing_without_gradients() {
    let mut rng = Rng::new(2);
    let w = rng.normal_tensor((5, 3), &Device::Cpu).unwrap();
    let x = rng.normal_tensor((4, 3), &Device::Cpu).unwrap();
    let y = frozen_linear(&x, &w, None).unwrap();
    assert!(!y.track_op());
    assert!(max_diff(&y, &x.matmul(&w.t().unwrap()).unwrap()) < 1e-6);
}

/// A trained parameter (a `Var`: a full fine-tune) gets the same gradient through the layers
/// here as through candle's plain ops, which the frozen path would have cut.
#[test]
fn trained_parameters_get_their_gradients() {
    let mut rng = Rng::new(3);
    let dev = Device::Cpu;
    let var = |shape: &[usize], rng: &mut Rng| {
        Var::from_tensor(&rng.normal_tensor(shape, &dev).unwrap()).unwrap()
    };
    let x = rng.normal_tensor((2, 3, 6, 6), &dev).unwrap();
    let (w, b) = (var(&[4, 3, 3, 3], &mut rng), var(&[1, 4, 1, 1], &mut rng));
    let (lw, lb) = (var(&[5, 6], &mut rng), var(&[5], &mut rng));
    let (nw, nb) = (var(&[5], &mut rng), var(&[5], &mut rng));
    let ours = || {
        let h = frozen_conv2d(&x, &w, Some(&b), (1, 1), 1, None).unwrap();
        let h = frozen_linear(&h, &lw, Some(&lb)).unwrap();
        let norm = LayerNormLayer {
            weight: nw.as_tensor().clone(),
            bias: nb.as_tensor().clone(),
            eps: 1e-5,
        };
        norm.forward(&h).unwrap()
    };
    let plain = || {
        let h = x.conv2d(&w, 1, 1, 1, 1).unwrap().broadcast_add(&b).unwrap();
        let h = h.broadcast_matmul(&lw.t().unwrap()).unwrap();
        let h = h.broadcast_add(&lb).unwrap();
        let mean = h.mean_keepdim(D::Minus1).unwrap();
        let c = h.broadcast_sub(&mean).unwrap();
        let var = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let n = c
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap();
        n.broadcast_mul(&nw).unwrap().broadcast_add(&nb).unwrap()
    };
    let loss = |y: Tensor| y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let (g_ours, g_plain) = (loss(ours()), loss(plain()));
    for (name, p) in [("conv w", &w), ("conv b", &b), ("linear w", &lw)]
        .into_iter()
        .chain([("linear b", &lb), ("norm w", &nw), ("norm b", &nb)])
    {
        let a = g_ours.get(p.as_tensor()).expect(name);
        let e = g_plain.get(p.as_tensor()).unwrap();
        assert!(
            max_diff(a, e) < 1e-4,
            "{name}: gradients differ by {}",
            max_diff(a, e)
        );
    }
}

/// The trained-kernel convolution's gradients equal candle's plain autograd for the
/// UNet's strides and paddings, odd and even sizes, 1×1, 3×3 and rectangular kernels.
#[test]
fn trained_conv_gradients_match_autograd() {
    let mut rng = Rng::new(4);
    let cases = [
        ((3, 3), 7, 2, (1, 1)),
        ((3, 3), 8, 2, (1, 1)),
        ((3, 3), 6, 1, (1, 1)),
        ((1, 1), 5, 1, (0, 0)),
        ((7, 1), 8, 1, (3, 0)),
        ((1, 3), 7, 2, (0, 1)),
    ];
    for (dtype, (k, size, stride, padding)) in PATHS.into_iter().flat_map(|d| cases.map(|c| (d, c)))
    {
        let var =
            |shape: &[usize], rng: &mut Rng| Var::from_tensor(&normal(shape, dtype, rng)).unwrap();
        let w = var(&[4, 3, k.0, k.1], &mut rng);
        let x = var(&[2, 3, size, size], &mut rng);
        let loss = |y: Tensor| y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let ours = loss(frozen_conv2d(&x, &w, None, padding, stride, None).unwrap());
        let plain = loss(padded_conv(&x, &w, padding, stride));
        for (name, p) in [("input", x.as_tensor()), ("kernel", w.as_tensor())] {
            // Relative: a kernel gradient sums over every output position, up to ~100 here.
            let diff = max_rel_diff(ours.get(p).unwrap(), plain.get(p).unwrap());
            assert!(
                diff < 1e-5,
                "k {k:?} size {size} stride {stride}: {name} gradients differ by {diff}"
            );
        }
    }
}

/// A standard normal tensor of `dtype` on the CPU.
fn normal(shape: &[usize], dtype: DType, rng: &mut Rng) -> Tensor {
    rng.normal_tensor(shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn normal_f64(shape: &[usize], rng: &mut Rng) -> Tensor {
    normal(shape, DType::F64, rng)
}

/// Group norm over `channels` in `groups`, with random f64 affine parameters.
fn random_group_norm(channels: usize, groups: usize, rng: &mut Rng) -> GroupNormLayer {
    let weight = normal_f64(&[channels], rng);
    GroupNormLayer::new(&weight, &normal_f64(&[channels], rng), groups, 1e-5).unwrap()
}

/// Input gradient of `f` for a random upstream gradient (a weighted sum as the loss).
fn input_grad_of(f: impl Fn(&Tensor) -> Tensor, x: &Tensor, upstream: &Tensor) -> Tensor {
    let x = Var::from_tensor(x).unwrap();
    let loss = (f(x.as_tensor()) * upstream).unwrap().sum_all().unwrap();
    loss.backward().unwrap().get(x.as_tensor()).unwrap().clone()
}

/// Off the CPU kernel (here: f64), group norm is one node whose input gradient matches
/// candle's autograd through the composed ops, with and without the SiLU.
#[test]
fn group_norm_node_gradient_matches_composed_group_norm() {
    let mut rng = Rng::new(5);
    let norm = random_group_norm(6, 3, &mut rng);
    let x = (normal_f64(&[2, 6, 3, 5], &mut rng) * 2.0).unwrap();
    let up = normal_f64(&[2, 6, 3, 5], &mut rng);
    for silu in [false, true] {
        let ours = |x: &Tensor| norm.normalize(x, silu).unwrap();
        let composed = |x: &Tensor| norm.composed(x, silu).unwrap();
        assert!(max_diff(&ours(&x), &composed(&x)) < 1e-12);
        let (a, b) = (
            input_grad_of(ours, &x, &up),
            input_grad_of(composed, &x, &up),
        );
        assert!(
            max_diff(&a, &b) < 1e-10,
            "silu {silu}: {}",
            max_diff(&a, &b)
        );
    }
}

/// Broadcasting on merged axes gives candle's values and gradients, for the layouts the
/// UNet uses and for ones it cannot merge, with a gradient flowing to both operands, to the
/// broadcast one only (a trained bias after a frozen layer) and to the other only.
#[test]
fn merged_broadcasts_match_candle() {
    let mut rng = Rng::new(9);
    let dev = Device::Cpu;
    let cases: [(&[usize], &[usize]); 9] = [
        (&[2, 3, 4, 5], &[1, 3, 1, 1]),
        (&[2, 3, 4, 5], &[2, 3, 1, 1]),
        (&[2, 7, 5], &[5]),
        (&[2, 1, 4], &[1, 1, 4]),
        (&[3, 4], &[3, 1]),
        (&[2, 3, 4, 5], &[2, 1, 4, 1]),
        (&[2, 3, 4, 5], &[1, 3, 1, 5]),
        (&[6, 4], &[1, 1]),
        (&[2, 3], &[2, 3]),
    ];
    for (y_dims, b_dims) in cases {
        let y = Var::from_tensor(&rng.normal_tensor(y_dims, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&rng.normal_tensor(b_dims, &dev).unwrap()).unwrap();
        type Op = fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>;
        let pairs: [(Op, Op); 3] = [
            (broadcast_add, Tensor::broadcast_add),
            (broadcast_sub, Tensor::broadcast_sub),
            (broadcast_mul, Tensor::broadcast_mul),
        ];
        let (y_const, b_const) = (y.as_tensor().detach(), b.as_tensor().detach());
        let tracked: [(&Tensor, &Tensor, Vec<&Var>); 3] = [
            (y.as_tensor(), b.as_tensor(), vec![&y, &b]),
            (&y_const, b.as_tensor(), vec![&b]),
            (y.as_tensor(), &b_const, vec![&y]),
        ];
        for (i, (ours, candle)) in pairs.into_iter().enumerate() {
            for (y_in, b_in, vars) in &tracked {
                let (a, c) = (ours(y_in, b_in).unwrap(), candle(y_in, b_in).unwrap());
                assert_eq!(a.dims(), c.dims());
                assert!(
                    max_diff(&a, &c) < 1e-6,
                    "op {i}: {y_dims:?} with {b_dims:?}"
                );
                let (ga, gc) = (
                    a.sqr().unwrap().sum_all().unwrap().backward().unwrap(),
                    c.sqr().unwrap().sum_all().unwrap().backward().unwrap(),
                );
                for v in vars {
                    let diff = max_diff(ga.get(v).unwrap(), gc.get(v).unwrap());
                    assert!(
                        diff < 1e-5,
                        "op {i}: {y_dims:?} with {b_dims:?}: gradient {diff}"
                    );
                }
                // No gradient for the operand that is not tracked.
                for v in [&y, &b] {
                    if !vars.iter().any(|t| std::ptr::eq(*t, v)) {
                        assert!(
                            ga.get(v).is_none(),
                            "op {i}: untracked operand got a gradient"
                        );
                    }
                }
            }
        }
    }
}

/// Group norm from candle's layer-norm kernel (every device and dtype but CPU f32 and f64),
/// in f32 and with f16 values, matches the composed normalisation in f64.
#[test]
fn fused_group_norm_matches_composed_group_norm() {
    let mut rng = Rng::new(8);
    let norm = random_group_norm(8, 4, &mut rng);
    // Not centred: the kernel's one-pass variance must hold with a mean.
    let x = ((normal_f64(&[2, 8, 5, 3], &mut rng) * 3.0).unwrap() + 1.5).unwrap();
    for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::F16, 2e-2)] {
        let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let norm_in = GroupNormLayer {
            weight: cast(&norm.weight),
            bias: cast(&norm.bias),
            ..norm.clone()
        };
        for silu in [false, true] {
            let ours = norm_in.fused(&cast(&x), silu).unwrap();
            let expected = norm.composed(&x, silu).unwrap();
            let err = max_rel_diff(&ours.to_dtype(DType::F64).unwrap(), &expected);
            assert!(err < tolerance, "{dtype:?}, silu {silu}: {err}");
        }
    }
}

/// Off the CPU kernel (here: f64), GEGLU is one node whose input gradient matches candle's
/// autograd through the composed ops.
#[test]
fn geglu_node_gradient_matches_composed_geglu() {
    let mut rng = Rng::new(6);
    let normal = |shape: &[usize], rng: &mut Rng| (normal_f64(shape, rng) * 2.0).unwrap();
    let (h, up) = (normal(&[2, 5, 8], &mut rng), normal(&[2, 5, 4], &mut rng));
    let composed = |h: &Tensor| {
        let (hidden, gate) = geglu_halves(h).unwrap();
        (hidden * gate.gelu_erf().unwrap()).unwrap()
    };
    let ours = |h: &Tensor| geglu(h).unwrap();
    assert!(max_diff(&ours(&h), &composed(&h)) < 1e-12);
    let (a, b) = (
        input_grad_of(ours, &h, &up),
        input_grad_of(composed, &h, &up),
    );
    // candle's gelu_erf backward rounds 1/√(2π) to 0.398942 (a relative 7e-7).
    assert!(max_diff(&a, &b) < 1e-5, "{}", max_diff(&a, &b));
}

#[test]
fn fused_layer_norm_gradient_matches_composed_layer_norm() {
    let mut rng = Rng::new(4);
    let dev = Device::Cpu;
    let (w, b) = (
        rng.normal_tensor(6, &dev).unwrap(),
        rng.normal_tensor(6, &dev).unwrap(),
    );
    let norm = LayerNormLayer {
        weight: w.clone(),
        bias: b.clone(),
        eps: 1e-5,
    };
    let composed = |x: &Tensor| {
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let c = x.broadcast_sub(&mean).unwrap();
        let var = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let n = c
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap();
        n.broadcast_mul(&w).unwrap().broadcast_add(&b).unwrap()
    };
    let x = (rng.normal_tensor((2, 5, 6), &dev).unwrap() * 2.0).unwrap();
    let up = rng.normal_tensor((2, 5, 6), &dev).unwrap();
    assert!(max_diff(&norm.forward(&x).unwrap(), &composed(&x)) < 1e-5);
    let ours = input_grad_of(|x| norm.forward(x).unwrap(), &x, &up);
    let reference = input_grad_of(composed, &x, &up);
    assert!(
        max_diff(&ours, &reference) < 1e-5,
        "{}",
        max_diff(&ours, &reference)
    );
    assert!(max_diff(&norm.forward(&x).unwrap(), &composed(&x)) < 1e-5);
}

/// Values and the gradients of both inputs of `f(x, r)` for a weighted sum as the loss.
fn value_and_grads(
    f: impl Fn(&Tensor, &Tensor) -> Tensor,
    x: &Tensor,
    r: &Tensor,
    up: &Tensor,
) -> [Tensor; 3] {
    let (x, r) = (Var::from_tensor(x).unwrap(), Var::from_tensor(r).unwrap());
    let y = f(x.as_tensor(), r.as_tensor());
    let grads = (&y * up).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = |v: &Var| match grads.get(v.as_tensor()) {
        Some(g) => g.clone(),
        None => v.zeros_like().unwrap(),
    };
    [y.clone(), grad(&x), grad(&r)]
}

/// Each fused node (a frozen layer with the norm before it, or with what comes before it and
/// the residual sum after it) gives the values and the input and residual gradients of the
/// same computation composed from candle's ops and differentiated by candle's autograd: on
/// the CPU kernels (f32) and on the path other devices take (f64 here; candle's `gelu_erf`
/// backward rounds 1/√(2π) to a relative 7e-7, which bounds the f64 tolerance).
#[test]
fn fused_nodes_match_composed_ops_and_their_gradients() {
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-6)] {
        let mut rng = Rng::new(8);
        let mut normal = |shape: &[usize]| normal(shape, dtype, &mut rng);
        let (b, h, w, c, inner) = (2, 3, 4, 6, 8);
        let n = h * w;
        let (w_out, b_out) = (normal(&[c, c]), normal(&[c]));
        let (w_ff, b_ff) = (normal(&[c, inner]), normal(&[c]));
        let (w_in, b_in) = (normal(&[2 * inner, c]), normal(&[2 * inner]));
        let group_norm = GroupNormLayer::new(&normal(&[c]), &normal(&[c]), 3, 1e-5).unwrap();
        let layer_norm = LayerNormLayer {
            weight: normal(&[c]),
            bias: normal(&[c]),
            eps: 1e-5,
        };
        let linear = |x: &Tensor, w: &Tensor, b: &Tensor| {
            x.broadcast_matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(b)
                .unwrap()
        };
        let tokens_of = |x: &Tensor| x.permute((0, 2, 3, 1)).unwrap().reshape((b, n, c)).unwrap();
        let image_of = |t: &Tensor| {
            t.reshape((b, h, w, c))
                .unwrap()
                .permute((0, 3, 1, 2))
                .unwrap()
        };
        let conv =
            |c_in: usize, c_out: usize, k: usize, normal: &mut dyn FnMut(&[usize]) -> Tensor| {
                Conv2dLayer {
                    weight: (normal(&[c_out, c_in, k, k]) * 0.3).unwrap(),
                    bias: normal(&[1, c_out, 1, 1]),
                    stride: 1,
                    padding: (k / 2, k / 2),
                    adjoint: AdjointKernel::default(),
                }
            };
        let (conv3, shortcut) = (conv(c, c, 3, &mut normal), conv(4, c, 1, &mut normal));
        let shift = normal(&[b, c, 1, 1]);
        let composed_conv = |x: &Tensor, conv: &Conv2dLayer| {
            padded_conv(x, &conv.weight, conv.padding, 1)
                .broadcast_add(&conv.bias)
                .unwrap()
        };
        let composed_silu_conv =
            |x: &Tensor| composed_conv(&group_norm.composed(x, true).unwrap(), &conv3);
        let composed_layer_norm = |x: &Tensor| {
            let (x_hat, _) = standardized(x, 1e-5).unwrap();
            x_hat
                .broadcast_mul(&layer_norm.weight)
                .unwrap()
                .broadcast_add(&layer_norm.bias)
                .unwrap()
        };
        type Fused<'a> = Box<dyn Fn(&Tensor, &Tensor) -> Tensor + 'a>;
        let cases: [(&str, Tensor, Tensor, Fused, Fused); 9] = [
            (
                "group norm + silu + conv + shift",
                (normal(&[b, c, h, w]) * 2.0).unwrap(),
                normal(&[1]),
                Box::new(|x, _| norm_silu_conv(&group_norm, &conv3, x, Some(&shift)).unwrap()),
                Box::new(|x, _| composed_silu_conv(x).broadcast_add(&shift).unwrap()),
            ),
            (
                "group norm + silu + conv + residual",
                (normal(&[b, c, h, w]) * 2.0).unwrap(),
                normal(&[b, c, h, w]),
                Box::new(|x, r| norm_silu_conv_residual(&group_norm, &conv3, x, r, None).unwrap()),
                Box::new(|x, r| (composed_silu_conv(x) + r).unwrap()),
            ),
            (
                "group norm + silu + conv + shortcut",
                (normal(&[b, c, h, w]) * 2.0).unwrap(),
                normal(&[b, 4, h, w]),
                Box::new(|x, r| {
                    norm_silu_conv_residual(&group_norm, &conv3, x, r, Some(&shortcut)).unwrap()
                }),
                Box::new(|x, r| (composed_silu_conv(x) + composed_conv(r, &shortcut)).unwrap()),
            ),
            (
                "linear + residual",
                normal(&[b, n, c]),
                normal(&[b, n, c]),
                Box::new(|x, r| frozen_linear_residual(x, &w_out, Some(&b_out), r).unwrap()),
                Box::new(|x, r| (linear(x, &w_out, &b_out) + r).unwrap()),
            ),
            (
                "geglu + linear + residual",
                (normal(&[b, n, 2 * inner]) * 2.0).unwrap(),
                normal(&[b, n, c]),
                Box::new(|x, r| geglu_linear_residual(x, &w_ff, Some(&b_ff), r).unwrap()),
                Box::new(|x, r| {
                    let (hidden, gate) = geglu_halves(x).unwrap();
                    let a = (hidden * gate.gelu_erf().unwrap()).unwrap();
                    (linear(&a, &w_ff, &b_ff) + r).unwrap()
                }),
            ),
            (
                "tokens to image + residual",
                normal(&[b, n, c]),
                normal(&[b, c, h, w]),
                Box::new(|x, r| project_to_image_residual(x, &w_out, Some(&b_out), r).unwrap()),
                Box::new(|x, r| (image_of(&linear(x, &w_out, &b_out)) + r).unwrap()),
            ),
            (
                "group norm to tokens",
                (normal(&[b, c, h, w]) * 2.0).unwrap(),
                normal(&[1]),
                Box::new(|x, _| {
                    group_norm_to_tokens(&group_norm, x, &w_out, Some(&b_out)).unwrap()
                }),
                Box::new(|x, _| {
                    let normed = group_norm.composed(x, false).unwrap();
                    linear(&tokens_of(&normed), &w_out, &b_out)
                }),
            ),
            (
                "layer norm + geglu feed-forward + residual",
                (normal(&[b, n, c]) * 2.0).unwrap(),
                normal(&[1]),
                Box::new(|x, _| {
                    let (input, output) = ((&w_in, Some(&b_in)), (&w_ff, Some(&b_ff)));
                    geglu_feed_forward_residual(&layer_norm, x, input, output).unwrap()
                }),
                Box::new(|x, _| {
                    let normed = composed_layer_norm(x);
                    let (hidden, gate) = geglu_halves(&linear(&normed, &w_in, &b_in)).unwrap();
                    let a = (hidden * gate.gelu_erf().unwrap()).unwrap();
                    (linear(&a, &w_ff, &b_ff) + x).unwrap()
                }),
            ),
            (
                "layer norm + linear",
                (normal(&[b, n, c]) * 2.0).unwrap(),
                normal(&[1]),
                Box::new(|x, _| layer_norm_linear(&layer_norm, x, &w_in, Some(&b_in)).unwrap()),
                Box::new(|x, _| linear(&composed_layer_norm(x), &w_in, &b_in)),
            ),
        ];
        for (name, x, r, fused, composed) in &cases {
            let out_shape = composed(x, r).dims().to_vec();
            let up = normal(&out_shape);
            let ours = value_and_grads(fused, x, r, &up);
            let reference = value_and_grads(composed, x, r, &up);
            for (what, a, e) in [
                ("value", &ours[0], &reference[0]),
                ("input gradient", &ours[1], &reference[1]),
                ("residual gradient", &ours[2], &reference[2]),
            ] {
                let err = max_rel_diff(a, e);
                assert!(err < tol, "{name} ({dtype:?}): {what} differs by {err:.2e}");
            }
        }
    }
}

/// The CPU kernels' image ↔ tokens transposes against candle's permuted copy: values bit for bit
/// and the gradient of a weighted sum, on shapes off the tile grid and above the size where the
/// pool shares the tiles.
#[test]
fn image_tokens_transposes_match_candles_permute_with_gradients() {
    let mut rng = Rng::new(11);
    for (b, c, h, w) in [(2, 37, 5, 7), (1, 1, 1, 1), (2, 70, 33, 31)] {
        let x = Var::from_tensor(&normal(&[b, c, h, w], DType::F32, &mut rng)).unwrap();
        let tokens = image_to_tokens(x.as_tensor()).unwrap();
        let expected = x
            .as_tensor()
            .permute((0, 2, 3, 1))
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b, h * w, c))
            .unwrap();
        assert_eq!(tokens.dims(), expected.dims());
        assert_eq!(
            max_diff(&tokens, &expected),
            0.0,
            "{b}×{c}×{h}×{w} to tokens"
        );
        let image = tokens_to_image(&tokens, h, w).unwrap();
        assert_eq!(max_diff(&image, x.as_tensor()), 0.0, "{b}×{c}×{h}×{w} back");

        // The gradient of Σ r ⊙ y through one transpose is `r` permuted back; through both, `r`.
        let r = normal(&[b, h * w, c], DType::F32, &mut rng);
        let grads = (tokens * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let expected_grad = r
            .reshape((b, h, w, c))
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap()
            .contiguous()
            .unwrap();
        let grad = grads.get(x.as_tensor()).expect("x gets a gradient");
        assert_eq!(
            max_diff(grad, &expected_grad),
            0.0,
            "{b}×{c}×{h}×{w} gradient"
        );
        let round_trip = tokens_to_image(&image_to_tokens(x.as_tensor()).unwrap(), h, w).unwrap();
        let r_image = normal(&[b, c, h, w], DType::F32, &mut rng);
        let grads = (round_trip * &r_image)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad = grads.get(x.as_tensor()).expect("x gets a gradient");
        assert_eq!(
            max_diff(grad, &r_image),
            0.0,
            "{b}×{c}×{h}×{w} round trip gradient"
        );
    }
}
