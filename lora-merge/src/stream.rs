//! A streaming safetensors writer: the header is computed from the planned names, dtypes and
//! shapes, then each tensor's bytes are produced and written in order, so only a few tensors are
//! ever in memory. Tensors are produced in parallel batches (rayon) and written in order by a
//! writer thread, overlapping the two.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{ensure, Context, Result};
use rayon::prelude::*;
use safetensors::Dtype;
use serde_json::{json, Map, Value};

/// One tensor of the output, as the header will describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// safetensors' header: names sorted (as every writer does), data laid out in that order,
/// padded with spaces to a multiple of 8 bytes so the data stays aligned.
fn header_bytes(plan: &[PlannedTensor], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut header = Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut offset = 0usize;
    for t in plan {
        let end = offset + t.byte_len();
        let entry = json!({
            "dtype": format!("{:?}", t.dtype),
            "shape": t.shape,
            "data_offsets": [offset, end],
        });
        ensure!(
            header.insert(t.name.clone(), entry).is_none(),
            "tensor `{}` is planned twice",
            t.name
        );
        offset = end;
    }
    let mut bytes = serde_json::to_vec(&Value::Object(header))?;
    bytes.resize(bytes.len().next_multiple_of(8), b' ');
    Ok(bytes)
}

/// Bytes written between two requests to start writing them to disk
/// ([`lora_core::io::start_writeback`]).
const WRITEBACK_BYTES: u64 = 16 << 20;

/// Writes the safetensors file `path` (atomically: temp file + rename) holding `plan`'s tensors,
/// whose bytes `produce(i)` returns for `plan[i]` (dropped once written). `plan` must be sorted
/// by name.
pub fn write_streaming<Bytes: AsRef<[u8]> + Send>(
    path: &Path,
    plan: &[PlannedTensor],
    metadata: &BTreeMap<String, String>,
    produce: impl Fn(usize) -> Result<Bytes> + Sync,
) -> Result<()> {
    ensure!(
        plan.windows(2).all(|w| w[0].name < w[1].name),
        "internal: the tensor plan for {} is not sorted by name",
        path.display()
    );
    let header = header_bytes(plan, metadata)?;
    lora_core::io::write_atomic(path, |temp| {
        let file =
            File::create(temp).with_context(|| format!("cannot create {}", temp.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        // Batches of one tensor per thread are produced while a writer thread writes the batch
        // before (in order), so neither waits for the other; at most three batches are in memory.
        let batch = rayon::current_num_threads().max(1);
        let indices: Vec<usize> = (0..plan.len()).collect();
        std::thread::scope(|scope| {
            let (send, receive) = std::sync::mpsc::sync_channel::<(usize, Result<Bytes>)>(batch);
            let writer = scope.spawn(move || -> Result<()> {
                // Bytes handed to `out` so far, and those already sent on their way to disk.
                let (mut written, mut started) = ((8 + header.len()) as u64, 0u64);
                for (i, bytes) in receive {
                    let bytes = bytes?;
                    let bytes = bytes.as_ref();
                    ensure!(
                        bytes.len() == plan[i].byte_len(),
                        "internal: tensor `{}` produced {} bytes, planned {}",
                        plan[i].name,
                        bytes.len(),
                        plan[i].byte_len()
                    );
                    out.write_all(bytes)?;
                    written += bytes.len() as u64;
                    if written - started >= WRITEBACK_BYTES {
                        out.flush()?;
                        lora_core::io::start_writeback(out.get_ref(), started, written - started);
                        started = written;
                    }
                }
                out.flush()?;
                Ok(())
            });
            'produce: for chunk in indices.chunks(batch) {
                let produced: Vec<Result<Bytes>> = chunk.par_iter().map(|&i| produce(i)).collect();
                for item in chunk.iter().copied().zip(produced) {
                    // A closed channel means the writer stopped on an error, which it returns.
                    if send.send(item).is_err() {
                        break 'produce;
                    }
                }
            }
            drop(send);
            writer
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_files_read_back_with_the_safetensors_crate() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("t.safetensors");
        let plan = vec![
            PlannedTensor {
                name: "a".into(),
                dtype: Dtype::F32,
                shape: vec![2, 3],
            },
            PlannedTensor {
                name: "b".into(),
                dtype: Dtype::F16,
                shape: vec![3],
            },
        ];
        let metadata = BTreeMap::from([("k".to_string(), "v".to_string())]);
        write_streaming(&path, &plan, &metadata, |i| {
            Ok(vec![i as u8 + 1; plan[i].byte_len()])
        })?;
        let bytes = std::fs::read(&path)?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
        assert_eq!(header.metadata().as_ref().unwrap()["k"], "v");
        let file = safetensors::SafeTensors::deserialize(&bytes)?;
        let b = file.tensor("b")?;
        assert_eq!((b.dtype(), b.shape()), (Dtype::F16, &[3][..]));
        assert_eq!(b.data(), &[2u8; 6]);
        assert_eq!(file.tensor("a")?.data(), &[1u8; 24]);
        Ok(())
    }

    /// Tensors past [`WRITEBACK_BYTES`] in all, so writeback starts between them: every byte
    /// still lands where the header says.
    #[test]
    fn large_outputs_read_back_whole() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("t.safetensors");
        let values = (WRITEBACK_BYTES / 4 * 3 / 5) as usize; // 0.6 × the interval per tensor
        let plan: Vec<PlannedTensor> = (0..4)
            .map(|i| PlannedTensor {
                name: format!("t{i}"),
                dtype: Dtype::F32,
                shape: vec![values],
            })
            .collect();
        let fill = |i: usize| (0..plan[i].byte_len()).map(move |b| (b * 7 + i) as u8);
        write_streaming(&path, &plan, &BTreeMap::new(), |i| {
            Ok(fill(i).collect::<Vec<u8>>())
        })?;
        let bytes = std::fs::read(&path)?;
        let file = safetensors::SafeTensors::deserialize(&bytes)?;
        for (i, t) in plan.iter().enumerate() {
            assert!(
                file.tensor(&t.name)?.data().iter().copied().eq(fill(i)),
                "{}",
                t.name
            );
        }
        Ok(())
    }

    #[test]
    fn a_failing_producer_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let plan = vec![PlannedTensor {
            name: "a".into(),
            dtype: Dtype::F32,
            shape: vec![4],
        }];
        let err = write_streaming(&path, &plan, &BTreeMap::new(), |_| -> Result<Vec<u8>> {
            anyhow::bail!("disk on fire")
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("disk on fire"));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
