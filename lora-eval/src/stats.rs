//! A processed image set kept on disk (`--save-stats`), so a reference set goes through the
//! network once: a safetensors file with pytorch-fid's `mu` and `sigma` (f64) and the per-image
//! `features` and `logits_unbiased` (f32) that KID and IS need.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use lora_core::io::{read_safetensors, write_safetensors_atomic};
use nalgebra::{DMatrix, DVector};

use crate::features::FeatureRows;
use crate::frechet::GaussianStats;

/// The `format` metadata value that marks our statistics files.
pub const STATS_FORMAT: &str = "lora-eval feature statistics 1";

/// An image set as the metrics see it: its Gaussian, and the rows when they are known.
#[derive(Debug, Clone)]
pub struct FeatureSet {
    /// Where it came from (a folder or a statistics file), for reports.
    pub origin: String,
    pub stats: GaussianStats,
    /// Pool features per image (KID); absent in statistics with only `mu`/`sigma`.
    pub pool: Option<FeatureRows>,
    /// Unbiased logits per image (IS).
    pub logits: Option<FeatureRows>,
    /// Descriptive settings saved with the statistics (weights hash, resize mode, …).
    pub metadata: BTreeMap<String, String>,
}

impl FeatureSet {
    pub fn from_rows(
        origin: String,
        pool: FeatureRows,
        logits: FeatureRows,
        metadata: BTreeMap<String, String>,
    ) -> Result<Self> {
        let stats = GaussianStats::from_features(&pool)
            .with_context(|| format!("the images of {origin}"))?;
        Ok(Self {
            origin,
            stats,
            pool: Some(pool),
            logits: Some(logits),
            metadata,
        })
    }

    pub fn count(&self) -> usize {
        self.stats.count
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let d = self.stats.dim();
        let mut tensors = vec![
            (
                "mu".to_owned(),
                Tensor::from_slice(self.stats.mean.as_slice(), d, &Device::Cpu)?,
            ),
            (
                "sigma".to_owned(),
                // Symmetric, so column-major storage reads the same as row-major.
                Tensor::from_slice(self.stats.covariance.as_slice(), (d, d), &Device::Cpu)?,
            ),
        ];
        for (key, rows) in [("features", &self.pool), ("logits_unbiased", &self.logits)] {
            if let Some(rows) = rows {
                let t = Tensor::from_slice(&rows.data, (rows.rows(), rows.dim), &Device::Cpu)?;
                tensors.push((key.to_owned(), t));
            }
        }
        let mut metadata = self.metadata.clone();
        metadata.insert("format".into(), STATS_FORMAT.into());
        metadata.insert("count".into(), self.count().to_string());
        metadata.insert("source".into(), self.origin.clone());
        write_safetensors_atomic(path, &tensors, metadata)
            .with_context(|| format!("writing feature statistics {}", path.display()))
    }

    /// Reads statistics written by [`save`](Self::save) (or any safetensors file with `mu`
    /// `[d]` and `sigma` `[d, d]`, e.g. converted from pytorch-fid's `.npz`).
    pub fn load(path: &Path) -> Result<Self> {
        let contents = read_safetensors(path, &Device::Cpu)?;
        let get = |key: &str| {
            contents.tensors.get(key).with_context(|| {
                format!(
                    "{} is not a feature statistics file: it has no `{key}` tensor (found: {:?})",
                    path.display(),
                    contents.tensors.keys().collect::<Vec<_>>()
                )
            })
        };
        let (mu, sigma) = (get("mu")?, get("sigma")?);
        let d = mu.dims1().ok().filter(|&d| d > 0).with_context(|| {
            format!(
                "{}: `mu` has shape {:?}; expected [d]",
                path.display(),
                mu.dims()
            )
        })?;
        ensure!(
            sigma.dims() == [d, d],
            "{}: `sigma` has shape {:?}; expected [{d}, {d}] to match `mu`",
            path.display(),
            sigma.dims()
        );
        let floats = |t: &Tensor| -> Result<Vec<f64>> {
            let values = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            ensure!(
                values.iter().all(|v| v.is_finite()),
                "{}: the statistics hold NaN or infinite values",
                path.display()
            );
            Ok(values)
        };
        let mean = DVector::from_vec(floats(mu)?);
        let covariance = DMatrix::from_row_slice(d, d, &floats(sigma)?);
        let rows = |key: &str, dim: Option<usize>| -> Result<Option<FeatureRows>> {
            let Some(t) = contents.tensors.get(key) else {
                return Ok(None);
            };
            let (n, width) = t.dims2().with_context(|| {
                format!(
                    "{}: `{key}` has shape {:?}; expected [images, dim]",
                    path.display(),
                    t.dims()
                )
            })?;
            if let Some(dim) = dim {
                ensure!(
                    width == dim,
                    "{}: `{key}` has {width} columns; expected {dim}",
                    path.display()
                );
            }
            let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            ensure!(
                n >= 2,
                "{}: `{key}` holds {n} rows; need at least 2",
                path.display()
            );
            Ok(Some(FeatureRows::new(width, values)?))
        };
        let pool = rows("features", Some(d))?;
        let logits = rows("logits_unbiased", None)?;
        let count = match (&pool, contents.metadata.get("count")) {
            (Some(rows), _) => rows.rows(),
            (None, Some(count)) => count.parse().with_context(|| {
                format!(
                    "{}: metadata `count` = {count:?} is not a number",
                    path.display()
                )
            })?,
            (None, None) => bail!(
                "{}: neither `features` nor a `count` entry says how many images the statistics \
                 describe",
                path.display()
            ),
        };
        if let (Some(pool), Some(logits)) = (&pool, &logits) {
            ensure!(
                pool.rows() == logits.rows(),
                "{}: `features` has {} rows but `logits_unbiased` has {}",
                path.display(),
                pool.rows(),
                logits.rows()
            );
        }
        Ok(Self {
            origin: path.display().to_string(),
            stats: GaussianStats {
                mean,
                covariance,
                count,
            },
            pool,
            logits,
            metadata: contents.metadata,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> FeatureSet {
        let pool = FeatureRows::new(2, vec![0.0, 1.0, 2.0, 0.5, 1.0, 3.0]).unwrap();
        let logits = FeatureRows::new(3, vec![0.1; 9]).unwrap();
        FeatureSet::from_rows("test".into(), pool, logits, BTreeMap::new()).unwrap()
    }

    #[test]
    fn saved_statistics_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.safetensors");
        let original = set();
        original.save(&path).unwrap();
        let read = FeatureSet::load(&path).unwrap();
        assert_eq!(read.count(), 3);
        assert_eq!(read.stats.mean, original.stats.mean);
        assert_eq!(read.stats.covariance, original.stats.covariance);
        assert_eq!(read.pool, original.pool);
        assert_eq!(read.logits, original.logits);
        assert_eq!(read.metadata["format"], STATS_FORMAT);
    }

    #[test]
    fn bad_statistics_name_the_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        let write = |tensors: Vec<(&str, Tensor)>| {
            let tensors: Vec<(String, Tensor)> = tensors
                .into_iter()
                .map(|(k, t)| (k.to_owned(), t))
                .collect();
            write_safetensors_atomic(&path, &tensors, BTreeMap::new()).unwrap();
            format!("{:#}", FeatureSet::load(&path).unwrap_err())
        };
        let cpu = &Device::Cpu;
        let mu = Tensor::new(&[0.0f64, 1.0], cpu).unwrap();
        let err = write(vec![("mu", mu.clone())]);
        assert!(
            err.contains("bad.safetensors") && err.contains("`sigma`"),
            "{err}"
        );
        let err = write(vec![
            ("mu", mu.clone()),
            ("sigma", Tensor::zeros((3, 3), DType::F64, cpu).unwrap()),
        ]);
        assert!(err.contains("[3, 3]") && err.contains("[2, 2]"), "{err}");
        let nan = Tensor::new(&[f64::NAN, 1.0], cpu).unwrap();
        let err = write(vec![
            ("mu", nan),
            ("sigma", Tensor::zeros((2, 2), DType::F64, cpu).unwrap()),
        ]);
        assert!(err.contains("NaN"), "{err}");
        let err = write(vec![
            ("mu", mu),
            ("sigma", Tensor::zeros((2, 2), DType::F64, cpu).unwrap()),
        ]);
        assert!(err.contains("count"), "{err}");
    }
}
