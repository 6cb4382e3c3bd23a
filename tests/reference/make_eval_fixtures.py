"""Reference values for lora-eval's metrics (tests/eval_metrics.rs), from the tools people cite.

Writes, under tests/fixtures/eval/:
- real/ and fake/: small image folders made here with PIL (different sizes and aspect ratios,
  an RGB PNG, a greyscale PNG, an RGBA PNG, a JPEG), a few KB each.
- expected.json:
  - "preprocess": for every image, pytorch-fid's network input (PIL `convert("RGB")`,
    `ToTensor`, `F.interpolate(size=(299, 299), mode="bilinear", align_corners=False)`, `2x − 1`),
    summarised as per-channel sums and sums of squares (f64); the full row 150 of each channel
    goes to preprocess_rows.safetensors (one `[3, 299]` f32 tensor per file name).
  - "math": FID (pytorch-fid's `calculate_frechet_distance` on `np.mean`/`np.cov` of the
    features), IS (torch-fidelity's `isc_features_to_metric`, unshuffled and shuffled) and KID
    (torch-fidelity's `kid_features_to_metric`, on f64 and on f32 features) for feature sets
    given by a formula that tests/eval_metrics.rs evaluates too (`formula_features` below), so
    nothing large is stored. One FID case has fewer rows than dimensions (singular covariances),
    as real evaluations on few images do.
  - "end_to_end": what `lora-eval metrics` must print for real/ against fake/ with the
    deterministic stand-in Inception weights (inception_weights.py): pytorch-fid's
    `get_activations` (its own resize and normalisation, batch 1 as the sizes differ), on all
    images ("all") and on the PNGs only ("png_only": no JPEG decoder in between), and
    `calculate_frechet_distance` for FID; torch-fidelity's `isc_features_to_metric` on the
    unbiased logits (pool · fc.weightᵀ) with 2 splits, unshuffled; `kid_features_to_metric` with
    100 subsets of the smaller set's size, seed 2020, on f64 features.
Run from the repository root: python tests/reference/make_eval_fixtures.py
"""

import json
import os

import numpy as np
import PIL
import pytorch_fid
import scipy
import torch
import torch.nn.functional as F
import torch_fidelity
from PIL import Image
from safetensors.torch import save_file
from pytorch_fid.fid_score import calculate_frechet_distance
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

OUT = os.path.join(os.path.dirname(__file__), "..", "fixtures", "eval")


def formula_features(n, d, phase, scale, shift):
    """f32 features x[i, j] = scale·sin(0.37 i + 1.13 j + phase) + 0.5 cos(0.071 i j + phase) + shift,
    evaluated in f64 and rounded once (tests/eval_metrics.rs does the same)."""
    i, j = np.meshgrid(np.arange(n, dtype=np.float64), np.arange(d, dtype=np.float64), indexing="ij")
    v = scale * np.sin(0.37 * i + 1.13 * j + phase) + 0.5 * np.cos(0.071 * i * j + phase) + shift
    return v.astype(np.float32)


def pattern(w, h, seed, mode):
    """A smooth colour pattern (JPEG-friendly) with some noise, deterministic."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    channels = []
    for c in range(3):
        fx, fy, ph = rng.uniform(0.05, 0.4), rng.uniform(0.05, 0.4), rng.uniform(0, 6.28)
        channels.append(127.5 + 100 * np.sin(fx * x + ph) * np.cos(fy * y - ph))
    rgb = np.stack(channels, -1) + rng.normal(0, 8, (h, w, 3))
    rgb = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":
        alpha = np.clip(rng.uniform(0, 255, (h, w)), 0, 255).astype(np.uint8)
        img = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    return img


# (name, width, height, mode, format)
REAL = [
    ("r00.png", 40, 30, "RGB", "PNG"),
    ("r01.png", 64, 64, "RGB", "PNG"),
    ("r02.png", 17, 50, "RGB", "PNG"),
    ("r03_grey.png", 33, 33, "L", "PNG"),
    ("r04_alpha.png", 48, 20, "RGBA", "PNG"),
    ("r05.jpg", 56, 40, "RGB", "JPEG"),
    ("r06.jpg", 320, 310, "RGB", "JPEG"),
    ("r07.png", 25, 25, "RGB", "PNG"),
    ("r08.png", 45, 60, "RGB", "PNG"),
    ("r09.png", 30, 30, "RGB", "PNG"),
    ("r10.png", 70, 35, "RGB", "PNG"),
    ("r11.png", 12, 18, "RGB", "PNG"),
]
FAKE = [
    ("f00.png", 32, 32, "RGB", "PNG"),
    ("f01.png", 32, 32, "RGB", "PNG"),
    ("f02.jpg", 48, 32, "RGB", "JPEG"),
    ("f03_grey.png", 32, 32, "L", "PNG"),
    ("f04_alpha.png", 32, 32, "RGBA", "PNG"),
    ("f05.png", 20, 44, "RGB", "PNG"),
    ("f06.png", 32, 32, "RGB", "PNG"),
    ("f07.png", 64, 48, "RGB", "PNG"),
    ("f08.png", 32, 32, "RGB", "PNG"),
    ("f09.png", 16, 16, "RGB", "PNG"),
]


def write_images(folder, specs, seed0):
    os.makedirs(folder, exist_ok=True)
    for k, (name, w, h, mode, fmt) in enumerate(specs):
        img = pattern(w, h, seed0 + k, mode)
        kwargs = {"quality": 90} if fmt == "JPEG" else {}
        img.save(os.path.join(folder, name), fmt, **kwargs)


def pytorch_fid_input(path):
    """What pytorch-fid's InceptionV3 feeds its first conv for one image file."""
    img = Image.open(path).convert("RGB")
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)[None]
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return (2 * x - 1)[0]


def preprocess_summary(folder, specs, rows):
    out = {}
    for name, *_ in specs:
        x = pytorch_fid_input(os.path.join(folder, name))
        rows[name] = x[:, 150, :].contiguous()
        x = x.double()
        out[name] = {"sum": x.sum(dim=(1, 2)).tolist(), "sum_sq": (x * x).sum(dim=(1, 2)).tolist()}
    return out


def fid_of(a, b):
    """pytorch-fid's FID, and the same distance with tr √(Σ₁Σ₂) from two symmetric
    eigendecompositions in numpy (lora-eval's route): with fewer rows than dimensions the first
    sums square roots of ~2000 rounding-noise eigenvalues of the singular product."""
    mu1, s1 = np.mean(a, axis=0), np.cov(a, rowvar=False)
    mu2, s2 = np.mean(b, axis=0), np.cov(b, rowvar=False)
    reference = float(calculate_frechet_distance(mu1, s1, mu2, s2))
    w, v = np.linalg.eigh(s1)
    factor = v * np.sqrt(np.clip(w, 0, None))
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(factor.T @ s2 @ factor), 0, None)).sum()
    diff = a.astype(np.float64).mean(0) - b.astype(np.float64).mean(0)
    symmetric = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * cross)
    return reference, symmetric


def math_cases():
    cases = {"fid": [], "is": [], "kid": []}
    for n_a, n_b, d in [(60, 50, 16), (40, 30, 2048)]:
        a = formula_features(n_a, d, 0.0, 1.0, 0.0)
        b = formula_features(n_b, d, 0.5, 1.2, 0.1)
        fid, fid_eigh = fid_of(a, b)
        cases["fid"].append({"a": [n_a, d, 0.0, 1.0, 0.0], "b": [n_b, d, 0.5, 1.2, 0.1], "fid": fid, "fid_numpy_eigh": fid_eigh})
    logits = torch.from_numpy(formula_features(23, 1008, 0.3, 4.0, 0.0))
    for shuffle, seed in [(False, 2020), (True, 2020), (True, 7)]:
        m = isc_features_to_metric(logits, splits=10, shuffle=shuffle, rng_seed=seed)
        cases["is"].append(
            {
                "logits": [23, 1008, 0.3, 4.0, 0.0],
                "splits": 10,
                "shuffle": seed if shuffle else None,
                "mean": m["inception_score_mean"],
                "std": m["inception_score_std"],
            }
        )
    a = formula_features(40, 64, 0.0, 1.0, 0.0)
    b = formula_features(35, 64, 0.2, 1.5, 0.3)
    for subsets, size, seed in [(50, 20, 2020), (10, 1000, 2020), (5, 30, 11)]:
        entry = {"a": [40, 64, 0.0, 1.0, 0.0], "b": [35, 64, 0.2, 1.5, 0.3], "subsets": subsets, "seed": seed}
        size = min(size, 35)  # torch-fidelity refuses a size above the set; lora-eval caps it
        entry["subset_size"] = size
        kw = dict(kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False)
        for label, dtype in [("f64", torch.float64), ("f32", torch.float32)]:
            m = kid_features_to_metric(torch.from_numpy(a).to(dtype), torch.from_numpy(b).to(dtype), **kw)
            entry[f"mean_{label}"] = m["kernel_inception_distance_mean"]
            entry[f"std_{label}"] = m["kernel_inception_distance_std"]
        cases["kid"].append(entry)
    return cases


def end_to_end(real, fake):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from make_inception_fixtures import build_model
    from pytorch_fid.fid_score import get_activations

    torch.set_num_threads(2)
    model, inception3 = build_model()
    model.resize_input, model.normalize_input = True, True
    fc = inception3.fc.weight.detach().double()

    def features(folder, png_only):
        files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png") or not png_only)
        return torch.from_numpy(get_activations(files, model, 1, 2048, "cpu", num_workers=0)).double()

    return {
        "all": scores(features(real, False), features(fake, False), fc),
        "png_only": scores(features(real, True), features(fake, True), fc),
    }


def scores(a, b, fc):
    mu1, s1 = np.mean(a.float().numpy(), axis=0), np.cov(a.float().numpy(), rowvar=False)
    mu2, s2 = np.mean(b.float().numpy(), axis=0), np.cov(b.float().numpy(), rowvar=False)
    isc = isc_features_to_metric(b @ fc.T, splits=2, shuffle=False)
    size = min(len(a), len(b))
    kid = kid_features_to_metric(a, b, kid_subsets=100, kid_subset_size=size, rng_seed=2020, verbose=False)
    return {
        "fid": float(calculate_frechet_distance(mu1, s1, mu2, s2)),
        "is_mean": isc["inception_score_mean"],
        "is_std": isc["inception_score_std"],
        "is_splits": 2,
        "kid_mean": kid["kernel_inception_distance_mean"],
        "kid_std": kid["kernel_inception_distance_std"],
        "kid_subset_size": size,
        "real_images": len(a),
        "fake_images": len(b),
    }


def main():
    real, fake = os.path.join(OUT, "real"), os.path.join(OUT, "fake")
    write_images(real, REAL, 100)
    write_images(fake, FAKE, 200)
    rows = {}
    expected = {
        "versions": {
            "torch": torch.__version__,
            "pytorch_fid": pytorch_fid.__version__,
            "torch_fidelity": torch_fidelity.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "pillow": PIL.__version__,
        },
        "preprocess": {"real": preprocess_summary(real, REAL, rows), "fake": preprocess_summary(fake, FAKE, rows)},
        "math": math_cases(),
        "end_to_end": end_to_end(real, fake),
    }
    save_file(rows, os.path.join(OUT, "preprocess_rows.safetensors"))
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
