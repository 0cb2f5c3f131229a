"""What the CLI prints with: one rich console, byte formatting, and tables that stay readable in
an 80-column CI log with no terminal (a table too wide for the console is printed as one block of
`column: value` lines per row instead of being cut to "runti…")."""
from __future__ import annotations

from typing import Sequence

from rich import box
from rich.console import Console
from rich.table import Table

console = Console(highlight=False)


def fmt_bytes(n: float) -> str:
    """1,536 B / 1.50 KiB / 2.25 MiB / 1.25 GiB: binary units, two decimals above bytes."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return str(n)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], *,
                header: bool = True, out: Console | None = None) -> None:
    """A table when it fits the console's width; otherwise each row as a block of `column: value`
    lines. Cells may hold rich markup. header=False: a two-column key/value table."""
    out = out or console
    table = Table(title=title, box=box.SIMPLE_HEAD if header else box.SIMPLE, show_header=header,
                  title_justify="left")
    for i, name in enumerate(columns):
        table.add_column(name, no_wrap=True, style="bold" if not header and i == 0 else None)
    for row in rows:
        table.add_row(*row)
    if out.measure(table, options=out.options.update_width(10**6)).maximum <= out.width:
        out.print(table)
        return
    out.print(f"[bold]{title}[/]")
    if not header:  # key/value: the keys are the first cells
        width = max(len(str(r[0])) for r in rows)
        for key, *values in rows:
            out.print(f"  {key:<{width}}  {' '.join(values)}")
        return
    width = max(len(c) for c in columns)
    for row in rows:
        for name, value in zip(columns, row):
            out.print(f"  {name:<{width}}  {value}")
        out.print()
