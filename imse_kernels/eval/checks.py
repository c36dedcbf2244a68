"""Checks of the run's options before anything is loaded: the combinations that would run and mislead.

Each check raises a DataError (one line, with the fix) or returns a warning line for the log.
"""
import math
from typing import Optional

from .errors import DataError

#: Data sets read from a folder (--data-dir); `digits` is built in.
FOLDER_DATA = ("imagenet-c", "cifar10-c", "cifar100-c")

#: Every data set `--data` names.
DATA_SETS = ("digits",) + FOLDER_DATA

#: Run option -> the data sets it applies to (elsewhere it would be ignored in silence, so it is an error).
APPLIES_TO = {
    "n_test": ("digits",), "train_steps": ("digits",),
    "model": FOLDER_DATA, "checkpoint": FOLDER_DATA, "num_classes": FOLDER_DATA, "img_size": FOLDER_DATA,
    "patch_size": FOLDER_DATA, "max_per_domain": FOLDER_DATA,
    "preprocess": ("imagenet-c",), "subset": ("imagenet-c",), "label_map": ("imagenet-c",),
    "source_dir": ("imagenet-c",), "image_check": ("imagenet-c",), "skip_unreadable": ("imagenet-c",),
}


def check_data_dir(data: Optional[str], data_dir: Optional[str]) -> str:
    """The data set to use: `data`, or `digits` when neither is given. A folder without --data is an error (it
    would otherwise run the digits default and ignore the folder); a folder data set needs its folder."""
    if data is None:
        if data_dir:
            raise DataError(None, f"--data-dir {data_dir} is given without --data (the default is the built-in digits, "
                                  "which would ignore it)", f"pass --data {' / '.join(FOLDER_DATA)}")
        return "digits"
    if data in FOLDER_DATA and not data_dir:
        raise DataError(None, f"--data {data} needs --data-dir DIR", "give the folder that holds the data set")
    if data == "digits" and data_dir:
        raise DataError(None, "--data digits is built in and reads no --data-dir", "leave --data-dir out, or pass "
                        f"--data {' / '.join(FOLDER_DATA)}")
    return data


def check_options_apply(data: str, values: dict) -> None:
    """Options given (not None / False) for a data set they do not apply to are errors: `values` maps run
    fields (APPLIES_TO's keys) to their values."""
    for name, sets in APPLIES_TO.items():
        value = values.get(name)
        if value is None or value is False or data in sets:
            continue
        flag = "--" + name.replace("_", "-")
        if data == "digits":
            fix = ("the built-in digits default uses its own ViT and data; leave it out, or pass "
                   f"--data {' / '.join(sets)} --data-dir DIR")
        else:
            fix = f"leave it out (it applies to --data {' / '.join(sets)})"
        raise DataError(None, f"{flag} does not apply to --data {data}", fix)


def check_max_per_domain(n: Optional[int]) -> Optional[int]:
    """None (every image) or a positive count; 0 or a negative number is an error, not 'all' or 'all but n'."""
    if n is not None and (isinstance(n, bool) or int(n) != n or n < 1):
        raise DataError(None, f"--max-per-domain must be a positive number of images, got {n}",
                        "leave it out to use every image of the subset")
    return n


def check_labels_fit(num_classes: int, num_outputs: Optional[int], where: str) -> None:
    """The data's labels must be outputs of the model's head."""
    if num_outputs is not None and num_classes > num_outputs:
        raise DataError(where, f"the data has class index {num_classes - 1} but the model has {num_outputs} outputs",
                        "pass the --num-classes of the checkpoint's head, or a --label-map into its classes")


def short_domain_warning(images_per_domain: int, stats_window: int, batch_size: int) -> Optional[str]:
    """A warning when a domain is shorter than the shift detector's window: its window never holds one domain
    only, so its precision, recall and delay say nothing about the detector."""
    if images_per_domain >= stats_window:
        return None
    return (f"warning: domains of {images_per_domain} images are shorter than the shift detector's window "
            f"({stats_window} images, {math.ceil(stats_window / batch_size)} batches of {batch_size}): its "
            f"precision, recall and delay are not meaningful here; use at least {stats_window} images per domain")
