"""The input pipelines of the published ImageNet-C numbers, by name: a PIL image in, a [0, 1] tensor out.

- `res256crop224`: RobustBench's `Res256Crop224`, torchvision `Resize(256)` (bilinear; PIL's resampling,
  which is antialiased) + `CenterCrop(224)` + `ToTensor()`. Used by CoTTA, ViDA and the IMSE paper.
- `crop224`: `CenterCrop(224)` + `ToTensor()`, as Tent, EATA, SAR and DeYO read ImageNet-C's 224-pixel
  JPEGs (SAR's `te_transforms_imageC`).
- `timm`: the model's own timm evaluation transform (`timm.data.create_transform` of its data config:
  resize the short side to floor(size / crop_pct) with the config's interpolation, then centre crop).

Normalisation is the model's (its timm data config, folded into the model: see models.py), so every
choice stops at `ToTensor`. Each is built from the torchvision/timm transforms it names, so the pixels
are theirs (tests/eval/test_eval_preprocess.py compares them on JPEGs of several sizes). docs/design.md, section 13.
"""
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import DataError

#: The choices, in the order the command line lists them.
PREPROCESS = ("res256crop224", "crop224", "timm")

PREPROCESS_HELP = {
    "res256crop224": "Resize(256) + CenterCrop(224), RobustBench's Res256Crop224 (CoTTA, ViDA, IMSE)",
    "crop224": "CenterCrop(224) of ImageNet-C's 224-px images (Tent, EATA, SAR, DeYO)",
    "timm": "the model's timm eval transform: resize to size/crop_pct with its interpolation, centre crop",
}

#: The default of each data set that reads image files (the IMSE paper's pipeline for ImageNet-C).
DEFAULT_PREPROCESS = {"imagenet-c": "res256crop224"}


@dataclass(frozen=True)
class Preprocess:
    """A named input pipeline: `transform(pil_image)` -> (3, size, size) float32 tensor in [0, 1]."""

    name: str
    transform: Callable
    output_size: int
    description: str

    def __call__(self, image):
        return self.transform(image)

    def as_dict(self) -> dict:
        """What a results file records."""
        return {"name": self.name, "output_size": self.output_size, "pipeline": self.description}


def _torchvision():
    from torchvision import transforms

    return transforms


def res256crop224() -> Preprocess:
    T = _torchvision()
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    return Preprocess("res256crop224", tf, 224, "Resize(256, bilinear, antialias) + CenterCrop(224) + ToTensor")


def crop224() -> Preprocess:
    T = _torchvision()
    return Preprocess("crop224", T.Compose([T.CenterCrop(224), T.ToTensor()]), 224, "CenterCrop(224) + ToTensor")


def timm_eval(data_config: dict) -> Preprocess:
    """timm's evaluation transform for `data_config` (input_size, interpolation, crop_pct, crop_mode), without
    its final `Normalize` (the model normalises)."""
    import timm.data

    T = _torchvision()
    keys = ("input_size", "interpolation", "crop_pct", "crop_mode")
    cfg = {k: data_config[k] for k in keys if data_config.get(k) is not None}
    if "input_size" not in cfg:
        raise DataError(None, "--preprocess timm needs the model's data config (input_size)", "pass --model")
    full = timm.data.create_transform(**cfg, is_training=False)
    steps = list(full.transforms)
    if not steps or not isinstance(steps[-1], T.Normalize):  # pragma: no cover - a timm change
        raise RuntimeError(f"timm's eval transform no longer ends in Normalize: {full}")
    size = int(cfg["input_size"][-1])
    text = " + ".join(repr(s).replace("\n", "").replace("    ", "") for s in steps[:-1])
    return Preprocess("timm", T.Compose(steps[:-1]), size, text)


def build_preprocess(name: str, data_config: Optional[dict] = None) -> Preprocess:
    """The pipeline `name` (one of PREPROCESS); `timm` needs the model's data config."""
    if name == "res256crop224":
        return res256crop224()
    if name == "crop224":
        return crop224()
    if name == "timm":
        return timm_eval(data_config or {})
    raise DataError(None, f"unknown preprocessing {name!r}", f"choose one of {', '.join(PREPROCESS)}")


def check_input_size(pre: Preprocess, model_input_size: int, model: str = "the model") -> None:
    """Raise when the pipeline's images do not have the size the model takes (a ViT's input size is fixed)."""
    if int(model_input_size) != pre.output_size:
        raise DataError(None, f"--preprocess {pre.name} makes {pre.output_size}-px images but {model} takes "
                              f"{model_input_size}-px input",
                        "pass --preprocess timm (the model's own resize) or build the model with "
                        f"--img-size {pre.output_size}")
