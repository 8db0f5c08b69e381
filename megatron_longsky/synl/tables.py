"""SynL tables: typed column generators, random schemas, and the three serialisations.

A :class:`Table` holds typed Python values (``str``, ``int``, ``Decimal`` with two
places, ``datetime.date``); questions are computed from these values, and the
serialised text is what the model (and the independent verifier) sees. Cell texts
never contain ``|`` or newlines; a few names and places carry commas, apostrophes or
non-ASCII letters (CSV quotes them), and name/place cells can be missing
(``MISSING``, written ``N/A`` in every format).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import random
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

FORMATS = ("markdown", "csv", "jsonl")

FIRST_NAMES = ("Alice", "Bruno", "Chen", "Dana", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira",
               "Liam", "Maya", "Nikolai", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera",
               "Wei", "Ximena", "Yusuf", "Zara", "Amir", "Bianca", "Carlos", "Dmitri", "Emma", "Felix",
               "Hana", "Ivan", "Julia", "Kenji", "Lena", "Marco", "Nora", "Oscar", "Zoë", "José", "Søren",
               "Anaïs", "Łukasz", "Çağla", "Björn", "Renée")
LAST_NAMES = ("Smith", "Garcia", "Tanaka", "Muller", "Rossi", "Novak", "Kowalski", "Silva", "Dubois", "Jensen",
              "Okafor", "Haddad", "Kim", "Nguyen", "Patel", "Ivanova", "Larsen", "Moreau", "Costa", "Weber",
              "Fischer", "Romano", "Santos", "Yilmaz", "Berg", "Lindqvist", "Horvat", "Mendes", "Sato", "Brown",
              "Wilson", "Clark", "Lopez", "Schmidt", "Bauer", "Quinto", "Eriksen", "Popescu", "Adeyemi", "Zhou",
              "Müller", "Núñez", "Dvořák", "O'Brien", "Ødegaard", "Smith, Jr.")
PLACES = ("Lisbon", "Oslo", "Nairobi", "Osaka", "Lima", "Porto", "Zurich", "Denver", "Austin", "Krakow",
          "Hanoi", "Dublin", "Seville", "Tallinn", "Quito", "Perth", "Bergen", "Leeds", "Lyon", "Graz",
          "Kyoto", "Accra", "Bogota", "Malmo", "Turin", "Riga", "Tucson", "Halifax", "Cebu", "Izmir",
          "Kraków", "São Paulo", "Reykjavík", "Tromsø", "Washington, D.C.", "St. John's")
CATEGORIES = {
    "Status": ("Active", "Pending", "Closed", "Suspended"),
    "Department": ("Sales", "Finance", "Engineering", "Marketing", "Support", "Legal"),
    "Tier": ("Gold", "Silver", "Bronze", "Platinum"),
    "Region": ("North", "South", "East", "West", "Central"),
    "Product": ("Laptop", "Monitor", "Keyboard", "Printer", "Router", "Tablet", "Camera"),
    "Channel": ("Online", "Retail", "Partner", "Direct"),
}
HEADERS = {
    "name": ("Customer", "Employee", "Manager", "Contact", "Owner"),
    "place": ("City", "Branch", "Destination", "Office"),
    "date": ("Date", "Start Date", "Due Date", "Signup Date", "Shipped On"),
    "amount": ("Price", "Revenue", "Balance", "Cost", "Budget"),
    "int": ("Quantity", "Units", "Age", "Stock", "Visits"),
}
INT_RANGES = {"Quantity": (1, 500), "Units": (1, 2000), "Age": (18, 90), "Stock": (0, 9999), "Visits": (0, 5000)}
# (entity table, record table) names for multi-table samples; single tables use the first.
ENTITIES = (("Customers", "Customer", "CU", "Orders", "Order", "OR"),
            ("Employees", "Employee", "EM", "Projects", "Project", "PJ"),
            ("Suppliers", "Supplier", "SU", "Shipments", "Shipment", "SH"),
            ("Members", "Member", "ME", "Bookings", "Booking", "BK"),
            ("Stores", "Store", "ST", "Invoices", "Invoice", "IN"))

NUMERIC_KINDS = ("amount", "int")
# Name and place cells are missing with this probability (never keys, numbers, dates or categories).
MISSING = "N/A"
MISSING_RATE = 0.08
MAY_BE_MISSING = ("name", "place")


@dataclass
class Column:
    header: str
    kind: str  # id | ref | name | place | date | amount | int | category
    vocabulary: tuple = ()
    prefix: str = ""
    low: int = 0
    high: int = 0

    def make(self, rng: random.Random) -> Any:
        if self.kind == "name":
            return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        if self.kind == "place":
            return rng.choice(PLACES)
        if self.kind == "category":
            return rng.choice(self.vocabulary)
        if self.kind == "date":
            return dt.date(2000, 1, 1) + dt.timedelta(days=rng.randrange(9000))
        if self.kind == "amount":
            return Decimal(rng.randrange(100, 5_000_000)) / 100
        if self.kind == "int":
            return rng.randint(self.low, self.high)
        raise ValueError(f"column {self.header!r} of kind {self.kind!r} is not generated per cell")


def cell_text(value: Any) -> str:
    if isinstance(value, Decimal):
        return f"{value:.2f}"
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)


@dataclass
class Table:
    name: str
    columns: list[Column]
    rows: list[list] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.columns[0].header

    @property
    def headers(self) -> list[str]:
        return [c.header for c in self.columns]

    def index(self, header: str) -> int:
        return self.headers.index(header)

    def column(self, header: str) -> Column:
        return self.columns[self.index(header)]

    def values(self, header: str) -> list:
        i = self.index(header)
        return [row[i] for row in self.rows]

    def headers_of(self, *kinds: str) -> list[str]:
        return [c.header for c in self.columns if c.kind in kinds]


def make_schema(rng: random.Random, name: str, key_header: str, key_prefix: str, budget_tokens: int,
                extra: list[Column] = ()) -> Table:
    """A key column, an amount, an integer and a category always (every question kind can be
    asked), then more columns as the token budget allows."""
    used = {key_header} | {c.header for c in extra}

    def pick(kind):
        header = rng.choice([h for h in HEADERS[kind] if h not in used])
        used.add(header)
        if kind == "int":
            low, high = INT_RANGES[header]
            return Column(header, "int", low=low, high=high)
        return Column(header, kind)

    def pick_category():
        header = rng.choice([h for h in CATEGORIES if h not in used])
        used.add(header)
        return Column(header, "category", vocabulary=CATEGORIES[header])

    columns = [pick("amount"), pick("int"), pick_category()]
    optional = ["date", "name", "place", "amount", "category"]
    rng.shuffle(optional)
    n_optional = 0 if budget_tokens < 600 else 1 if budget_tokens < 1500 else rng.randint(2, 4)
    for kind in optional[:n_optional]:
        columns.append(pick_category() if kind == "category" else pick(kind))
    columns = list(extra) + columns
    rng.shuffle(columns)
    return Table(name, [Column(key_header, "id", prefix=key_prefix)] + columns)


def new_keys(rng: random.Random, prefix: str, count: int, taken: set) -> list[str]:
    keys = []
    while len(keys) < count:
        key = f"{prefix}-{rng.randrange(100000):05d}"
        if key not in taken:
            taken.add(key)
            keys.append(key)
    return keys


def make_rows(rng: random.Random, table: Table, count: int, taken: set, refs: list[str] = ()) -> list[list]:
    """``count`` new rows (keys unique within ``taken``); ``ref`` columns draw from ``refs``."""
    keys = new_keys(rng, table.columns[0].prefix, count, taken)
    rows = []
    for key in keys:
        row = [key]
        for col in table.columns[1:]:
            if col.kind == "ref":
                row.append(rng.choice(refs))
            elif col.kind in MAY_BE_MISSING and rng.random() < MISSING_RATE:
                row.append(MISSING)
            else:
                row.append(col.make(rng))
        rows.append(row)
    return rows


# -- serialisation --------------------------------------------------------------------------


def title_line(table: Table, fmt: str) -> str:
    return f"Table {table.name} ({fmt}):\n"


def header_text(table: Table, fmt: str) -> str:
    if fmt == "markdown":
        return "| " + " | ".join(table.headers) + " |\n|" + "---|" * len(table.headers) + "\n"
    if fmt == "csv":
        return _csv_line(table.headers)
    if fmt == "jsonl":
        return ""
    raise ValueError(f"table format {fmt!r} is not one of {list(FORMATS)}")


def _csv_line(cells: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(cells)
    return buf.getvalue()


def _json_value(value: Any) -> str:
    if isinstance(value, Decimal):
        return f"{value:.2f}"  # a JSON number literal with its two decimals kept
    if isinstance(value, int):
        return str(value)
    return json.dumps(cell_text(value), ensure_ascii=False)


def row_line(table: Table, row: list, fmt: str) -> str:
    if fmt == "markdown":
        return "| " + " | ".join(cell_text(v) for v in row) + " |\n"
    if fmt == "csv":
        return _csv_line([cell_text(v) for v in row])
    if fmt == "jsonl":
        return "{" + ", ".join(f"{json.dumps(h)}: {_json_value(v)}" for h, v in zip(table.headers, row)) + "}\n"
    raise ValueError(f"table format {fmt!r} is not one of {list(FORMATS)}")


def serialise(table: Table, fmt: str) -> str:
    """The table as it appears in the prompt: title line, header, one line per row."""
    return title_line(table, fmt) + header_text(table, fmt) + "".join(row_line(table, r, fmt) for r in table.rows)
