"""What a run's data protocol is, in one record: the header line and the results file both say it.

Published corruption benchmarks report error (100 - accuracy, in %); `reports` says which one a table shows.
"""
from dataclasses import asdict, dataclass
from typing import Optional

#: What a table can report per domain.
REPORTS = ("error", "accuracy")

#: What the papers of each benchmark report.
DEFAULT_REPORTS = {"imagenet-c": "error", "cifar10-c": "error", "cifar100-c": "error", "digits": "accuracy"}


@dataclass(frozen=True)
class DataProtocol:
    """The data a run reads and how: data set, which images per domain in which order, the input pipeline."""

    data: str                   #: "imagenet-c", "cifar10-c", "cifar100-c", "digits"
    subset: str                 #: which images, in words (e.g. "RobustBench's 5,000-image list")
    images_per_domain: int
    order: str                  #: "fixed" or "shuffled by seed N"
    preprocess: Optional[dict]  #: Preprocess.as_dict() of the pipeline, None for arrays read as they are
    reports: str = "accuracy"

    def __post_init__(self):
        if self.reports not in REPORTS:
            raise ValueError(f"reports must be one of {', '.join(REPORTS)}, got {self.reports!r}")

    def score(self, accuracy: float) -> float:
        """The number a table shows for an accuracy in [0, 1]: error or accuracy, in %."""
        return 100.0 * (1.0 - accuracy if self.reports == "error" else accuracy)

    def header(self) -> str:
        """One line for the top of a report."""
        pre = f" · preprocess {self.preprocess['name']}" if self.preprocess else ""
        return (f"{self.data} · {self.subset} · {self.images_per_domain:,} images per domain ({self.order}){pre} · "
                f"table: {self.reports} (%)")

    def as_dict(self) -> dict:
        return asdict(self)
