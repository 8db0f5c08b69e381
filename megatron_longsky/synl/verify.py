"""Independent checking of SynL records, and exact-match scoring of model answers.

The verifier reads only the record: it parses the serialised tables out of the user
message TEXT (Markdown, CSV or JSON lines), interprets cells by their text (integers,
two-decimal amounts, ISO dates, strings), evaluates ``meta["query"]`` on them and
compares with ``meta["answer"]`` and with the assistant's final ``Answer:`` line. It
imports nothing from the generator, so a bug there cannot hide itself here.

``score_answer(predicted, record)`` is the held-out accuracy metric: exact match of the
final answer after normalisation -- take the text after the last ``Answer:`` (else the
last non-empty line), strip spaces, surrounding quotes/backticks/asterisks and a final
period, collapse inner whitespace, compare case-insensitively; when both sides are
numbers, compare their values (``12.5`` matches ``12.50``).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

TITLE = re.compile(r"^Table (\S+) \((markdown|csv|jsonl)\):$")
INT_TEXT = re.compile(r"^-?\d+$")
AMOUNT_TEXT = re.compile(r"^-?\d+\.\d{2}$")
DATE_TEXT = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class VerificationError(ValueError):
    pass


# -- parsing the text ---------------------------------------------------------------------


def _value(text: str):
    if INT_TEXT.match(text):
        return int(text)
    if AMOUNT_TEXT.match(text):
        return Decimal(text)
    if DATE_TEXT.match(text):
        return dt.date.fromisoformat(text)
    return text


def _text(value) -> str:
    if isinstance(value, Decimal):
        return f"{value:f}"  # as many decimals as the value carries: never rounds a mistake away
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)


def _parse_block(fmt: str, lines: list[str]) -> tuple[list[str], list[dict]]:
    if fmt == "markdown":
        def cells(line):
            if not (line.startswith("|") and line.endswith("|")):
                raise VerificationError(f"not a markdown table row: {line[:80]!r}")
            return [c.strip() for c in line[1:-1].split("|")]
        header = cells(lines[0])
        if not re.fullmatch(r"\|(-{3,}\|)+", lines[1]):
            raise VerificationError("markdown table without a separator line")
        rows = [dict(zip(header, map(_value, cells(line)))) for line in lines[2:]]
    elif fmt == "csv":
        parsed = list(csv.reader(lines))
        header = parsed[0]
        rows = [dict(zip(header, map(_value, r))) for r in parsed[1:]]
    else:
        objects = [json.loads(line, parse_float=Decimal) for line in lines]
        header = list(objects[0])
        rows = [{k: _value(v) if isinstance(v, str) else v for k, v in obj.items()} for obj in objects]
    for row in rows:
        if list(row) != header:
            raise VerificationError(f"a row does not have the columns {header}")
    return header, rows


def parse_prompt(text: str) -> tuple[dict[str, tuple[list[str], list[dict]]], str]:
    """Tables (name -> (header, rows)) and the question, read from a SynL user message."""
    lines = text.split("\n")
    tables: dict = {}
    question = None
    i = 0
    while i < len(lines):
        title = TITLE.match(lines[i])
        if title:
            j = i + 1
            while j < len(lines) and lines[j]:
                j += 1
            tables[title.group(1)] = _parse_block(title.group(2), lines[i + 1:j])
            i = j
        elif lines[i].startswith("Question: "):
            question = "\n".join(lines[i:])[len("Question: "):]
            break
        i += 1
    if not tables or question is None:
        raise VerificationError("the prompt has no table or no 'Question:' line")
    return tables, question


# -- evaluating a query --------------------------------------------------------------------


def _table(tables, name):
    if name not in tables:
        raise VerificationError(f"table {name!r} is not in the prompt")
    return tables[name][1]


def _one(rows, column, value):
    found = [r for r in rows if _text(r[column]) == value]
    if len(found) != 1:
        raise VerificationError(f"{len(found)} rows have {column} = {value!r} (expected exactly one)")
    return found[0]


def _keep(row, spec) -> bool:
    cell = row[spec["column"]]
    if spec["op"] == "eq":
        return _text(cell) == spec["value"]
    if spec["op"] == "gt":
        return cell > _value(spec["value"])
    if spec["op"] == "lt":
        return cell < _value(spec["value"])
    raise VerificationError(f"unknown filter op {spec['op']!r}")


def _zero_like(rows, column):
    return Decimal("0.00") if rows and isinstance(rows[0][column], Decimal) else 0


def evaluate(query: dict, tables) -> str:
    op = query["op"]
    rows = _table(tables, query["table"])
    if op == "lookup":
        return _text(_one(rows, query["key_column"], query["key"])[query["column"]])
    if op == "match":
        return _text(_one(rows, query["column"], query["value"])[query["return_column"]])
    if op == "multi_hop":
        link = _one(rows, query["key_column"], query["key"])[query["link_column"]]
        target = _one(_table(tables, query["target_table"]), query["target_key_column"], _text(link))
        return _text(target[query["column"]])
    if op == "compare":
        a, b = (_one(rows, query["key_column"], k) for k in query["keys"])
        col = query["column"]
        if a[col] == b[col]:
            raise VerificationError("compare: equal values")
        hi, lo = (a, b) if a[col] > b[col] else (b, a)
        return f"{hi[query['key_column']]}, {_text(hi[col] - lo[col])}"
    if op == "sum_rows":
        picked = [_one(rows, query["key_column"], k)[query["column"]] for k in query["keys"]]
        return _text(sum(picked[1:], picked[0]))
    if op == "product":
        row = _one(rows, query["key_column"], query["key"])
        count, amount = (row[c] for c in query["columns"])
        return _text(Decimal(count) * amount)
    if op == "count":
        return str(sum(1 for r in rows if _keep(r, query["filter"])))
    if op == "sum":
        col = query["column"]
        return _text(sum((r[col] for r in rows if _keep(r, query["filter"])), _zero_like(rows, col)))
    if op == "average":
        values = [Decimal(r[query["column"]]) for r in rows if "filter" not in query or _keep(r, query["filter"])]
        if not values:
            raise VerificationError("average: the filter keeps no row")
        return _text((sum(values) / len(values)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))
    if op in ("extreme", "top_k"):
        col = query["column"]
        ordered = sorted(rows, key=lambda r: r[col], reverse=query.get("largest", True))
        k = query.get("k", 1)
        head = [r[col] for r in ordered[:k + 1]]
        if len(set(head)) != len(head):
            raise VerificationError(f"{op}: ties among the first values of {col}")
        return ", ".join(_text(r[query["return_column"]]) for r in ordered[:k])
    raise VerificationError(f"unknown query op {op!r}")


def _string_args(query: dict) -> list[str]:
    out = []
    for key, value in query.items():
        if key in ("op", "largest", "k"):
            continue
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, list):
            out.extend(v for v in value if isinstance(v, str))
        elif isinstance(value, dict):
            out.extend(_string_args(value))
    return out


def recompute_answer(record: dict) -> str:
    """The answer recomputed from the user message text and the record's query."""
    user = next(m["content"] for m in record["messages"] if m["role"] == "user")
    tables, question = parse_prompt(user)
    query = record["meta"]["query"]
    filter_op = (query.get("filter") or {}).get("op")
    missing = [s for s in _string_args(query) if s not in question and s not in ("eq", "gt", "lt", filter_op)]
    if missing:
        raise VerificationError(f"the question text does not mention {missing}")
    return evaluate(query, tables)


def verify_record(record: dict) -> list[str]:
    """Problems with a record (empty when it is right)."""
    problems = []
    try:
        expected = recompute_answer(record)
    except (VerificationError, KeyError, ValueError, InvalidOperation) as exc:
        return [f"{record.get('meta', {}).get('id')}: cannot recompute: {exc}"]
    meta = record["meta"]
    if expected != meta["answer"]:
        problems.append(f"{meta['id']}: meta answer {meta['answer']!r} != recomputed {expected!r}")
    assistant = record["messages"][-1]["content"]
    if extract_final_answer(assistant) != expected:
        problems.append(f"{meta['id']}: assistant's final answer does not state {expected!r}")
    return problems


# -- scoring ---------------------------------------------------------------------------------


def extract_final_answer(text: str) -> str:
    found = list(re.finditer(r"answer\s*:", text, flags=re.IGNORECASE))
    if found:
        return text[found[-1].end():].strip()
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def normalise_answer(text: str) -> str:
    text = extract_final_answer(text) if "\n" in text or re.search(r"answer\s*:", text, re.I) else text
    text = text.strip().strip("`*\"'").strip()
    text = text[:-1] if text.endswith(".") else text
    return re.sub(r"\s+", " ", text).casefold()


def _number(text: str):
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def score_answer(predicted: str, record: dict) -> bool:
    """Exact match of the final answer (see the module docstring for the normalisation)."""
    gold = normalise_answer(record["meta"]["answer"])
    got = normalise_answer(predicted)
    if got == gold:
        return True
    a, b = _number(got), _number(gold)
    return a is not None and b is not None and a == b


def partial_credit(predicted: str, record: dict) -> float:
    """A graded view beside exact match: 1.0 for a correct answer, otherwise the
    similarity (difflib ratio, 0-1) of the normalised final answer to the reference,
    so a near miss (one wrong digit of a key) counts partly and an empty reply 0."""
    if score_answer(predicted, record):
        return 1.0
    from difflib import SequenceMatcher

    gold, got = normalise_answer(record["meta"]["answer"]), normalise_answer(predicted)
    return SequenceMatcher(None, got, gold, autojunk=False).ratio() if got and gold else 0.0
