"""State files never crash the process or lose data: damaged banks are rejected (or load identical),
loaded banks do not refer to their file, saves are atomic, failed loads change nothing."""
import copy
import dataclasses
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import adapted_imse, image_source
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from imse_kernels import state_file
from imse_kernels.state_file import atomic_write_text, read_bytes, tensor_bytes
from imse_kernels.tta import BankFileError, CodeBank
from imse_kernels.tta.bank_io import read_bank_file, write_bank_file

TESTS = Path(__file__).resolve().parents[1]  # tests/, where helpers.py is
TEMP_NAME = r"\.{name}\.\d+\.[0-9a-f]{{8}}\.tmp"  # what atomic_write_bytes names its temp files


# Two shared cores: intra-op threads only slow these small models down (and fork is safe with one).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def banks(tmp_path_factory):
    d = tmp_path_factory.mktemp("banks")
    big = adapted_imse()
    assert len(big.bank.entries) == 3
    big.save_bank(d / "a.safetensors")
    adapted_imse(()).save_bank(d / "b.safetensors")  # source entry only: smaller
    return {"a": d / "a.safetensors", "b": d / "b.safetensors",
            "A": read_bank_file(d / "a.safetensors"), "B": read_bank_file(d / "b.safetensors"),
            "source_codes": big._start_codes, "channels": big.model.embed_dim}


def same(a, b) -> bool:
    """Deep equality; tensors must agree in dtype, shape and every bit, floats bit for bit."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and tensor_bytes(a) == tensor_bytes(b))
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name))
                                          for f in dataclasses.fields(a))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return isinstance(b, float) and repr(a) == repr(b)
    return type(a) is type(b) and a == b


# ------------------------------------------------------------------ the fuzz

def _split(data: bytes):
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8:8 + n])


def _with_header(data: bytes, header: dict) -> bytes:
    """The same tensor bytes under a re-serialised (edited) safetensors header."""
    n, _ = _split(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


_DTYPES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}


def _json_edit(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """One structural edit of the header, re-serialised consistently (a well-formed safetensors file)."""
    _, header = _split(data)
    info = header["__metadata__"]
    names = sorted(k for k in header if k != "__metadata__")
    kind = rng.choice(["number", "delete-meta-key", "delete-digest", "dtype", "shape", "rename", "manifest",
                       "delete-tensor"])
    meta = json.loads(info["imse_code_bank"])
    if kind == "number":
        if rng.random() < 0.25:
            meta["next_id"] += rng.choice([-1, 1, 7])
        else:
            e = rng.choice(meta["entries"])
            field = rng.choice(["id", "created_at", "weight"])
            e[field] = e[field] + rng.choice([1, -1, 0.5]) if field == "weight" else e[field] + rng.choice([1, -1])
        info["imse_code_bank"] = json.dumps(meta, sort_keys=True)
    elif kind == "delete-meta-key":
        target = rng.choice([meta] + meta["entries"])
        del target[rng.choice(sorted(target))]
        info["imse_code_bank"] = json.dumps(meta, sort_keys=True)
    elif kind == "delete-digest":
        del info["imse_code_bank.sha256"]
    elif kind == "manifest":  # the manifest inside the metadata (its digest not updated)
        m = meta["tensors"][rng.choice(names)]
        m["shape"] = m["shape"] + [1]
        info["imse_code_bank"] = json.dumps(meta, sort_keys=True)
    elif kind == "dtype":  # the tensor's dtype in the safetensors header, same byte size where possible
        t = header[rng.choice(names)]
        size = _DTYPES[t["dtype"]]
        t["dtype"] = rng.choice([k for k, v in _DTYPES.items()
                                 if k != t["dtype"] and (v == size or rng.random() < 0.2)])
    elif kind == "shape":
        t = header[rng.choice(names)]
        shape = t["shape"]
        numel = 1
        for s in shape:
            numel *= s
        options = [[numel], [1, numel], shape + [1], [numel + 1]]
        if numel % 2 == 0 and numel:
            options.append([numel // 2, 2])
        t["shape"] = rng.choice([o for o in options if o != shape])
    elif kind == "rename":
        old = rng.choice(names)
        new = old[:-1] + chr(ord(old[-1]) ^ 1) if rng.random() < 0.5 else old.replace("e1.", "e2.", 1) + "x"
        header[new] = header.pop(old)
    else:  # delete-tensor
        del header[rng.choice(names)]
    return _with_header(data, header), kind


def _mutations(data: bytes, n_total: int, seed: int = 1234):
    """Deterministic damaged copies of `data`: (bytes, category, offset of a tensor-byte flip or None)."""
    rng = random.Random(seed)
    n, _ = _split(data)
    plan = (["truncate"] * 80 + ["flip-length"] * 40 + ["flip-header"] * 100 + ["flip-tensor"] * 100
            + ["json-edit"] * 100 + ["garbage"] * 30 + ["splat"] * 30)
    plan = (plan * (n_total // len(plan) + 1))[:n_total]
    for cat in plan:
        buf = bytearray(data)
        at = None
        if cat == "truncate":
            out = bytes(buf[:rng.randrange(0, len(data))])
        elif cat in ("flip-length", "flip-header", "flip-tensor"):
            lo, hi = {"flip-length": (0, 8), "flip-header": (8, 8 + n), "flip-tensor": (8 + n, len(data))}[cat]
            at = rng.randrange(lo, hi)
            buf[at] ^= 1 << rng.randrange(8)
            out = bytes(buf)
        elif cat == "json-edit":
            out, kind = _json_edit(rng, data)
            cat = f"json-edit:{kind}"
        elif cat == "garbage":
            out = data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 65)))
        else:  # splat: a few random bytes overwritten anywhere
            for _ in range(rng.randrange(1, 5)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            out = bytes(buf)
        yield out, cat, (at if cat == "flip-tensor" else None)


def _tensor_at(data: bytes, offset: int) -> str:
    n, header = _split(data)
    rel = offset - 8 - n
    return next(k for k, v in header.items()
                if k != "__metadata__" and v["data_offsets"][0] <= rel < v["data_offsets"][1])


def test_damaged_bank_files_are_rejected_or_load_identical(banks, tmp_path):
    original = read_bytes(banks["a"])
    expected = banks["A"]
    total = 480
    counts, others, by_category = Counter(), [], Counter()
    for i, (damaged, cat, flip_at) in enumerate(_mutations(original, total)):
        path = tmp_path / f"damaged_{i}.safetensors"
        path.write_bytes(damaged)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = read_bank_file(path)
        except BankFileError as err:
            msg = str(err)
            named = str(path) in msg and len(msg) > len(str(path)) + 10
            if flip_at is not None:
                named = named and repr(_tensor_at(original, flip_at)) in msg  # says which tensor
            if named:
                counts["rejected"] += 1
                by_category[cat] += 1
            else:
                counts["other"] += 1
                others.append((i, cat, f"vague message: {msg}"))
        except Exception as err:  # noqa: BLE001 — anything else is the defect being counted
            counts["other"] += 1
            others.append((i, cat, f"{type(err).__name__}: {err}"))
        else:
            if same(got, expected) and not caught:
                counts["identical"] += 1
            else:
                counts["other"] += 1
                others.append((i, cat, f"loaded different values (warnings: {[str(w.message) for w in caught]})"))
        if i % 40 == 0:  # the same damage through CodeBank.load: rejected with the bank unchanged, or identical
            bank = CodeBank(banks["source_codes"], window=8)
            before = copy.deepcopy(bank.entries)
            try:
                bank.load(path, channels=banks["channels"])
            except BankFileError:
                assert same(bank.entries, before) and bank.events == [] and bank._next_id == 1
            else:
                assert [e.entry_id for e in bank.entries] == [e["id"] for e in expected[0]]
        path.unlink()
    print(f"\nfuzz of {total} damaged bank files: rejected={counts['rejected']} identical={counts['identical']} "
          f"other={counts['other']}\n  rejected by category: {dict(sorted(by_category.items()))}")
    assert counts["other"] == 0, others[:10]
    assert counts["rejected"] + counts["identical"] == total


def test_every_tensor_and_the_metadata_are_checksummed(banks, tmp_path):
    """Damage that safetensors alone accepts (tensor bytes, a dtype of the same size) is named."""
    data = bytearray(read_bytes(banks["a"]))
    n, header = _split(bytes(data))
    name = "e1.s.blocks.0.attn.qkv"
    start = 8 + n + header[name]["data_offsets"][0]
    data[start + 2] ^= 0x10
    path = tmp_path / "flip.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(BankFileError, match=re.escape(repr(name)) + ".*damaged"):
        read_bank_file(path)
    header[name]["dtype"] = "I32"
    path.write_bytes(_with_header(read_bytes(banks["a"]), header))
    with pytest.raises(BankFileError, match=re.escape(repr(name)) + " has dtype int32, the metadata says 'float32'"):
        read_bank_file(path)
    _, header = _split(read_bytes(banks["a"]))
    header[name]["shape"] = [1] + header[name]["shape"]
    path.write_bytes(_with_header(read_bytes(banks["a"]), header))
    with pytest.raises(BankFileError, match=re.escape(repr(name)) + " has shape"):
        read_bank_file(path)
    _, header = _split(read_bytes(banks["a"]))
    header["__metadata__"]["imse_code_bank"] = header["__metadata__"]["imse_code_bank"].replace('"next_id": 3',
                                                                                              '"next_id": 4')
    path.write_bytes(_with_header(read_bytes(banks["a"]), header))
    with pytest.raises(BankFileError, match="metadata 'imse_code_bank' is damaged"):
        read_bank_file(path)


# ------------------------------------------------------------------ loaded banks do not refer to the file

IN_PLACE = r"""
import os, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from helpers import adapted_imse, image_source, imse_adapter
from imse_kernels.tta.bank_io import read_bank_file

path, small_path = sys.argv[2], sys.argv[3]
big = adapted_imse()
assert len(big.bank.entries) == 3
big.save_bank(path)
twin = imse_adapter()
twin.load_bank(path)
adapted_imse(()).save_bank(small_path)
small = open(small_path, "rb").read()
assert len(small) < os.path.getsize(path) // 2
with open(path, "r+b") as f:  # truly in place: same inode, shorter
    f.truncate(0)
    f.write(small)
    f.flush()
    os.fsync(f.fileno())

def touch(obj):
    if isinstance(obj, torch.Tensor):
        return float(obj.double().sum())
    if isinstance(obj, dict):
        return sum(touch(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(touch(v) for v in obj)
    return 0.0

total = 0.0
for e in twin.bank.entries:
    total += touch(e.codes) + touch(e.optimizer_state)
    if e.stats is not None:
        total += touch([e.stats.mean, e.stats.var])
found = twin.bank.retrieve(twin.bank.entries[2].stats)
assert found.entry == 2 and touch(found.codes) == touch(twin.bank.entries[2].codes)
images = image_source()
for d in (1, 2, 3):
    twin(images(d))  # adapt on: retrievals copy stored codes and optimizer states
assert len(read_bank_file(path)[0]) == 1
print("used the loaded bank after the in-place rewrite:", total)
"""


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def test_loaded_bank_survives_an_in_place_rewrite_of_its_file(tmp_path):
    proc = subprocess.run([sys.executable, "-c", IN_PLACE, str(TESTS), str(tmp_path / "bank.safetensors"),
                           str(tmp_path / "small.safetensors")], capture_output=True, text=True, timeout=300,
                          env=_env())
    print(f"\nin-place rewrite: returncode {proc.returncode}; {proc.stdout.strip()}")
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])  # not -7 (SIGBUS)


# ------------------------------------------------------------------ saves are atomic

def _content(data: bytes):
    """A safetensors file up to the order of its metadata keys (safetensors writes them in hash order)."""
    n, header = _split(data)
    return header, data[8 + n:]


SAVER = r"""
import os, sys
from imse_kernels.tta.bank_io import read_bank_file, write_bank_file

a, b, target = read_bank_file(sys.argv[1]), read_bank_file(sys.argv[2]), sys.argv[3]
print("ready", flush=True)
for _ in sys.stdin:  # one forked saver per trial: the import is paid once
    pid = os.fork()
    if pid == 0:
        i = 0
        while True:  # until SIGKILL
            write_bank_file(target, *(a if i % 2 == 0 else b))
            i += 1
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_save_killed_mid_write_leaves_a_whole_old_or_new_file(banks, tmp_path):
    """A saver loops writing banks A and B over one target and is SIGKILLed at random moments. After each
    kill the target is A or B exactly (same header, same tensor bytes; loads as such), or does not exist yet, which is
    allowed only until some earlier trial has left it; besides it there is at most one temp file (the
    write that was cut off), named like atomic_write_bytes' temp files. The test removes it each trial."""
    expected = {}
    for name in ("A", "B"):  # what the saver writes: the file re-saved from what read_bank_file returned
        write_bank_file(tmp_path / f"{name}.resaved", *banks[name])
        expected[name] = _content(read_bytes(tmp_path / f"{name}.resaved"))
    folder = tmp_path / "target"
    folder.mkdir()
    target = folder / "bank.safetensors"
    temp = re.compile(TEMP_NAME.format(name=re.escape(target.name)))
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(banks["a"]), str(banks["b"]), str(target)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
    rng = random.Random(99)
    outcomes, cut_writes, trials = Counter(), 0, 16
    try:
        assert proc.stdout.readline().strip() == "ready"
        existed = False
        for _ in range(trials):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            pid = int(proc.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.04))
            os.kill(pid, signal.SIGKILL)
            status = int(proc.stdout.readline())
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            left = sorted(p.name for p in folder.iterdir() if p.name != target.name)
            assert len(left) <= 1 and all(temp.fullmatch(x) for x in left), left
            cut_writes += len(left)
            for x in left:
                (folder / x).unlink()
            if not target.exists():
                assert not existed, "a killed save removed the previous file"
                outcomes["missing"] += 1
                continue
            existed = True
            data = _content(target.read_bytes())
            which = [k for k, v in expected.items() if v == data]
            assert which, "the target is neither A nor B"
            assert same(read_bank_file(target), banks[which[0]])
            outcomes[which[0]] += 1
    finally:
        proc.kill()
        proc.wait(timeout=30)
    print(f"\nkilled saves: {trials} trials, target = A {outcomes['A']}, B {outcomes['B']}, "
          f"not yet written {outcomes['missing']}; {cut_writes} kills cut a write (one temp file left)")
    assert outcomes["A"] + outcomes["B"] + outcomes["missing"] == trials and outcomes["A"] + outcomes["B"] > 0


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_a_full_disk_keeps_the_old_file(banks, tmp_path, monkeypatch, failing):
    folder = tmp_path / "disk"
    folder.mkdir()
    target = folder / "bank.safetensors"
    write_bank_file(target, *banks["A"])
    old = target.read_bytes()
    real_write = os.write

    def write_part_then_fail(fd, data):
        real_write(fd, bytes(data[:max(1, len(data) // 3)]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fsync_fails(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(state_file.os, failing, write_part_then_fail if failing == "write" else fsync_fails)
        with pytest.raises(OSError) as info:
            write_bank_file(target, *banks["B"])
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == old and same(read_bank_file(target), banks["A"])
    assert os.listdir(folder) == [target.name]  # no temp file left
    print(f"\nfull disk ({failing}): OSError ENOSPC propagated, old bank intact, no temp file")


def test_results_files_are_written_atomically(tmp_path, monkeypatch):
    from imse_kernels.eval.report import write_json

    path = tmp_path / "results.json"
    write_json(path, {"run": 1})
    def replace_fails(src, dst):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as m:
        m.setattr(state_file.os, "replace", replace_fails)
        with pytest.raises(OSError):
            write_json(path, {"run": 2})
    assert json.loads(path.read_text()) == {"run": 1} and os.listdir(tmp_path) == ["results.json"]
    atomic_write_text(path, "a,b\r\n1,2\r\n")
    assert path.read_bytes() == b"a,b\r\n1,2\r\n"  # newlines as given (CSV rows end in \r\n)


# ------------------------------------------------------------------ old files, failed loads

def _v1_bytes(v2: bytes) -> bytes:
    """The same bank as the version-1 writer stored it: no manifest, no digest."""
    _, header = _split(v2)
    meta = json.loads(header["__metadata__"]["imse_code_bank"])
    del meta["tensors"]
    meta["version"] = 1
    return st_save(st_load(v2), metadata={"imse_code_bank": json.dumps(meta)})


def test_a_version_1_bank_loads_with_a_warning_and_re_saves_as_version_2(banks, tmp_path):
    path = tmp_path / "v1.safetensors"
    path.write_bytes(_v1_bytes(read_bytes(banks["a"])))
    with pytest.warns(UserWarning, match="version-1 code bank without checksums, loaded unverified; re-save it"):
        got = read_bank_file(path)
    assert same(got, banks["A"])
    bank = CodeBank(banks["source_codes"], window=8)
    with pytest.warns(UserWarning, match="unverified"):
        bank.load(path)
    bank.save(path)  # the upgrade the warning names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert same(read_bank_file(path), banks["A"])
    assert json.loads(_split(read_bytes(path))[1]["__metadata__"]["imse_code_bank"])["version"] == 2


def _adapter_state(adapter):
    b = adapter.bank
    return copy.deepcopy({
        "entries": b.entries, "events": b.events, "next_id": b._next_id, "batch": b.batch, "pending": b._pending,
        "source_stats": b._source_stats, "tracker": vars(b.tracker),
        "s": {n: m.s.detach() for n, m in adapter.layers.items()}, "optimizer": adapter.optimizer.state_dict(),
        "counters": (adapter.steps_taken, adapter.skipped_steps)})


def test_a_failed_load_leaves_the_adapter_as_it_was(banks, tmp_path, monkeypatch):
    adapter = adapted_imse((1, 1, 2, 2, 3, 3, 1))  # mid-stream: 4 entries, events, a running descriptor
    assert len(adapter.bank.entries) == 4 and adapter.bank.tracker.running is not None
    before = _adapter_state(adapter)
    damaged = bytearray(read_bytes(banks["a"]))
    damaged[-5] ^= 0x01
    truncated = read_bytes(banks["a"])[:-100]
    foreign = tmp_path / "foreign.safetensors"
    adapted_imse((), seed=1).save_bank(foreign)  # other pretrained weights
    cases = {"damaged.safetensors": (bytes(damaged), "damaged"), "truncated.safetensors": (truncated, "truncated"),
             "foreign.safetensors": (None, "pretrained code")}
    for name, (data, match) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(BankFileError, match=match):
            adapter.load_bank(tmp_path / name)
        assert same(_adapter_state(adapter), before), name
    with pytest.raises(FileNotFoundError):
        adapter.load_bank(tmp_path / "missing.safetensors")
    assert same(_adapter_state(adapter), before)
    # a failure while converting the entries (e.g. out of device memory) comes after all checks, before any change
    real = CodeBank._entry_from_file
    calls = []

    def fails_on_the_second(self, e, device):
        calls.append(e["id"])
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(self, e, device)

    monkeypatch.setattr(CodeBank, "_entry_from_file", fails_on_the_second)
    with pytest.raises(RuntimeError, match="out of memory"):
        adapter.load_bank(banks["a"])
    assert same(_adapter_state(adapter), before)
    monkeypatch.undo()
    adapter.load_bank(banks["a"])  # the good file loads, and adaptation goes on
    assert [e.entry_id for e in adapter.bank.entries] == [0, 1, 2] and adapter.events == []
    adapter(image_source(5)(2))


# ------------------------------------------------------------------ the cached evaluation model

def test_the_cached_model_is_verified_and_retrained_when_damaged(tmp_path):
    pytest.importorskip("sklearn")
    from imse_kernels.eval import models as M
    from imse_kernels.eval.digits import load_splits

    train, test = load_splits(n_test=64, seed=0)
    cfg = M.EmbeddedConfig(steps=2, n_test=64)
    logs = []
    m1, info1 = M.load_or_train_embedded(cfg, train, test, str(tmp_path), log=logs.append)
    path = Path(info1["cache"])
    assert info1["trained_now"] and json.loads(path.with_suffix(".json").read_text())["config"] == info1["config"]
    assert sorted(os.listdir(tmp_path)) == sorted([path.name, path.with_suffix(".json").name])
    _, info2 = M.load_or_train_embedded(cfg, train, test, str(tmp_path), log=logs.append)
    assert not info2["trained_now"] and info2["clean_test_accuracy"] == info1["clean_test_accuracy"]
    good = read_bytes(path)
    damaged = bytearray(good)
    damaged[-3] ^= 0x04
    path.write_bytes(bytes(damaged))
    m3, info3 = M.load_or_train_embedded(cfg, train, test, str(tmp_path), log=logs.append)
    assert info3["trained_now"] and "unusable" in logs[-2] and "damaged" in logs[-2]
    again = st_load(read_bytes(path))  # deterministic training: the same weights again
    assert all(torch.equal(v, again[k]) for k, v in st_load(good).items())
    path.write_bytes(st_save(st_load(good)))  # no checksums (an older cache)
    _, info4 = M.load_or_train_embedded(cfg, train, test, str(tmp_path), log=logs.append)
    assert info4["trained_now"] and "no checksums" in logs[-2]
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m3.state_dict()[k]), k
