"""PyTorch pickle fixtures for the `--allow-pickle` tests (tests/pickle_inputs.rs).

Writes, under tests/fixtures/pickle/:
- adapter_kohya.pt: the tensors of sd1-tiny/adapter_kohya.safetensors in the archive layout
  `torch.save` writes (PyTorch >= 1.6: a zip of `archive/data.pkl`, `archive/data/<storage>`,
  `archive/byteorder`, `archive/version`), each tensor rebuilt by
  `torch._utils._rebuild_tensor_v2` over a persistent `('storage', torch.FloatStorage, key,
  'cpu', numel)` id. The tests compare what the toolkit reads from it with the safetensors file.
- reduce_payload.pt: the same archive layout whose state dict also maps a key to a `__reduce__`
  payload (`os.system("touch MARKER")`), next to one genuine tensor. `pickle.load` in Python
  would run the command; the toolkit must read the tensor and never run anything.
- only_payload.pt: an archive whose pickle is nothing but such a payload.
- bare_payload.pkl: the payload as a bare pickle stream (the format before PyTorch 1.6).
- model_ldm.ckpt: sd2-tiny/merge/model_ldm.safetensors (f16) as an A1111-style training
  checkpoint: `{"state_dict": {...}, "global_step": 7, "epoch": 1}`.

torch itself is not needed (nor was it installed when these were made): the archive is written
with Python's own `pickle` and `zipfile`, with stand-in classes that pickle under torch's names.
Run from the repository root: python tests/reference/make_pickle_fixtures.py
"""

import collections
import json
import os
import pickle
import struct
import sys
import types
import zipfile

ROOT = os.path.join(os.path.dirname(__file__), "..", "fixtures")
OUT = os.path.join(ROOT, "pickle")
# The file a payload would create if anything ran it; tests/pickle_inputs.rs checks it never does.
MARKER = "/tmp/lora-toolkit-pickle-payload-ran"

SAFETENSORS_DTYPES = {"F32": ("FloatStorage", 4), "F16": ("HalfStorage", 2)}


def read_safetensors(path):
    """{name: (dtype, shape, raw little-endian bytes)} of a safetensors file, read by hand."""
    with open(path, "rb") as f:
        data = f.read()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    body = data[8 + length :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        tensors[name] = (info["dtype"], info["shape"], body[start:end])
    return tensors


def fake_torch():
    """Modules named `torch` and `torch._utils` whose members pickle under torch's names."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    torch._utils = utils

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only pickled, never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for storage, _ in SAFETENSORS_DTYPES.values():
        cls = type(storage, (), {"__module__": "torch", "__qualname__": storage})
        setattr(torch, storage, cls)
    sys.modules["torch"] = torch
    sys.modules["torch._utils"] = utils
    return torch


class Storage:
    def __init__(self, key, storage_class, numel):
        self.key, self.storage_class, self.numel = key, storage_class, numel


class Tensor:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride, step = [], 1
        for dim in reversed(self.shape):
            stride.insert(0, step)
            step *= dim
        rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
        args = (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict())
        return (rebuild, args)


class Payload:
    """What a hostile file carries: unpickling it in Python calls os.system(command)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class ArchivePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.storage_class, obj.key, "cpu", obj.numel)
        return None


def write_archive(path, state, storages):
    """`state` pickled as archive/data.pkl with `storages` ({key: bytes}) beside it."""
    import io

    buffer = io.BytesIO()
    ArchivePickler(buffer, protocol=2).dump(state)
    entries = [("archive/data.pkl", buffer.getvalue()), ("archive/byteorder", b"little")]
    entries += [(f"archive/data/{key}", data) for key, data in storages.items()]
    entries.append(("archive/version", b"3\n"))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in entries:
            # A fixed date, so that rerunning the script rewrites the same bytes.
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)


def tensor_entry(torch, key, dtype, shape, data):
    storage_name, size = SAFETENSORS_DTYPES[dtype]
    storage = Storage(key, getattr(torch, storage_name), len(data) // size)
    return Tensor(storage, shape)


def main():
    os.makedirs(OUT, exist_ok=True)
    torch = fake_torch()
    source = read_safetensors(os.path.join(ROOT, "sd1-tiny", "adapter_kohya.safetensors"))
    state, storages = collections.OrderedDict(), {}
    for i, (name, (dtype, shape, data)) in enumerate(sorted(source.items())):
        state[name] = tensor_entry(torch, str(i), dtype, shape, data)
        storages[str(i)] = data
    write_archive(os.path.join(OUT, "adapter_kohya.pt"), state, storages)

    name, (dtype, shape, data) = sorted(source.items())[0]
    mixed = collections.OrderedDict()
    mixed[name] = tensor_entry(torch, "0", dtype, shape, data)
    mixed["payload"] = Payload(f"touch {MARKER}")
    write_archive(os.path.join(OUT, "reduce_payload.pt"), mixed, {"0": data})

    write_archive(os.path.join(OUT, "only_payload.pt"), Payload(f"touch {MARKER}"), {})

    model = read_safetensors(os.path.join(ROOT, "sd2-tiny", "merge", "model_ldm.safetensors"))
    state, storages = collections.OrderedDict(), {}
    for i, (name, (dtype, shape, data)) in enumerate(sorted(model.items())):
        state[name] = tensor_entry(torch, str(i), dtype, shape, data)
        storages[str(i)] = data
    checkpoint = {"state_dict": state, "global_step": 7, "epoch": 1}
    write_archive(os.path.join(OUT, "model_ldm.ckpt"), checkpoint, storages)

    with open(os.path.join(OUT, "bare_payload.pkl"), "wb") as f:
        pickle.dump({"payload": Payload(f"touch {MARKER}")}, f, protocol=2)


if __name__ == "__main__":
    main()
