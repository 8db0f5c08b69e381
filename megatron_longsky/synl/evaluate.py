"""Held-out SynL accuracy for any generation function (exact match of the final answer,
and a partial-credit view: see :func:`megatron_longsky.synl.verify.partial_credit`).

    from megatron_longsky.synl.evaluate import synl_accuracy
    report = synl_accuracy(records, generate, tokenizer)   # {"accuracy", "correct", "total", "by_family", ...}

``generate(prompt_ids, max_new_tokens, stop_ids) -> new token ids`` is the model side
(greedy decoding in the quickstart); prompts are built with the same chat template as
training (:meth:`ChatTemplate.encode_prompt`), answers scored with
:func:`megatron_longsky.synl.verify.score_answer`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Optional

from megatron_longsky.sft.template import ChatTemplate
from megatron_longsky.synl.generate import prompt_turns
from megatron_longsky.synl.verify import partial_credit, score_answer

Generate = Callable[[list[int], int, list[int]], list[int]]


def synl_accuracy(records: Iterable[dict], generate: Generate, tokenizer, template: Optional[ChatTemplate] = None,
                  max_new_tokens: Optional[int] = None, keep_outputs: int = 5) -> dict:
    """Score ``generate`` on ``records``. ``max_new_tokens`` defaults to each record's
    reference answer length plus 16 tokens."""
    template = template or ChatTemplate(tokenizer)
    stop_ids = template.stop_ids()
    correct = total = 0
    by_family: dict = defaultdict(lambda: [0, 0])
    by_kind: dict = defaultdict(lambda: [0, 0, 0.0])
    credit_total = 0.0
    examples = []
    for record in records:
        prompt = template.encode_prompt(prompt_turns(record))
        budget = max_new_tokens or record["meta"].get("answer_tokens", 48) + 16
        new_ids = [i for i in generate(prompt, budget, stop_ids) if i not in stop_ids]
        text = tokenizer.decode(new_ids)
        ok = score_answer(text, record)
        credit = partial_credit(text, record)
        correct += ok
        credit_total += credit
        kind = by_kind[f"{record['meta']['family']}/{record['meta']['kind']}"]
        kind[0] += ok
        kind[1] += 1
        kind[2] += credit
        total += 1
        family = record["meta"]["family"]
        by_family[family][0] += ok
        by_family[family][1] += 1
        if len(examples) < keep_outputs:
            examples.append({"id": record["meta"]["id"], "kind": record["meta"]["kind"],
                             "answer": record["meta"]["answer"], "output": text, "correct": bool(ok)})
    return {
        "accuracy": correct / total if total else 0.0,
        "correct": correct,
        "total": total,
        "partial_credit": credit_total / total if total else 0.0,
        "by_kind": {k: {"accuracy": c / n, "correct": c, "total": n, "partial_credit": p / n}
                    for k, (c, n, p) in sorted(by_kind.items())},
        "by_family": {f: {"accuracy": c / n, "correct": c, "total": n} for f, (c, n) in sorted(by_family.items())},
        "examples": examples,
    }
