"""Every bad input of the data/checkpoint layer, made here, and the one line the library answers with.

    python tools/bad_inputs_table.py [OUT_PREFIX]   # default benchmarks/results/bad_inputs_messages

Writes OUT_PREFIX.json and OUT_PREFIX.md (temporary paths shown as <tmp>). Each row: the input, the library
call the command line makes for it, and the DataError message, the warning, or what loads instead.
The exit codes belong to the command line (it catches DataError).
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from eval_files import write_cifar_c, write_imagenet_c_tree  # noqa: E402
from imse_kernels.eval.cifar_c import CifarC  # noqa: E402
from imse_kernels.eval.checks import check_data_dir, check_max_per_domain, short_domain_warning  # noqa: E402
from imse_kernels.eval.errors import DataError  # noqa: E402
from imse_kernels.eval.imagenet_c import ImageNetC, subset_5000  # noqa: E402
from imse_kernels.eval.models import build_timm_model  # noqa: E402


def outcome(call):
    """('error', message) for a DataError, ('ok', what it returned) otherwise."""
    try:
        return "ok", call()
    except DataError as err:
        return "error", str(err)


def main(out_prefix: str) -> None:
    import timm
    from safetensors.torch import save_file

    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)

        def row(case, call_text, call, describe=None):
            kind, value = outcome(call)
            text = value if kind == "error" else (describe(value) if describe else str(value))
            rows.append({"input": case, "library call": call_text, "outcome": kind,
                         "message": str(text).replace(tmp_name, "<tmp>")})

        torch.manual_seed(0)
        vit = timm.create_model("test_vit", pretrained=False).eval()
        sd = vit.state_dict()
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "vit.safetensors"))
        loaded = lambda L: (f"loads ({L.format}, weights at {L.container}, stripped {L.stripped or 'nothing'}"  # noqa
                            f"{'; ' + '; '.join(L.notes) if L.notes else ''}"
                            f"{'; WARNING ' + '; '.join(L.warnings) if L.warnings else ''})")
        torch.save({"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 3,
                    "pytorch-lightning_version": "2.4.0", "hyper_parameters": {"lr": 0.1}}, tmp / "last.ckpt")
        row("Lightning checkpoint {'state_dict': {'model.…'}}", "build_timm_model('test_vit', 'last.ckpt')",
            lambda: build_timm_model("test_vit", str(tmp / "last.ckpt")), loaded)
        row("checkpoint of another architecture", "build_timm_model('resnet18', 'vit.safetensors')",
            lambda: build_timm_model("resnet18", str(tmp / "vit.safetensors")))
        row("checkpoint of a sibling architecture", "build_timm_model('test_vit2', 'vit.safetensors')",
            lambda: build_timm_model("test_vit2", str(tmp / "vit.safetensors")))
        torch.save(timm.create_model("test_vit", pretrained=False, num_classes=10).state_dict(), tmp / "ten.pth")
        row("10-class head without --num-classes", "build_timm_model('test_vit', 'ten.pth')",
            lambda: build_timm_model("test_vit", str(tmp / "ten.pth")))
        (tmp / "snap").mkdir()
        (tmp / "snap" / "config.json").write_text(json.dumps({"architecture": "test_vit", "num_classes": 1000}))
        row("config.json given as the checkpoint", "build_timm_model('test_vit', 'snap/config.json')",
            lambda: build_timm_model("test_vit", str(tmp / "snap" / "config.json")))
        data = (tmp / "vit.safetensors").read_bytes()
        (tmp / "half.safetensors").write_bytes(data[: len(data) // 2])
        row("half-downloaded safetensors", "build_timm_model('test_vit', 'half.safetensors')",
            lambda: build_timm_model("test_vit", str(tmp / "half.safetensors")))
        row("checkpoint directory without weights", "build_timm_model('test_vit', 'snap')",
            lambda: build_timm_model("test_vit", str(tmp / "snap")))
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "snap" / "model.safetensors"))
        row("checkpoint directory with model.safetensors", "build_timm_model('test_vit', 'snap')",
            lambda: build_timm_model("test_vit", str(tmp / "snap")), loaded)
        row("missing checkpoint file", "build_timm_model('test_vit', 'nope.pth')",
            lambda: build_timm_model("test_vit", str(tmp / "nope.pth")))
        row("hf-hub name not in the local cache", "build_timm_model('hf-hub:timm/not_cached', None)",
            lambda: build_timm_model("hf-hub:timm/not_cached", None))
        torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1), "x": _Evil()}, tmp / "evil.pth")
        row("torch file whose pickle calls os.system", "build_timm_model('test_vit', 'evil.pth')",
            lambda: build_timm_model("test_vit", str(tmp / "evil.pth")))
        small = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8)
        save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(tmp / "vit32.safetensors"))
        row("32-px patch-8 ViT loaded without --img-size/--patch-size",
            "build_timm_model('vit_tiny_patch16_224', 'vit32.safetensors', num_classes=10)",
            lambda: build_timm_model("vit_tiny_patch16_224", str(tmp / "vit32.safetensors"), num_classes=10), loaded)

        rels = subset_5000()[:4]
        root = write_imagenet_c_tree(tmp / "inc", rels, corruptions=("gaussian_noise", "fog"))
        jpeg = root / "fog" / "5" / rels[1]
        jpeg.write_bytes(jpeg.read_bytes()[:400])
        row("truncated JPEG (checked up front)", "ImageNetC(...).check_images()",
            lambda: ImageNetC(str(root), ["fog"], [5], preprocess="crop224").check_images())
        (root / "gaussian_noise" / "5" / rels[2]).write_text("<html>404</html>")
        row("text file named .JPEG (checked up front)", "ImageNetC(...).check_images()",
            lambda: ImageNetC(str(root), ["gaussian_noise"], [5], preprocess="crop224").check_images())
        row("both, with --skip-unreadable", "ImageNetC(...).check_images(skip_unreadable=True)",
            lambda: ImageNetC(str(root), "all", [5], preprocess="crop224").check_images(skip_unreadable=True))
        row("truncated JPEG met while running", "list(ImageNetC(...).domain('fog', 5).batches(4))",
            lambda: list(ImageNetC(str(root), ["fog"], [5], preprocess="crop224").domain("fog", 5).batches(4)))
        for n in (-3, 0):
            row(f"--max-per-domain {n}", f"ImageNetC(..., max_per_domain={n})",
                lambda n=n: ImageNetC(str(root), ["fog"], [5], max_per_domain=n))
        row("--data-dir without --data", "check_data_dir(None, '/data/ImageNet-C')",
            lambda: check_data_dir(None, "/data/ImageNet-C"))
        row("--max-per-domain 0 (option check)", "check_max_per_domain(0)", lambda: check_max_per_domain(0))
        row("--subset 5000 on a partial tree", "ImageNetC(..., subset='5000')",
            lambda: ImageNetC(str(root), ["fog"], [5], subset="5000"))
        row("corruption not on disk", "ImageNetC(..., corruptions='hail')",
            lambda: ImageNetC(str(root), "hail", [5]))
        plain = write_imagenet_c_tree(tmp / "plain", ["tabby/a.JPEG", "beagle/b.JPEG"], corruptions=("fog",))
        row("non-wnid folders, 1000-way head (warning)", "ImageNetC(...).label_warning(1000)",
            lambda: ImageNetC(str(plain), ["fog"], [5]).label_warning(1000))
        row("domains shorter than the detector's window (warning)", "short_domain_warning(40, 64, 16)",
            lambda: short_domain_warning(40, 64, 16))

        write_cifar_c(tmp / "c10", corruptions=("fog",), n=10)
        (tmp / "c10" / "labels.npy").unlink()
        row("CIFAR-10-C without labels.npy", "CifarC(dir, 'cifar10-c')", lambda: CifarC(tmp / "c10", "cifar10-c"))
        write_cifar_c(tmp / "c10b", corruptions=("fog",), n=10)
        np.save(tmp / "c10b" / "fog.npy", np.zeros((50, 32, 32), np.uint8))
        row("CIFAR-C file without the channel axis", "CifarC(dir, 'cifar10-c')",
            lambda: CifarC(tmp / "c10b", "cifar10-c"))
        write_cifar_c(tmp / "c10c", corruptions=("fog",), n=10)
        full = (tmp / "c10c" / "fog.npy").read_bytes()
        (tmp / "c10c" / "fog.npy").write_bytes(full[: len(full) // 2])
        row("truncated CIFAR-C .npy", "CifarC(dir, 'cifar10-c')", lambda: CifarC(tmp / "c10c", "cifar10-c"))
        write_cifar_c(tmp / "c100", corruptions=("fog",), n=10, num_classes=100)
        np.save(tmp / "c100" / "labels.npy", np.arange(50) % 100)
        row("CIFAR-100-C read as --data cifar10-c", "CifarC(dir, 'cifar10-c')",
            lambda: CifarC(tmp / "c100", "cifar10-c"))

    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    Path(out_prefix + ".json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    md = ["| input | library call | outcome | message |", "| --- | --- | --- | --- |"]
    md += [f"| {r['input']} | `{r['library call']}` | {r['outcome']} | {r['message'].replace('|', '/')} |"
           for r in rows]
    Path(out_prefix + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo this must never run",))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(REPO / "benchmarks" / "results" / "bad_inputs_messages"))
