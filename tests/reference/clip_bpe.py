"""The OpenAI CLIP BPE vocabulary, shared by the fixture scripts that build CLIP tokenizers.

The merges come from `bpe_simple_vocab_16e6.txt`, which ships in the `instant-clip-tokenizer`
crate (run `cargo fetch` first) or from `CLIP_BPE_FILE=/path/to/bpe_simple_vocab_16e6.txt[.gz]`.
"""

import gzip
import json
import os
import sys
from glob import glob
from pathlib import Path

# OpenAI's SimpleTokenizer reads merges 1 .. 49152 - 256 - 2 of the file.
FULL_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def bytes_to_unicode():
    """Exactly as in openai/CLIP clip/simple_tokenizer.py."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    cs = [chr(n) for n in cs]
    return dict(zip(bs, cs))


def find_bpe_file():
    env = os.environ.get("CLIP_BPE_FILE")
    if env:
        return Path(env)
    home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))
    hits = sorted(glob(str(home / "registry/src/*/instant-clip-tokenizer-*/bpe_simple_vocab_16e6.txt")))
    if not hits:
        sys.exit(
            "bpe_simple_vocab_16e6.txt not found. Run `cargo fetch` in the workspace (instant-clip-tokenizer "
            "ships it) or set CLIP_BPE_FILE=/path/to/bpe_simple_vocab_16e6.txt[.gz]"
        )
    return Path(hits[-1])


def read_merges(count=FULL_MERGES):
    """The first `count` merges of the CLIP BPE, as pairs."""
    bpe_path = find_bpe_file()
    if bpe_path.suffix == ".gz":
        text = gzip.open(bpe_path).read().decode("utf-8")
    else:
        text = bpe_path.read_text(encoding="utf-8")
    lines = text.split("\n")
    # The file shipped in the crate (like OpenAI's gz) has the odd first line
    # '"bpe_simple_vocab_16e6.txt#version: 0.2'; SimpleTokenizer skips line 0.
    assert "#version" in lines[0], lines[0]
    merges = [tuple(m.split()) for m in lines[1 : count + 1]]
    assert len(merges) == count and all(len(m) == 2 for m in merges)
    return merges


def write_vocabulary(folder: Path, merges):
    """`vocab.json` and `merges.txt` for `merges` in CLIP's layout: the 256 byte tokens, the same
    with `</w>`, one token per merge, then the two specials. Returns the vocabulary size."""
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(m) for m in merges)
    vocab.extend([BOS_TOKEN, EOS_TOKEN])
    encoder = {v: i for i, v in enumerate(vocab)}
    assert len(encoder) == len(vocab) == 512 + len(merges) + 2
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    # HF writes the "#version: 0.2" header line then one merge per line.
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    return len(vocab)
