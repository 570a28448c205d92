"""The one table an evaluation with test sets or few-shot tries ends with, in the console and the results JSON.

Rows: val, then each test set, on all training images; then the same sets per few-shot n. Columns: the set's image
and class counts (the classes predicted among), then one top-1 per evaluation column (e.g. each k of k-NN), and the
same for the random-init network when it was evaluated. Few-shot cells are the mean +- sample standard deviation
over the tries. eval_knn.py and eval_linear.py both build their table here, so the two read alike.
"""
from __future__ import annotations

from typing import Any, Mapping

ALL_TRAIN = "all"
INIT_SUFFIX = " at init"

Scores = Mapping[str, Mapping[str, Any]]  # set -> column -> top-1 (float) or few-shot summary (dict)


def build_rows(sizes: Mapping[str, tuple[int, int]], full: Scores, fewshot: Mapping[str, Scores] | None = None,
               init_full: Scores | None = None, init_fewshot: Mapping[str, Scores] | None = None
               ) -> list[dict[str, Any]]:
    """JSON-ready rows. `sizes`: set -> (images, classes), in row order; `full`: top-1 on all training images;
    `fewshot`: str(n) -> set -> column -> summary; the init_ ones the same for the random-init network."""
    def row(name: str, train: str, trained: Mapping[str, Any], initial: Mapping[str, Any] | None) -> dict[str, Any]:
        top1 = dict(trained)
        top1.update({column + INIT_SUFFIX: value for column, value in (initial or {}).items()})
        images, classes = sizes[name]
        return {"set": name, "train": train, "images": images, "classes": classes, "top1": top1}

    rows = [row(name, ALL_TRAIN, full[name], (init_full or {}).get(name)) for name in sizes]
    for n, scores in (fewshot or {}).items():
        rows += [row(name, f"{n}/class", scores[name], (init_fewshot or {}).get(n, {}).get(name)) for name in sizes]
    return rows


def title(what: str, fewshot: Mapping[str, Any] | None = None) -> str:
    """The table's heading: what its cells are and, with few-shot rows, over how many draws."""
    heading = f"{what} top-1 (%) on val and the test sets"
    if fewshot is not None:
        heading += f"; n/class rows: mean +- std over {fewshot['tries']} seeded draws (seed {fewshot['seed']})"
    return heading + ":"


def _cell(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"{value['mean']:.2f}" + (f" +- {value['std']:.2f}" if value["std"] is not None else "")
    return f"{value:.2f}"


def format_rows(rows: list[dict[str, Any]], title: str) -> list[str]:
    """The table as aligned text lines under `title`."""
    columns = list(dict.fromkeys(column for row in rows for column in row["top1"]))
    header = ["set", "train", "images", "classes", *columns]
    body = [[row["set"], row["train"], str(row["images"]), str(row["classes"]),
             *(_cell(row["top1"][column]) if column in row["top1"] else "-" for column in columns)] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) if i < 2 else cell.rjust(width)
                         for i, (cell, width) in enumerate(zip(cells, widths))).rstrip()
    return [title, line(header), *map(line, body)]
