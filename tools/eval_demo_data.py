"""Local stand-ins for the published benchmarks, in their exact on-disk layouts, for `imse-eval` runs without
the real downloads (the results under benchmarks/results/imse_eval_*_layout_* come from these).

    python tools/eval_demo_data.py cifar OUT [--n 100] [--steps 500]
        OUT/CIFAR-10-C/<corruption>.npy (5·n, 32, 32, 3) uint8 for the 15 corruptions, severities 1..5 stacked,
        and labels.npy (5·n), as RobustBench ships them; the images are n held-out scikit-learn digits
        (upsampled to 32 px) corrupted by eval/corruptions.py (CIFAR-10-C's constants, content scale 4), not
        CIFAR images. OUT/vit_tiny_digits32.safetensors: timm's vit_tiny_patch16_224 built at img_size 32,
        patch_size 8, 10 classes (the README's quickstart model), trained here on the other digits
        (AdamW, random shifts; deterministic for the seed), saved unnormalised as a plain state dict.
    python tools/eval_demo_data.py imagenet-c OUT [--corruptions gaussian_noise,fog] [--size 40x30]
        OUT/<corruption>/5/<wnid>/<file>.JPEG for RobustBench's 5,000 file names (small photo-like JPEGs, not
        ImageNet images) and OUT/test_vit224.safetensors: timm's test_vit at 224 px, randomly initialised
        (seed 0), 1000 classes. Its numbers say nothing about any method; the run shows the protocol.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from imse_kernels.eval.corruptions import CORRUPTIONS, corrupt  # noqa: E402
from imse_kernels.eval.digits import CONTENT_SCALE, load_splits  # noqa: E402


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Each image translated by up to `max_shift` pixels (zero fill)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    out = torch.empty_like(x)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen).tolist()
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen).tolist()
    for i in range(n):
        out[i] = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return out


def train_vit32(train, steps: int, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """vit_tiny_patch16_224 at 32 px, patch 8, 10 classes, trained on `train` (inputs normalised by timm's
    ViT mean/std 0.5, as the evaluation's folded normalisation will)."""
    import timm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(train), (64,), generator=gen)
        x = (_shift(train.images[idx], 3, gen) - 0.5) / 0.5
        loss = F.cross_entropy(model(x), train.labels[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.3f}", flush=True)
    return model.eval(), {"steps": steps, "seed": seed, "train_seconds": round(time.perf_counter() - t0, 1)}


def cifar(out: Path, n: int, steps: int) -> None:
    from safetensors.torch import save_file

    train, test = load_splits(n_test=n, seed=0)
    root = out / "CIFAR-10-C"
    root.mkdir(parents=True, exist_ok=True)
    for c in CORRUPTIONS:
        blocks = [corrupt(test.images, c, s, seed=0, scale=CONTENT_SCALE) for s in range(1, 6)]
        x = torch.cat(blocks).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        np.save(root / f"{c}.npy", x)
    np.save(root / "labels.npy", np.tile(test.labels.numpy().astype(np.int64), 5))
    model, info = train_vit32(train, steps)
    with torch.no_grad():
        clean = float((model((test.images - 0.5) / 0.5).argmax(1) == test.labels).float().mean())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "vit_tiny_digits32.safetensors"))
    info.update(clean_test_accuracy=clean, train_images=len(train), test_images=len(test),
                model="vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10)
    (out / "vit_tiny_digits32.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


def imagenet_c(out: Path, corruptions: list[str], size: tuple[int, int]) -> None:
    import timm
    from eval_files import write_imagenet_c_tree
    from safetensors.torch import save_file

    from imse_kernels.eval.imagenet_c import subset_5000

    write_imagenet_c_tree(out, subset_5000(), corruptions=corruptions, severities=(5,), size=size)
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, img_size=224)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "test_vit224.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("cifar", "imagenet-c"))
    p.add_argument("out")
    p.add_argument("--n", type=int, default=100, help="cifar: images per severity block")
    p.add_argument("--steps", type=int, default=500, help="cifar: training steps of the ViT")
    p.add_argument("--corruptions", default="gaussian_noise,fog", help="imagenet-c: corruption folders")
    p.add_argument("--size", default="40x30", help="imagenet-c: JPEG width x height")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.what == "cifar":
        cifar(out, a.n, a.steps)
    else:
        w, h = (int(v) for v in a.size.split("x"))
        imagenet_c(out, a.corruptions.split(","), (w, h))


if __name__ == "__main__":
    main()
