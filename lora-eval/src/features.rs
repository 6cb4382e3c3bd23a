//! A set of feature vectors (one row per image) and the statistics FID compares.

use anyhow::{ensure, Result};

/// `rows × dim` features, row-major, as the feature network wrote them (f32).
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureRows {
    pub dim: usize,
    pub data: Vec<f32>,
}

impl FeatureRows {
    pub fn new(dim: usize, data: Vec<f32>) -> Result<Self> {
        ensure!(
            dim > 0 && data.len().is_multiple_of(dim),
            "feature rows: {} values do not split into rows of {dim}",
            data.len()
        );
        Ok(Self { dim, data })
    }

    /// No rows yet, of dimension `dim`.
    pub fn empty(dim: usize) -> Self {
        Self {
            dim,
            data: Vec::new(),
        }
    }

    pub fn rows(&self) -> usize {
        self.data.len() / self.dim
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// Appends another set's rows (same dimension).
    pub fn extend(&mut self, other: &FeatureRows) -> Result<()> {
        ensure!(
            other.dim == self.dim,
            "feature rows of dimension {} cannot join rows of dimension {}",
            other.dim,
            self.dim
        );
        self.data.extend_from_slice(&other.data);
        Ok(())
    }
}
