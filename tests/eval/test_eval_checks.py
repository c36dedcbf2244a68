"""Option checks that turn the silent traps into one-line errors or warnings."""
import pytest

from imse_kernels.eval.checks import check_data_dir, check_labels_fit, check_max_per_domain, short_domain_warning
from imse_kernels.eval.errors import DataError, one_line


def test_data_dir_needs_data_and_folder_data_needs_a_dir():
    assert check_data_dir(None, None) == "digits"
    assert check_data_dir("cifar10-c", "/x") == "cifar10-c"
    with pytest.raises(DataError, match="--data-dir /x is given without --data .* pass --data imagenet-c"):
        check_data_dir(None, "/x")
    with pytest.raises(DataError, match="--data cifar100-c needs --data-dir DIR"):
        check_data_dir("cifar100-c", None)
    with pytest.raises(DataError, match="--data digits is built in and reads no --data-dir"):
        check_data_dir("digits", "/x")


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_max_per_domain_must_be_positive(bad):
    with pytest.raises(DataError, match="--max-per-domain must be a positive number of images"):
        check_max_per_domain(bad)


def test_max_per_domain_accepts_counts_and_none():
    assert check_max_per_domain(None) is None and check_max_per_domain(7) == 7


def test_labels_must_fit_the_head():
    check_labels_fit(10, 10, "DIR")
    check_labels_fit(10, None, "DIR")
    with pytest.raises(DataError, match="DIR: the data has class index 99 but the model has 10 outputs; pass the"):
        check_labels_fit(100, 10, "DIR")


def test_short_domains_warn():
    assert short_domain_warning(512, 64, 16) is None
    w = short_domain_warning(40, 64, 16)
    assert w.startswith("warning: domains of 40 images are shorter than the shift detector's window (64 images, 4 ")
    assert "\n" not in w


def test_messages_are_one_line():
    err = DataError("/a/b.pth", "line one\nline two\ttabbed", "fix\nit")
    assert str(err) == "/a/b.pth: line one line two tabbed; fix it"
    assert str(DataError(None, "problem", "")) == "problem"
    assert one_line("x" * 50, 10) == "xxxxxxx..."
    import pickle

    again = pickle.loads(pickle.dumps(err))
    assert type(again) is DataError and str(again) == str(err) and again.path == "/a/b.pth"
