"""Every bad input of the data and checkpoint layer as an `imse-eval` command line, with the files it names.

`make_cases(root)` writes small files the way the real ones look (tests/eval_files.py) under `root` and
returns one `Case` per input: the options, the exit status the command must give and the words its stderr
must hold (the file named and the fix). tests/eval/test_eval_bad_inputs.py runs each through `main()`;
tools/bad_inputs_table.py runs each as a process and writes the table of messages and exit codes.
"""
import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from eval_files import PickledOsCall, write_cifar_c, write_damaged_jpeg, write_imagenet_c_tree, write_safetensors

#: Options of every case (unless it gives its own): one method, tiny batches, no bars, no plot, one thread.
FAST = (("--method", "source"), ("--batch-size", "4"), ("--no-progress",), ("--no-plot",), ("--threads", "1"))


def with_fast(argv: list) -> list:
    """`argv` and the FAST options it does not give."""
    return list(argv) + [a for opt in FAST if opt[0] not in argv for a in opt]


@dataclass
class Case:
    name: str                    #: the input, in words
    argv: list                   #: imse-eval's options (without --output-dir)
    rc: int                      #: the exit status it must give
    expect: tuple = ()           #: words stderr must hold (the file and the fix)
    kind: str = "error"          #: error (status 2, one line), warning (runs, warns) or loads (runs)
    env: dict = field(default_factory=dict)  #: environment variables it needs


def write_files(root: Path) -> None:
    """The files the cases name, under `root`."""
    import timm

    from imse_kernels.eval.imagenet_c import subset_5000

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False, img_size=224).eval()   # ImageNet-C's model, 1000 classes
    sd = vit.state_dict()
    w224 = write_safetensors(vit, root / "vit224.safetensors")
    write_safetensors(timm.create_model("test_vit", pretrained=False), root / "vit160.safetensors")
    write_safetensors(timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=4, num_classes=10),
                      root / "vit32.safetensors")
    write_safetensors(timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=8, num_classes=10),
                      root / "vit32_patch8.safetensors")

    # ImageNet-C: the first 8 names of RobustBench's list, two corruptions and one extra corruption
    rels = subset_5000()[:8]
    write_imagenet_c_tree(root / "inc", rels, corruptions=("gaussian_noise", "fog", "speckle_noise"), size=(40, 30))
    bad = write_imagenet_c_tree(root / "inc_bad", rels, corruptions=("gaussian_noise", "fog"), size=(40, 30))
    jpeg = bad / "fog" / "5" / rels[1]
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    (bad / "gaussian_noise" / "5" / rels[2]).write_text("<html>404 Not Found</html>")
    damaged = write_imagenet_c_tree(root / "inc_damaged", rels, corruptions=("fog",), size=(40, 30))
    write_damaged_jpeg(damaged / "fog" / "5" / rels[3])
    write_imagenet_c_tree(root / "plain", [f"{c}/{i}.JPEG" for c in ("tabby", "beagle") for i in range(3)],
                          corruptions=("fog",), size=(40, 30))
    (root / "labels.txt").write_text("tabby\nbeagle\n")
    (root / "labels1.txt").write_text("tabby\n")

    # checkpoints as people have them, and broken ones
    torch.save({"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 3,
                "pytorch-lightning_version": "2.4.0", "hyper_parameters": {"lr": 0.1}}, root / "last.ckpt")
    torch.save(timm.create_model("test_vit", pretrained=False, img_size=224, num_classes=10).state_dict(),
               root / "ten.pth")
    (root / "snap").mkdir(exist_ok=True)
    (root / "snap" / "config.json").write_text(json.dumps({"architecture": "test_vit", "num_classes": 1000}))
    (root / "snap_ok").mkdir(exist_ok=True)
    write_safetensors(vit, root / "snap_ok" / "model.safetensors")
    data = w224.read_bytes()
    (root / "half.safetensors").write_bytes(data[: len(data) // 2])
    evil = PickledOsCall("echo this must never run")
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1), "x": evil}, root / "evil.pth")

    # CIFAR-10-C / CIFAR-100-C
    write_cifar_c(root / "c10", corruptions=("fog", "gaussian_noise"), n=10)
    write_cifar_c(root / "c10_nolabels", corruptions=("fog",), n=10)
    (root / "c10_nolabels" / "labels.npy").unlink()
    write_cifar_c(root / "c10_noaxis", corruptions=("fog",), n=10)
    np.save(root / "c10_noaxis" / "fog.npy", np.zeros((50, 32, 32), np.uint8))
    write_cifar_c(root / "c10_half", corruptions=("fog",), n=10)
    full = (root / "c10_half" / "fog.npy").read_bytes()
    (root / "c10_half" / "fog.npy").write_bytes(full[: len(full) // 2])
    write_cifar_c(root / "c100", corruptions=("fog",), n=10, num_classes=100)
    np.save(root / "c100" / "labels.npy", np.arange(50) % 100)


def make_cases(root: Path) -> list[Case]:
    """The cases, naming the files `write_files(root)` writes (nothing is written here)."""
    from imse_kernels.eval.imagenet_c import subset_5000

    root = Path(root)
    rels = subset_5000()[:8]
    inc, bad, damaged, plain = root / "inc", root / "inc_bad", root / "inc_damaged", root / "plain"
    w224, w32, w32_p8 = root / "vit224.safetensors", root / "vit32.safetensors", root / "vit32_patch8.safetensors"
    IMNET = ["--data", "imagenet-c", "--data-dir", str(inc), "--corruptions", "gaussian_noise,fog",
             "--max-per-domain", "8"]
    MODEL = ["--model", "test_vit", "--img-size", "224"]
    CIFAR = ["--data", "cifar10-c", "--data-dir", str(root / "c10"), "--corruptions", "fog"]
    M32 = ["--model", "test_vit", "--img-size", "32", "--patch-size", "4", "--num-classes", "10",
           "--checkpoint", str(w32)]

    def cifar(d, data="cifar10-c"):
        return ["--data", data, "--data-dir", str(root / d), "--corruptions", "fog"] + M32

    ck = lambda path, model=MODEL: IMNET + model + ["--checkpoint", str(path)]  # noqa: E731
    E, W, L = "error", "warning", "loads"
    cases = [
        # checkpoints
        Case("Lightning checkpoint {'state_dict': {'model.…'}}", ck(root / "last.ckpt"), 0,
             ("last.ckpt", "key prefix 'model.' removed"), L),
        Case("checkpoint of another architecture", ck(w224, ["--model", "resnet18"]), 2,
             ("vit224.safetensors", "--model")),
        Case("10-class head without --num-classes", ck(root / "ten.pth"), 2, ("ten.pth", "--num-classes 10")),
        Case("config.json given as the checkpoint", ck(root / "snap" / "config.json"), 2, ("config.json",)),
        Case("half-downloaded safetensors", ck(root / "half.safetensors"), 2, ("half.safetensors", "again")),
        Case("checkpoint directory without weights", ck(root / "snap"), 2, ("snap", "model.safetensors")),
        Case("checkpoint directory holding model.safetensors", ck(root / "snap_ok"), 0, (), L),
        Case("missing checkpoint file", ck(root / "nope.pth"), 2, ("nope.pth", "not found")),
        Case("--model without --checkpoint", IMNET + MODEL, 2, ("--checkpoint",)),
        Case("unknown timm model name", ck(w224, ["--model", "vit_tiny_patch16_224x"]), 2,
             ("vit_tiny_patch16_224x", "did you mean")),
        Case("hf-hub name not in the local cache", IMNET + ["--model", "hf-hub:imse-kernels-test/not-cached"], 2,
             ("not-cached", "cache"), E, {"HF_HUB_OFFLINE": "1"}),
        Case("torch file whose pickle calls os.system", ck(root / "evil.pth"), 2, ("evil.pth",)),
        Case("32-px patch-8 ViT without --img-size/--patch-size", cifar("c10")[:6] + [
            "--model", "test_vit", "--num-classes", "10", "--checkpoint", str(w32_p8)], 0,
            ("vit32_patch8.safetensors", "--img-size 32 --patch-size 8"), W),
        # images
        Case("truncated JPEG (checked up front)", ["--data", "imagenet-c", "--data-dir", str(bad), "--corruptions",
             "fog", "--max-per-domain", "8"] + MODEL + ["--checkpoint", str(w224)], 2,
             (rels[1], "Truncated", "--skip-unreadable")),
        Case("text file named .JPEG (checked up front)", ["--data", "imagenet-c", "--data-dir", str(bad),
             "--corruptions", "gaussian_noise", "--max-per-domain", "8"] + MODEL + ["--checkpoint", str(w224)], 2,
             (rels[2], "text file", "--skip-unreadable")),
        Case("both, with --skip-unreadable", ["--data", "imagenet-c", "--data-dir", str(bad), "--corruptions", "all",
             "--max-per-domain", "8", "--skip-unreadable"] + MODEL + ["--checkpoint", str(w224)], 0,
             ("2 unreadable image(s)",), W),
        Case("JPEG damaged inside (passes the header check), met while running", ["--data", "imagenet-c",
             "--data-dir", str(damaged), "--corruptions", "fog", "--max-per-domain", "8"] + MODEL
             + ["--checkpoint", str(w224)], 2, (rels[3], "--image-check decode")),
        Case("the same with --image-check decode (found up front)", ["--data", "imagenet-c", "--data-dir",
             str(damaged), "--corruptions", "fog", "--max-per-domain", "8", "--image-check", "decode"] + MODEL
             + ["--checkpoint", str(w224)], 2, (rels[3], "damaged image", "--skip-unreadable")),
        # options that ran something else in silence
        Case("--max-per-domain -3", IMNET[:-2] + ["--max-per-domain", "-3"] + MODEL + ["--checkpoint", str(w224)], 2,
             ("--max-per-domain", "-3", "positive")),
        Case("--max-per-domain 0", IMNET[:-2] + ["--max-per-domain", "0"] + MODEL + ["--checkpoint", str(w224)], 2,
             ("--max-per-domain", "positive")),
        Case("--data-dir without --data", ["--data-dir", str(inc)], 2, ("--data-dir", "--data imagenet-c")),
        Case("--data digits with --data-dir", ["--data", "digits", "--data-dir", str(inc)], 2,
             ("reads no --data-dir",)),
        Case("--data imagenet-c without --data-dir", ["--data", "imagenet-c"] + MODEL, 2, ("needs --data-dir",)),
        Case("ImageNet-C folder that does not exist", ["--data", "imagenet-c", "--data-dir", str(root / "nowhere")]
             + MODEL, 2, ("nowhere", "not found")),
        Case("--subset 5000 on a tree without the listed images", IMNET[:-2] + MODEL + ["--checkpoint", str(w224)], 2,
             ("lacks 4992 of the 5000", "--subset full")),
        Case("an extra ImageNet-C corruption (speckle_noise)", IMNET[:4] + ["--corruptions", "speckle_noise",
             "--max-per-domain", "8"] + MODEL + ["--checkpoint", str(w224)], 0, ("speckle_noise",), L),
        Case("--corruptions all on a tree with 3 of the 19", IMNET[:4] + ["--corruptions", "all", "--max-per-domain",
             "8"] + MODEL + ["--checkpoint", str(w224)], 0, ("gaussian_noise", "fog", "speckle_noise"), L),
        Case("corruption not on disk", IMNET[:4] + ["--corruptions", "hail", "--max-per-domain", "8"] + MODEL
             + ["--checkpoint", str(w224)], 2, ("hail", "gaussian_noise, fog, speckle_noise")),
        Case("--preprocess crop224 for a 160-px model", IMNET + ["--preprocess", "crop224", "--model", "test_vit",
             "--checkpoint", str(root / "vit160.safetensors")],
             2, ("crop224", "160", "--preprocess timm", "--img-size 224")),
        Case("--preprocess for CIFAR-10-C (arrays)", cifar("c10") + ["--preprocess", "crop224"], 2,
             ("--preprocess", "does not apply to --data cifar10-c")),
        Case("--model for the built-in digits", ["--model", "test_vit", "--checkpoint", str(w224)], 2,
             ("--model", "does not apply to --data digits")),
        Case("--n-test for ImageNet-C", IMNET + MODEL + ["--checkpoint", str(w224), "--n-test", "100"], 2,
             ("--n-test", "does not apply to --data imagenet-c")),
        Case("non-wnid folders, 1000-way head", ["--data", "imagenet-c", "--data-dir", str(plain), "--corruptions",
             "fog", "--subset", "full"] + MODEL + ["--checkpoint", str(w224)], 0, ("beagle", "--label-map"), W),
        Case("the same with --label-map", ["--data", "imagenet-c", "--data-dir", str(plain), "--corruptions", "fog",
             "--subset", "full", "--label-map", str(root / "labels.txt")] + MODEL + ["--checkpoint", str(w224)],
             0, (), L),
        Case("label map missing a folder", ["--data", "imagenet-c", "--data-dir", str(plain), "--corruptions", "fog",
             "--subset", "full", "--label-map", str(root / "labels1.txt")] + MODEL
             + ["--checkpoint", str(w224)], 2, ("labels1.txt", "beagle", "label map")),
        Case("domains shorter than the detector's window", cifar("c10") + ["--method", "imse"], 0,
             ("10 images", "window"), W),
        # CIFAR-C files
        Case("CIFAR-10-C without labels.npy", cifar("c10_nolabels"), 2, ("labels.npy", "missing")),
        Case("CIFAR-C file without the channel axis", cifar("c10_noaxis"), 2, ("fog.npy", "(50, 32, 32)")),
        Case("truncated CIFAR-C .npy", cifar("c10_half"), 2, ("fog.npy", "truncated")),
        Case("CIFAR-100-C read as --data cifar10-c", cifar("c100"), 2, ("labels.npy", "cifar10-c or cifar100-c")),
        Case("CIFAR-100-C labels beyond a 10-class head", cifar("c100", "cifar100-c"), 2,
             ("class index 99", "--num-classes")),
        Case("--max-per-domain above the images per domain", CIFAR + M32 + ["--max-per-domain", "11"], 2,
             ("--max-per-domain 11", "at most 10")),
    ]
    for c in cases:
        c.argv = with_fast(c.argv)
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), "case names are unique"
    return cases

