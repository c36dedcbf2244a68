"""Fixed-width text tables, the one renderer of the tables `imse-eval` and the benchmarks print and write."""
from typing import Sequence

#: A row that is a horizontal rule across the whole table.
RULE = "\0rule"


def render_table(headers: Sequence, rows: Sequence, left: int = 1, *, sep: str = "  ", min_widths: Sequence = (),
                 header_rule: bool = True) -> str:
    """A text table: the first `left` columns left-aligned, the others right-aligned, `sep` between columns.

    A column is as wide as its widest cell, or `min_widths[i]` when that is more. `header_rule` puts a line of
    dashes under each column's header; a row equal to `RULE` is a line of dashes across the whole table.
    Trailing spaces are cut from every line."""
    cells = [list(headers)] + [list(r) for r in rows if not _is_rule(r)]
    bad = [r for r in cells if len(r) != len(headers)]
    if bad:
        raise ValueError(f"render_table: a row has {len(bad[0])} cells for {len(headers)} headers: {bad[0]!r}")
    widths = [max([len(str(r[i])) for r in cells] + [min_widths[i] if i < len(min_widths) else 0])
              for i in range(len(headers))]

    def line(row) -> str:
        return sep.join(str(c).ljust(w) if i < left else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    rule = "-" * (sum(widths) + len(sep) * (len(widths) - 1))
    out = [line(headers)] + ([line(["-" * w for w in widths])] if header_rule else [])
    out += [rule if _is_rule(r) else line(r) for r in rows]
    return "\n".join(out)


def _is_rule(row) -> bool:
    return isinstance(row, str) and row == RULE
