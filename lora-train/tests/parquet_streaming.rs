//! A parquet dataset larger than what the reader may hold: a few thousand rows of incompressible
//! images in row groups of 100, scanned and decoded in order while the process's peak memory
//! stays far below the file's size. Its own test binary, so no other test shares the process
//! whose peak is measured.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use image::{ImageFormat, Rgb, RgbImage};
use lora_train::dataset::{Dataset, ScanOptions};
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

const ROWS: usize = 3000;
const ROWS_PER_GROUP: usize = 100;
const SIDE: u32 = 112;

/// The `datasets` Image feature (a struct of bytes and path) and a text column.
const SCHEMA: &str = "message schema {
    optional group image {
        optional binary bytes;
        optional binary path (STRING);
    }
    optional binary text (STRING);
}";

/// Row `row`'s PNG: noise (so the bytes do not compress) from a fixed generator, with the row
/// number written into pixel (0, 0) so that order can be checked after decoding.
fn png_of_row(row: usize, state: &mut u64) -> Vec<u8> {
    let mut image = RgbImage::new(SIDE, SIDE);
    for pixel in image.pixels_mut() {
        // xorshift64: deterministic noise without a dependency.
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let bytes = state.to_le_bytes();
        *pixel = Rgb([bytes[0], bytes[1], bytes[2]]);
    }
    image.put_pixel(0, 0, Rgb([(row % 256) as u8, (row / 256) as u8, 7]));
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png)
        .unwrap();
    png
}

fn write_dataset(path: &Path) {
    let schema = Arc::new(parse_message_type(SCHEMA).unwrap());
    let properties = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let mut writer =
        SerializedFileWriter::new(File::create(path).unwrap(), schema, properties).unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for first in (0..ROWS).step_by(ROWS_PER_GROUP) {
        let rows = first..(first + ROWS_PER_GROUP).min(ROWS);
        let images: Vec<ByteArray> = rows
            .clone()
            .map(|r| ByteArray::from(png_of_row(r, &mut state)))
            .collect();
        let captions: Vec<ByteArray> = rows
            .clone()
            .map(|r| ByteArray::from(format!("row {r}").as_str()))
            .collect();
        let n = images.len();
        let mut group = writer.next_row_group().unwrap();
        // Leaves in schema order: image.bytes (present: definition level 2), image.path (null
        // inside a present struct: level 1), text (present: level 1).
        let columns: [(Vec<ByteArray>, Vec<i16>); 3] = [
            (images, vec![2; n]),
            (Vec::new(), vec![1; n]),
            (captions, vec![1; n]),
        ];
        for (values, levels) in columns {
            let mut column = group.next_column().unwrap().expect("a column per leaf");
            column
                .typed::<ByteArrayType>()
                .write_batch(&values, Some(&levels), None)
                .unwrap();
            column.close().unwrap();
        }
        group.close().unwrap();
    }
    writer.close().unwrap();
}

/// The process's peak resident memory so far (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/self/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in kB");
    kib * 1024
}

#[test]
fn a_parquet_file_is_read_a_few_rows_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("large.parquet");
    write_dataset(&path);
    let file_size = std::fs::metadata(&path).unwrap().len();
    assert!(file_size > 100 << 20, "{file_size} bytes");
    // Writing the file raised the peak; reset it (Linux: 5 → clear_refs resets VmHWM to the
    // current RSS) so that what follows is measured alone.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = peak_rss();

    let dataset = Dataset::scan(&path, &ScanOptions::default()).unwrap();
    assert_eq!(dataset.items.len(), ROWS);
    let mut seen = 0;
    for (row, (item, image)) in dataset.items.iter().zip(dataset.images()).enumerate() {
        assert_eq!(item.caption, format!("row {row}"));
        assert_eq!(item.size, (SIDE as usize, SIDE as usize));
        let marker = image.unwrap().to_rgb8().get_pixel(0, 0).0;
        assert_eq!(
            marker,
            [(row % 256) as u8, (row / 256) as u8, 7],
            "row {row}"
        );
        seen += 1;
    }
    assert_eq!(seen, ROWS);

    // The scan and the pass over the images together hold a few rows and a page buffer or two:
    // a reader that held the file would raise the peak by its size.
    let growth = peak_rss().saturating_sub(before);
    eprintln!("file {file_size} bytes, peak memory growth {growth} bytes");
    assert!(
        growth < 16 << 20,
        "peak memory grew by {growth} bytes reading a {file_size}-byte file"
    );
}
