"""Max |pixel difference| of each `--preprocess` choice against the published transform it names, on JPEGs.

    python tools/preprocess_equality.py [OUT_PREFIX]   # default benchmarks/results/preprocess_pixel_equality

Writes OUT_PREFIX.json and OUT_PREFIX.txt. The JPEGs are written here with PIL (tests/eval_files.py): sizes
from ImageNet-C's 224x224 to odd and elongated ones, and a greyscale file. References: RobustBench's
`Res256Crop224`, SAR's ImageNet-C `CenterCrop(224)`, timm's `create_transform` of vit_base_patch16_224's
data config (normalised the same way on both sides). Also how far the harness's earlier pipeline
(Resize(round(224 / 0.9)) bicubic + CenterCrop) is from each.
"""
import json
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from eval_files import JPEG_SIZES, write_jpeg  # noqa: E402

from imse_kernels.eval.preprocess import PREPROCESS, build_preprocess  # noqa: E402


def main(out_prefix: str) -> None:
    import timm.data
    from torchvision import transforms as T

    cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center"}
    mean, std = torch.tensor((0.5,) * 3), torch.tensor((0.5,) * 3)
    norm = T.Normalize(mean, std)
    published = {
        "res256crop224": ("RobustBench PREPROCESSINGS['Res256Crop224']",
                          T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()]), False),
        "crop224": ("SAR te_transforms_imageC without Normalize", T.Compose([T.CenterCrop(224), T.ToTensor()]), False),
        "timm": ("timm.data.create_transform(vit_base_patch16_224 config)",
                 timm.data.create_transform(**cfg, mean=(0.5,) * 3, std=(0.5,) * 3, is_training=False), True),
    }
    earlier = T.Compose([T.Resize(round(224 / 0.9), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                         T.ToTensor()])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = [write_jpeg(Path(tmp) / f"{w}x{h}.JPEG", w, h, seed=i) for i, (w, h) in enumerate(JPEG_SIZES)]
        files.append(write_jpeg(Path(tmp) / "grey_300x260.JPEG", 300, 260, seed=50, mode="L"))
        for path in files:
            with open(path, "rb") as f:
                im = Image.open(f).convert("RGB")
            for name in PREPROCESS:
                ref_name, ref, normalises = published[name]
                x = build_preprocess(name, {**cfg, "mean": (0.5,) * 3, "std": (0.5,) * 3})(im)
                got = norm(x) if normalises else x
                rows.append({"file": path.name, "preprocess": name, "reference": ref_name,
                             "max_abs_diff": float((got - ref(im)).abs().max()),
                             "earlier_pipeline_max_abs_diff": float((x - earlier(im)).abs().max())})
    out = {"torchvision": __import__("torchvision").__version__, "timm": timm.__version__,
           "pillow": Image.__version__, "rows": rows,
           "max_abs_diff": {n: max(r["max_abs_diff"] for r in rows if r["preprocess"] == n) for n in PREPROCESS}}
    lines = [f"{'file':<20} {'preprocess':<14} {'max|diff| vs published':>24} {'vs earlier pipeline':>20}"]
    lines += [f"{r['file']:<20} {r['preprocess']:<14} {r['max_abs_diff']:>24.6g} "
              f"{r['earlier_pipeline_max_abs_diff']:>20.4f}" for r in rows]
    lines.append("max over files: " + ", ".join(f"{k} {v:g}" for k, v in out["max_abs_diff"].items()))
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    Path(out_prefix + ".json").write_text(json.dumps(out, indent=1))
    Path(out_prefix + ".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(REPO / "benchmarks" / "results" / "preprocess_pixel_equality"))
