//! Every reader of `.safetensors` files refuses a damaged or hostile file with an error that
//! names the file: empty, cut inside its 8-byte length or its header, a header length of 2^62,
//! a header that is not JSON, a tensor whose offsets run past the end of the data, overlapping
//! tensors, a dtype and shape that do not match the byte length, a name given twice. None may
//! panic. Adapter tensors stored as f64 or integers are converted, not misread.

mod common;

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::Device;
use lora_toolkit::core::formats::single_file::SingleFile;
use lora_toolkit::core::io::read_safetensors;
use lora_toolkit::core::io::weights::mmap_safetensors;
use lora_toolkit::core::AdapterFile;
use lora_toolkit::infer::output::read_latents;
use lora_toolkit::merge::base_model::BaseModel;
use lora_toolkit::train::checkpoint::Checkpoint;

/// A safetensors file: the 8-byte little-endian header length, the header, the data.
fn file_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// Each hostile file, by what is wrong with it.
fn hostile_files(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let tensor = |dtype: &str, shape: &str, start: usize, end: usize| {
        format!(r#""a":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{start},{end}]}}"#)
    };
    let one = tensor("F32", "[2]", 0, 8);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("cut inside the length", vec![16, 0, 0]),
        ("cut inside the header", {
            let mut b = file_bytes(&format!("{{{one}}}"), &[0; 8]);
            b.truncate(20);
            b
        }),
        ("header length 2^62", {
            let mut b = (1u64 << 62).to_le_bytes().to_vec();
            b.extend_from_slice(b"{}");
            b
        }),
        ("header not JSON", file_bytes("{\"a\": [1, 2", &[])),
        (
            "offsets past the end",
            file_bytes(&format!("{{{}}}", tensor("F32", "[2]", 0, 800)), &[0; 8]),
        ),
        (
            "overlapping tensors",
            file_bytes(
                &format!(
                    "{{{one},{}}}",
                    tensor("F32", "[2]", 4, 12).replacen("\"a\"", "\"b\"", 1)
                ),
                &[0; 12],
            ),
        ),
        (
            "dtype and shape against the byte length",
            file_bytes(&format!("{{{}}}", tensor("F32", "[3]", 0, 8)), &[0; 8]),
        ),
        (
            "shape overflowing usize",
            file_bytes(
                &format!(
                    "{{{}}}",
                    tensor("F32", "[4294967296,4294967296,4294967296]", 0, 8)
                ),
                &[0; 8],
            ),
        ),
        (
            "a name given twice",
            file_bytes(
                &format!("{{{one},{}}}", tensor("F32", "[2]", 8, 16)),
                &[0; 16],
            ),
        ),
    ];
    cases
        .into_iter()
        .enumerate()
        .map(|(i, (what, bytes))| {
            let path = dir.join(format!("hostile-{i}.safetensors"));
            std::fs::write(&path, bytes).unwrap();
            (what, path)
        })
        .collect()
}

/// `read` must fail, naming the file, without panicking.
fn refuses(reader: &str, what: &str, path: &Path, read: impl FnOnce() -> Result<()>) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(read));
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    match outcome {
        Err(_) => panic!("{reader} panicked on a file with {what}"),
        Ok(Ok(())) => panic!("{reader} accepted a file with {what}"),
        Ok(Err(e)) => {
            let msg = format!("{e:#}");
            assert!(
                msg.contains(&name),
                "{reader}, file with {what}: the error does not name the file: {msg}"
            );
        }
    }
}

#[test]
fn every_reader_refuses_hostile_files_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let files = hostile_files(dir.path());
    assert_eq!(files.len(), 10);
    for (what, path) in &files {
        refuses("read_safetensors", what, path, || {
            read_safetensors(path, &Device::Cpu).map(drop)
        });
        refuses("AdapterFile::read", what, path, || {
            AdapterFile::read(path, &Device::Cpu).map(drop)
        });
        refuses("mmap_safetensors", what, path, || {
            mmap_safetensors(std::slice::from_ref(path)).map(drop)
        });
        refuses("SingleFile::open", what, path, || {
            SingleFile::open(path, true).map(drop)
        });
        refuses("BaseModel::open", what, path, || {
            BaseModel::open(path).map(drop)
        });
        refuses("Checkpoint::load", what, path, || {
            Checkpoint::load(
                path,
                &[],
                &["adam_m", "adam_v"],
                false,
                &|_| Ok(()),
                &Device::Cpu,
            )
            .map(drop)
        });
        refuses("read_latents", what, path, || {
            read_latents(path, &Device::Cpu).map(drop)
        });
    }
    // The same bytes made right are read: what the readers refuse above is the damage.
    let good = dir.path().join("good.safetensors");
    let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    std::fs::write(&good, file_bytes(header, &[0; 8])).unwrap();
    assert_eq!(
        read_safetensors(&good, &Device::Cpu).unwrap().tensors["a"].dims(),
        [2]
    );
    assert!(mmap_safetensors(&[good]).is_ok());
}

/// An adapter whose tensors are stored as f64 (or any other numeric dtype) reads as the same
/// f32 modules as the f32 file it was made from.
#[test]
fn adapter_tensors_of_other_dtypes_are_converted() -> Result<()> {
    let source = common::fixtures().join("sd1-tiny/adapter_kohya.safetensors");
    let tensors = candle_core::safetensors::load(&source, &Device::Cpu)?;
    let dir = tempfile::tempdir()?;
    let wide = dir.path().join("f64.safetensors");
    let converted: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_dtype(candle_core::DType::F64)?)))
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&converted, &wide)?;
    let (a, b) = (
        AdapterFile::read(&source, &Device::Cpu)?,
        AdapterFile::read(&wide, &Device::Cpu)?,
    );
    assert_eq!(a.raw_modules().len(), b.raw_modules().len());
    assert!(!a.raw_modules().is_empty());
    for (x, y) in a.raw_modules().iter().zip(b.raw_modules()) {
        assert_eq!(x.name, y.name);
        for (p, q) in [(&x.down, &y.down), (&x.up, &y.up)] {
            assert_eq!(q.dtype(), candle_core::DType::F32);
            assert_eq!(
                p.flatten_all()?.to_vec1::<f32>()?,
                q.flatten_all()?.to_vec1::<f32>()?,
                "{}",
                x.name
            );
        }
    }
    Ok(())
}
