"""Writes tests/fixtures/hf-datasets/: parquet datasets made by Hugging Face `datasets` itself from
the tiny training images (run once; the output is committed).

- `imagefolder/`: the five images of tests/fixtures/train-data, flat, with a `metadata.jsonl`
  (`file_name`, `text`) in an order that is not the files' sorted order, so that row order counts.
- `embedded.parquet`: `load_dataset("imagefolder")` of that folder written as `push_to_hub` writes
  its shards (the image bytes embedded through `embed_table_storage`), in row groups of 2 rows, so
  a reader crosses row groups.
- `hub/`: the Hub layout `push_to_hub` makes: `data/train-0000K-of-00002.parquet` (the train
  split in two shards), `data/test-00000-of-00001.parquet`, and a README.md whose `configs:` maps
  the splits to those files. `load_dataset` of the folder reads it back (checked here).
- `classes/`: an image-classification dataset (`image` + `label`, a ClassLabel over the shape
  names) from a folder of class sub-folders, as `imagefolder` infers it, in the same Hub layout.
- `paths.parquet`: the Image feature without bytes, its `path` relative to the parquet file's
  folder (`imagefolder/…`), as a dataset that keeps its images beside the table stores it.
- `broken.parquet`: the embedded dataset with row 1's bytes replaced by bytes that are no image.
- `expected.json`: what `datasets` reads back from each file: per split, the rows' captions (or
  label names) and the SHA-256 of each image's RGB pixels as PIL decodes them.

Usage: python3 tests/reference/make_parquet_fixtures.py  (a few seconds, offline)
"""

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.table import embed_table_storage
from huggingface_hub import DatasetCard, DatasetCardData

ROOT = Path(__file__).resolve().parents[1] / "fixtures"
SOURCE = ROOT / "train-data"
OUT = ROOT / "hf-datasets"

# (file in train-data, caption), in metadata row order.
ROWS = [
    ("red_circle.png", "a red circle on a white background"),
    ("blue_square.png", "a blue square on a white background"),
    ("3_green triangle/small.png", "a green triangle on a white background"),
    ("yellow_circle.png", "a yellow circle on a black background"),
    ("3_green triangle/uncaptioned.png", "a green triangle, no caption file"),
]
CLASSES = {
    "circle": ["red_circle.png", "yellow_circle.png"],
    "square": ["blue_square.png"],
    "triangle": ["3_green triangle/small.png"],
}


def flat_name(source):
    return source.replace("3_green triangle/", "green_")


def pixels_sha256(image):
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def embedded(ds):
    """The dataset with its image bytes embedded, as push_to_hub does before writing a shard."""
    return ds.with_format("arrow").map(embed_table_storage, batched=True).with_format(None)


def write_parquet(ds, path, rows_per_group):
    path.parent.mkdir(parents=True, exist_ok=True)
    embedded(ds).to_parquet(str(path), batch_size=rows_per_group)


def readme(path, splits):
    """A dataset card with the `configs:` that push_to_hub writes for `splits` (name -> glob)."""
    data = DatasetCardData(
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": s, "path": p} for s, p in splits.items()],
            }
        ]
    )
    DatasetCard(f"---\n{data.to_yaml()}\n---\n\n# A test dataset\n").save(str(path))


def rows_of(ds, caption):
    return [
        {"caption": caption(row), "rgb_sha256": pixels_sha256(row["image"])} for row in ds
    ]


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    folder = OUT / "imagefolder"
    folder.mkdir(parents=True)
    with open(folder / "metadata.jsonl", "w") as f:
        for source, caption in ROWS:
            shutil.copy(SOURCE / source, folder / flat_name(source))
            f.write(json.dumps({"file_name": flat_name(source), "text": caption}) + "\n")

    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    assert [r["text"] for r in ds] == [c for _, c in ROWS]
    write_parquet(ds, OUT / "embedded.parquet", rows_per_group=2)
    assert pq.ParquetFile(OUT / "embedded.parquet").metadata.num_row_groups == 3

    hub = OUT / "hub"
    train, test = ds.select(range(4)), ds.select([4])
    write_parquet(train.shard(2, 0, contiguous=True), hub / "data/train-00000-of-00002.parquet", 1000)
    write_parquet(train.shard(2, 1, contiguous=True), hub / "data/train-00001-of-00002.parquet", 1000)
    write_parquet(test, hub / "data/test-00000-of-00001.parquet", 1000)
    readme(hub / "README.md", {"train": "data/train-*", "test": "data/test-*"})
    back = datasets.load_dataset(str(hub))
    assert [r["text"] for r in back["train"]] == [c for _, c in ROWS[:4]], back
    assert [r["text"] for r in back["test"]] == [ROWS[4][1]], back

    with tempfile.TemporaryDirectory() as tmp:
        for label, sources in CLASSES.items():
            (Path(tmp) / label).mkdir()
            for source in sources:
                shutil.copy(SOURCE / source, Path(tmp) / label / flat_name(source))
        classes_ds = datasets.load_dataset("imagefolder", data_dir=tmp, split="train")
        names = classes_ds.features["label"].names
        assert names == list(CLASSES), names
        write_parquet(classes_ds, OUT / "classes/data/train-00000-of-00001.parquet", 1000)
        readme(OUT / "classes/README.md", {"train": "data/train-*"})
    classes_back = datasets.load_dataset(str(OUT / "classes"), split="train")

    # The Image feature with a relative path and no bytes (pyarrow, with the schema metadata
    # `datasets` writes, since `datasets` itself stores absolute paths).
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array(
                [{"bytes": None, "path": f"imagefolder/{flat_name(s)}"} for s, _ in ROWS],
                type=image_type,
            ),
            "text": [c for _, c in ROWS],
        }
    )
    table = table.replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": ds.features.to_dict()}})}
    )
    pq.write_table(table, OUT / "paths.parquet")
    paths_back = datasets.load_dataset(
        "parquet", data_files=str(OUT / "paths.parquet"), split="train"
    )
    assert paths_back.features == ds.features, paths_back.features

    # A row whose bytes do not decode (the rest intact), to name the row in the error.
    good = pq.read_table(OUT / "embedded.parquet")
    images = good.column("image").to_pylist()
    images[1] = {"bytes": b"not an image", "path": images[1]["path"]}
    broken = good.set_column(0, "image", pa.array(images, type=good.schema.field("image").type))
    pq.write_table(broken.replace_schema_metadata(good.schema.metadata), OUT / "broken.parquet")

    embedded_back = datasets.load_dataset(
        "parquet", data_files=str(OUT / "embedded.parquet"), split="train"
    )
    text = lambda row: row["text"]
    expected = {
        "datasets": datasets.__version__,
        "pyarrow": pa.__version__,
        "embedded.parquet": rows_of(embedded_back, text),
        # The files paths.parquet points at, as datasets decodes them from the source folder.
        "paths.parquet": rows_of(ds, text),
        "hub": {split: rows_of(back[split], text) for split in ["train", "test"]},
        "classes": {
            "names": names,
            "train": rows_of(classes_back, lambda row: names[row["label"]]),
        },
    }
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
