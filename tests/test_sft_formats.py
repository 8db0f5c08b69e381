"""Chat record shapes and chat templates: turns, errors with file:line, exact loss masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_longsky.sft.formats import SFTFormatError, Turn, parse_record
from megatron_longsky.sft.template import BUILTIN_NAME, ChatTemplate, ChatTemplateError
from megatron_longsky.tokenizer import ByteTokenizer, TokenizerConfig, build_tokenizer, train_bpe_tokenizer

# A ChatML-style template with {% generation %} marks, so transformers can compute its own
# assistant mask to compare against ours.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = {"messages": [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is in row 3 of the table?"},
    {"role": "assistant", "content": " The value 123, in column Price."},
    {"role": "user", "content": "And the total?"},
    {"role": "assistant", "content": "456 dollars (worked out 123 + 333)."},
]}


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    from tokenizers import Tokenizer

    texts = [m["content"] for m in CONVERSATION["messages"]] * 20 + ["hello world table rows 0123456789"] * 20
    d = train_bpe_tokenizer(texts, 330, tmp_path_factory.mktemp("chatml"))
    tk = Tokenizer.from_file(str(d / "tokenizer.json"))
    tk.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    (d / "tokenizer.json").write_text(tk.to_str(), encoding="utf-8")
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML
    (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return d


def test_three_shapes_give_the_same_turns():
    messages = parse_record(CONVERSATION, "f:1")
    sharegpt = parse_record({"conversations": [
        {"from": "system", "value": "You answer briefly."},
        {"from": "human", "value": "What is in row 3 of the table?"},
        {"from": "gpt", "value": " The value 123, in column Price."},
        {"from": "human", "value": "And the total?"},
        {"from": "gpt", "value": "456 dollars (worked out 123 + 333)."}]}, "f:2")
    assert messages == sharegpt
    alpaca = parse_record({"instruction": "Sum these", "input": "1 2", "output": "3"}, "f:3")
    assert alpaca == [Turn("user", "Sum these\n\n1 2"), Turn("assistant", "3")]
    assert parse_record({"instruction": "Hi", "input": "", "output": "Hello"}, "f:4")[0] == Turn("user", "Hi")


def test_system_prompt_option_and_record_system_field():
    rec = {"instruction": "Hi", "output": "Hello"}
    assert parse_record(rec, "f:1", system_prompt="Be kind.")[0] == Turn("system", "Be kind.")
    # the record's own system turn wins over the option
    own = parse_record({**rec, "system": "Mine."}, "f:1", system_prompt="Be kind.")
    assert own[0] == Turn("system", "Mine.") and sum(t.role == "system" for t in own) == 1
    assert parse_record(CONVERSATION, "f:1", system_prompt="X")[0].content == "You answer briefly."


@pytest.mark.parametrize("record,kind,text", [
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, "missing_role", "has no 'role'"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}, "empty_turn", "empty"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}, "wrong_type", "string"),
    ({"messages": "hello"}, "wrong_type", "must be a list"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "bad_role", "unknown role"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant", "does not end with an assistant"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "bad_order", "'user' was expected"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "bad_order", "system"),
    ({"messages": []}, "empty_conversation", "no turns"),
    ({"conversations": [{"from": "human"}]}, "missing_content", "has no 'value'"),
    ({"instruction": "hi"}, "missing_field", "'output'"),
    ({"instruction": "hi", "output": ""}, "empty_turn", "'output' is empty"),
    ({"instruction": ["a"], "output": "b"}, "wrong_type", "'instruction'"),
    ({"text": "plain"}, "unknown_format", "cannot tell"),
    (["not", "a", "dict"], "wrong_type", "JSON object"),
])
def test_bad_records_name_file_line_and_kind(record, kind, text):
    with pytest.raises(SFTFormatError, match=text) as info:
        parse_record(record, "data/chat.jsonl:17")
    assert str(info.value).startswith("data/chat.jsonl:17: ")
    assert info.value.kind == kind


def _masked_spans(ids, mask):
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(int(i))
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return spans


def test_builtin_template_mask_is_exactly_the_assistant_text_and_eod():
    tok = ByteTokenizer()
    template = ChatTemplate(tok)
    assert template.name == BUILTIN_NAME
    turns = parse_record(CONVERSATION, "f:1")
    ids, mask = template.encode(turns)
    assert ids.shape == mask.shape and mask.dtype == np.uint8
    assistant = [t.content for t in turns if t.role == "assistant"]
    assert _masked_spans(ids, mask) == [tok.encode(a) + [tok.eod_id] for a in assistant]
    text = tok.decode(ids)
    assert text.startswith("<bos><|system|>\nYou answer briefly.\n<|user|>\nWhat is in row 3")
    assert "<|assistant|>\n The value 123, in column Price.<eod><|user|>\nAnd the total?\n<|assistant|>\n" in text
    # the inference prompt is the training prefix up to the assistant's first token
    prompt = template.encode_prompt(turns[:2])
    first_target = int(np.argmax(mask))
    assert prompt == list(ids[:first_target])
    assert template.stop_ids() == [tok.eod_id]


def test_hf_template_mask_equals_transformers_assistant_mask(chatml_dir):
    from transformers import AutoTokenizer

    tok = build_tokenizer(TokenizerConfig(type="hf", model=str(chatml_dir)))
    template = ChatTemplate(tok)
    assert template.name.startswith("jinja-")
    turns = parse_record(CONVERSATION, "f:1")
    ids, mask = template.encode(turns)
    hf = AutoTokenizer.from_pretrained(str(chatml_dir))
    ref = hf.apply_chat_template(CONVERSATION["messages"], tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    assert list(ids) == list(ref["input_ids"])
    assert list(mask) == list(ref["assistant_masks"])
    assert mask.sum() > 0 and mask[0] == 0
    prompt_ids = hf.apply_chat_template(CONVERSATION["messages"][:2], tokenize=True, return_dict=True,
                                        add_generation_prompt=True)["input_ids"]
    assert template.encode_prompt(turns[:2]) == list(prompt_ids)
    assert tok.token_to_id("<|im_end|>") in template.stop_ids()
    # the builtin template can be forced even when the tokenizer has its own
    assert ChatTemplate(tok, "builtin").name == BUILTIN_NAME


def test_non_incremental_template_is_refused(tmp_path):
    path = tmp_path / "bad.jinja"
    # renders the turn count first: every render rewrites the beginning
    path.write_text("{{ messages|length }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    template = ChatTemplate(ByteTokenizer(), str(path))
    with pytest.raises(ChatTemplateError, match="not incremental"):
        template.encode([Turn("user", "a"), Turn("assistant", "b")])
    with pytest.raises(ChatTemplateError, match="does not exist"):
        ChatTemplate(ByteTokenizer(), str(tmp_path / "missing.jinja"))


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30).filter(str.strip)


# A reply starting with whitespace is the one place our per-segment tokens may differ from
# tokenizing the rendered text whole: BPE could merge it with the template's "\n" before it.
# We keep the split there on purpose (at inference the prompt ends at that "\n").
_reply = _text.filter(lambda t: not t[0].isspace())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(_text, _reply), min_size=1, max_size=3), st.one_of(st.none(), _text))
def test_masks_match_transformers_on_random_conversations(chatml_dir, pairs, system):
    from transformers import AutoTokenizer

    messages = ([{"role": "system", "content": system}] if system else []) + [
        m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    turns = parse_record({"messages": messages}, "f:1")
    hf_tok = _hf_cache.setdefault(str(chatml_dir), AutoTokenizer.from_pretrained(str(chatml_dir)))
    tok = _ours_cache.setdefault(str(chatml_dir), build_tokenizer(TokenizerConfig(type="hf", model=str(chatml_dir))))
    ids, mask = ChatTemplate(tok).encode(turns)
    ref = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert list(ids) == list(ref["input_ids"]) and list(mask) == list(ref["assistant_masks"])
    # and the built-in template's masked spans are exactly each answer plus EOD
    byte = ByteTokenizer()
    b_ids, b_mask = ChatTemplate(byte).encode(turns)
    assert _masked_spans(b_ids, b_mask) == [byte.encode(a) + [byte.eod_id] for _, a in pairs]


_hf_cache: dict = {}
_ours_cache: dict = {}
