"""SynL questions, answers computed exactly from a table's typed values.

Families and kinds:

* ``retrieval``: ``lookup`` (a cell by row key and column), ``match`` (the row whose
  column holds a given unique value), ``multi_hop`` (follow a reference from one
  table to another);
* ``reasoning`` (answers carry worked steps): ``compare`` (which of two rows is higher
  and by how much), ``sum_rows`` (total over named rows), ``product`` (integer column
  times amount column of one row);
* ``global``: ``count`` (rows under a filter), ``sum_filter`` (sum under a filter),
  ``average`` (mean over all rows or over filtered rows, rounded to 2 decimals half
  up), ``extreme`` (row with the largest/smallest value, latest/earliest date),
  ``top_k`` (keys of the k largest or smallest values or latest/earliest dates, k from
  2 to 5, in order).

Filters: category equal to a value, or a number/date greater (later) or less (earlier)
than a cell's value. Missing cells (``N/A``, name and place columns only) are never
matched on; a lookup of one answers ``N/A``.

Every question also carries a ``query``: a small structured description the
independent verifier (:mod:`megatron_longsky.synl.verify`) evaluates on the table text.
Answers are plain strings: numbers as in the table (amounts with 2 decimals), keys,
names, ISO dates; ``compare`` answers ``"<key>, <difference>"``; ``top_k`` answers
``"<key1>, <key2>, ..."``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from typing import Callable, Optional

from megatron_longsky.synl.tables import MISSING, NUMERIC_KINDS, Table, cell_text

FAMILIES = {
    "retrieval": ("lookup", "match", "multi_hop"),
    "reasoning": ("compare", "sum_rows", "product"),
    "global": ("count", "sum_filter", "average", "extreme", "top_k"),
}
CENT = Decimal("0.01")


@dataclass
class Question:
    family: str
    kind: str
    text: str
    answer: str
    query: dict
    steps: list[str] = field(default_factory=list)


def _rows_by_key(table: Table) -> dict:
    return {row[0]: row for row in table.rows}


def _unique_values(table: Table, header: str) -> list:
    counts: dict = {}
    for v in table.values(header):
        counts[v] = counts.get(v, 0) + 1
    return [v for v, c in counts.items() if c == 1 and v != MISSING]


def _join_keys(keys: list[str]) -> str:
    return ", ".join(keys[:-1]) + f" and {keys[-1]}"


# -- retrieval ------------------------------------------------------------------------


def lookup(rng: random.Random, t: Table) -> Optional[Question]:
    row = rng.choice(t.rows)
    header = rng.choice(t.headers[1:])
    value = cell_text(row[t.index(header)])
    text = f"In table {t.name}, what is the {header} of the row whose {t.key} is {row[0]}?"
    return Question("retrieval", "lookup", text, value,
                    {"op": "lookup", "table": t.name, "key_column": t.key, "key": row[0], "column": header})


def match(rng: random.Random, t: Table) -> Optional[Question]:
    options = [(h, v) for h in t.headers_of("name", "date", "amount", "place", "int") for v in _unique_values(t, h)]
    if not options:
        return None
    header, value = rng.choice(options)
    key = next(row[0] for row in t.rows if row[t.index(header)] == value)
    text = f"In table {t.name}, which {t.key} has {header} equal to {cell_text(value)}?"
    return Question("retrieval", "match", text, key,
                    {"op": "match", "table": t.name, "column": header, "value": cell_text(value),
                     "return_column": t.key})


def multi_hop(rng: random.Random, a: Table, b: Table, ref_header: str) -> Optional[Question]:
    row_b = rng.choice(b.rows)
    ref = row_b[b.index(ref_header)]
    row_a = _rows_by_key(a)[ref]
    header = rng.choice(a.headers[1:])
    value = cell_text(row_a[a.index(header)])
    text = (f"In table {b.name}, the row whose {b.key} is {row_b[0]} refers to a row of table {a.name} "
            f"through its {ref_header}. What is the {header} of that row of table {a.name}?")
    steps = [f"In table {b.name}, {b.key} {row_b[0]} has {ref_header} {ref}.",
             f"In table {a.name}, {a.key} {ref} has {header} {value}."]
    return Question("retrieval", "multi_hop", text, value,
                    {"op": "multi_hop", "table": b.name, "key_column": b.key, "key": row_b[0],
                     "link_column": ref_header, "target_table": a.name, "target_key_column": a.key,
                     "column": header}, steps)


# -- reasoning (with worked steps) -------------------------------------------------------


def compare(rng: random.Random, t: Table) -> Optional[Question]:
    header = rng.choice(t.headers_of(*NUMERIC_KINDS))
    i = t.index(header)
    pairs = [(r1, r2) for r1, r2 in (rng.sample(t.rows, 2) for _ in range(8)) if r1[i] != r2[i]]
    if not pairs:
        return None
    r1, r2 = pairs[0]
    hi, lo = (r1, r2) if r1[i] > r2[i] else (r2, r1)
    diff = hi[i] - lo[i]
    text = (f"In table {t.name}, which has the higher {header}: {t.key} {r1[0]} or {t.key} {r2[0]}? "
            "By how much?")
    steps = [f"{t.key} {r1[0]} has {header} {cell_text(r1[i])}.",
             f"{t.key} {r2[0]} has {header} {cell_text(r2[i])}.",
             f"{cell_text(hi[i])} - {cell_text(lo[i])} = {cell_text(diff)}, so {hi[0]} is higher."]
    return Question("reasoning", "compare", text, f"{hi[0]}, {cell_text(diff)}",
                    {"op": "compare", "table": t.name, "key_column": t.key, "keys": [r1[0], r2[0]],
                     "column": header}, steps)


def sum_rows(rng: random.Random, t: Table) -> Optional[Question]:
    header = rng.choice(t.headers_of(*NUMERIC_KINDS))
    i = t.index(header)
    rows = rng.sample(t.rows, min(len(t.rows), rng.randint(2, 4)))
    keys = [r[0] for r in rows]
    steps = [f"{t.key} {r[0]} has {header} {cell_text(r[i])}." for r in rows]
    total = rows[0][i]
    for r in rows[1:]:
        new = total + r[i]
        steps.append(f"{cell_text(total)} + {cell_text(r[i])} = {cell_text(new)}.")
        total = new
    text = f"In table {t.name}, what is the total {header} of the rows whose {t.key} is {_join_keys(keys)}?"
    return Question("reasoning", "sum_rows", text, cell_text(total),
                    {"op": "sum_rows", "table": t.name, "key_column": t.key, "keys": keys, "column": header}, steps)


def product(rng: random.Random, t: Table) -> Optional[Question]:
    count_header = rng.choice(t.headers_of("int"))
    amount_header = rng.choice(t.headers_of("amount"))
    row = rng.choice(t.rows)
    n, amount = row[t.index(count_header)], row[t.index(amount_header)]
    result = Decimal(n) * amount
    text = (f"In table {t.name}, for the row whose {t.key} is {row[0]}, what is its {count_header} "
            f"multiplied by its {amount_header}?")
    steps = [f"{t.key} {row[0]} has {count_header} {n} and {amount_header} {cell_text(amount)}.",
             f"{n} x {cell_text(amount)} = {cell_text(result)}."]
    return Question("reasoning", "product", text, cell_text(result),
                    {"op": "product", "table": t.name, "key_column": t.key, "key": row[0],
                     "columns": [count_header, amount_header]}, steps)


# -- global understanding -----------------------------------------------------------------


def _filter(rng: random.Random, t: Table) -> tuple[dict, str, Callable]:
    """A random filter: category equality, or numeric/date strictly greater or less than a cell's value."""
    if rng.random() < 0.5 or not t.headers_of("amount", "int", "date"):
        header = rng.choice(t.headers_of("category"))
        value = rng.choice(t.values(header))
        i = t.index(header)
        return ({"column": header, "op": "eq", "value": value}, f"{header} equal to {value}",
                lambda row: row[i] == value)
    header = rng.choice(t.headers_of("amount", "int", "date"))
    value = rng.choice(t.values(header))
    i = t.index(header)
    is_date = t.column(header).kind == "date"
    if rng.random() < 0.5:
        word = "later than" if is_date else "greater than"
        return ({"column": header, "op": "gt", "value": cell_text(value)}, f"{header} {word} {cell_text(value)}",
                lambda row: row[i] > value)
    word = "earlier than" if is_date else "less than"
    return ({"column": header, "op": "lt", "value": cell_text(value)}, f"{header} {word} {cell_text(value)}",
            lambda row: row[i] < value)


def count(rng: random.Random, t: Table) -> Optional[Question]:
    spec, phrase, keep = _filter(rng, t)
    n = sum(1 for row in t.rows if keep(row))
    text = f"In table {t.name}, how many rows have {phrase}?"
    return Question("global", "count", text, str(n), {"op": "count", "table": t.name, "filter": spec})


def sum_filter(rng: random.Random, t: Table) -> Optional[Question]:
    header = rng.choice(t.headers_of(*NUMERIC_KINDS))
    spec, phrase, keep = _filter(rng, t)
    i = t.index(header)
    values = [row[i] for row in t.rows if keep(row)]
    total = sum(values, Decimal("0.00") if t.column(header).kind == "amount" else 0)
    text = f"In table {t.name}, what is the sum of {header} over the rows with {phrase}?"
    return Question("global", "sum_filter", text, cell_text(total),
                    {"op": "sum", "table": t.name, "column": header, "filter": spec})


def average(rng: random.Random, t: Table) -> Optional[Question]:
    header = rng.choice(t.headers_of(*NUMERIC_KINDS))
    i = t.index(header)
    query = {"op": "average", "table": t.name, "column": header}
    scope, rows = "all rows", t.rows
    if rng.random() < 0.5:
        spec, phrase, keep = _filter(rng, t)
        kept = [row for row in t.rows if keep(row)]
        if kept:
            scope, rows, query["filter"] = f"the rows with {phrase}", kept, spec
    values = [Decimal(row[i]) for row in rows]
    mean = (sum(values) / len(values)).quantize(CENT, rounding=ROUND_HALF_UP)
    text = f"In table {t.name}, what is the average {header} over {scope}, rounded to 2 decimal places (half up)?"
    return Question("global", "average", text, f"{mean:.2f}", query)


def extreme(rng: random.Random, t: Table) -> Optional[Question]:
    headers = t.headers_of("amount", "int", "date")
    rng.shuffle(headers)
    for header in headers:
        i = t.index(header)
        largest = rng.random() < 0.5
        values = [row[i] for row in t.rows]
        best = max(values) if largest else min(values)
        if values.count(best) != 1:
            continue
        key = next(row[0] for row in t.rows if row[i] == best)
        is_date = t.column(header).kind == "date"
        word = ("latest" if largest else "earliest") if is_date else ("largest" if largest else "smallest")
        text = f"In table {t.name}, which {t.key} has the {word} {header}?"
        return Question("global", "extreme", text, key,
                        {"op": "extreme", "table": t.name, "column": header, "largest": largest,
                         "return_column": t.key})
    return None


def top_k(rng: random.Random, t: Table) -> Optional[Question]:
    headers = t.headers_of("amount", "int", "date")
    rng.shuffle(headers)
    k = min(rng.randint(2, 5), len(t.rows) - 1)
    largest = rng.random() < 0.5
    for header in headers:
        i = t.index(header)
        ranked = sorted(t.rows, key=lambda row: row[i], reverse=largest)
        top = [row[i] for row in ranked[:k + 1]]
        if len(set(top)) != len(top):  # ties would make the order or the cut ambiguous
            continue
        keys = [row[0] for row in ranked[:k]]
        if t.column(header).kind == "date":
            most, least = ("latest", "earliest") if largest else ("earliest", "latest")
        else:
            most, least = ("largest", "smallest") if largest else ("smallest", "largest")
        text = (f"In table {t.name}, list the {t.key} of the {k} rows with the {most} {header}, "
                f"from {most} to {least}, separated by commas.")
        return Question("global", "top_k", text, ", ".join(keys),
                        {"op": "top_k", "table": t.name, "column": header, "k": k, "largest": largest,
                         "return_column": t.key})
    return None


SINGLE_TABLE = {"lookup": lookup, "match": match, "compare": compare, "sum_rows": sum_rows, "product": product,
                "count": count, "sum_filter": sum_filter, "average": average, "extreme": extreme, "top_k": top_k}
