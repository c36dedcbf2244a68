"""The one text-table renderer (imse_kernels.text_table) in the two styles its users print: the benchmarks'
(two-space separator, a rule under each header) and imse-eval's (no separator, minimum widths, a rule row)."""
import pytest

from imse_kernels.text_table import RULE, render_table


def test_benchmark_style():
    text = render_table(["layer", "batch", "ms"], [["vit_s.qkv", 1, "6.520"], ["fc2", 64, "err"]], left=1)
    assert text.splitlines() == ["layer      batch     ms",
                                 "---------  -----  -----",
                                 "vit_s.qkv      1  6.520",
                                 "fc2           64    err"]


def test_eval_style_min_widths_and_rule_row():
    rows = [["fog", "50.0", "7.5"], RULE, ["mean accuracy (%)", "67.5", "-"]]
    text = render_table(["accuracy (%)", "tent", "imse"], rows, sep="", min_widths=[20, 9, 9], header_rule=False)
    assert text.splitlines() == ["accuracy (%)             tent     imse",
                                 "fog                      50.0      7.5",
                                 "-" * 38,
                                 "mean accuracy (%)        67.5        -"]


def test_a_cell_wider_than_its_minimum_widens_the_column():
    text = render_table(["x", "y"], [["a label longer than ten", "1"]], sep="", min_widths=[10, 3],
                        header_rule=False)
    head, row = text.splitlines()
    assert head.index("y") == row.index("1") == len("a label longer than ten") + 2


def test_a_row_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="a row has 2 cells for 3 headers"):
        render_table(["a", "b", "c"], [["1", "2"]])
