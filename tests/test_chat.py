"""Conversations (data.format messages) and plain text (data.format text), on SmolLM2-135M-Instruct's real tokenizer
and its real ChatML chat template.

The assistant-only mask is built by rendering prefixes of the conversation (chat.py); here it is checked against an
independent construction: transformers' own `return_assistant_tokens_mask` on a copy of SmolLM2's template with
`{% generation %}` markers around what the assistant generates.
"""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import EXACT_FP64, REPO, stopped_copy
from rich.console import Console
from test_distributed import torchrun, write_recipe
from test_packing import assert_packing_is_exact
from test_train import factors, max_rel_diff, tiny_recipe
from typer.testing import CliRunner

from milora_cli.cli import app
from milora_cli.data import chat, quickstart, records, tokens
from milora_cli.data.chat import Conversation, Message
from milora_cli.errors import DataError
from milora_cli.evaluation import generate
from milora_cli.recipe import DataConfig, validate
from milora_cli.training.train import train

# SmolLM2-135M-Instruct's chat_template.jinja (the file beside its tokenizer in milora's model cache, as the
# HuggingFaceTB/SmolLM2-135M-Instruct repository ships it), with transformers' generation markers added around the
# assistant's content and its <|im_end|>, and nothing else changed. Marker placement as in the template PRs by TRL's
# maintainer (huggingface.co/allenai/AstaBrief_8B/discussions/3: the "<|im_start|>assistant\n" header outside the
# mask, "the mask covers what the model generates, up to and including <|im_end|>") and transformers PR #30650,
# which added {% generation %} and return_assistant_tokens_mask.
SMOLLM2_TEMPLATE_WITH_MARKERS = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SYSTEM = Message("system", "You are a terse assistant.")
CONVERSATIONS = {
    "single turn, system prompt": (SYSTEM, Message("user", "Which is larger, 384 or 371?"), Message("assistant", "384")),
    "three turns, system prompt": (
        SYSTEM,
        Message("user", "Reverse the order of the words: lamp tiger apple"),
        Message("assistant", "apple tiger lamp"),
        Message("user", "Now sort from smallest to largest: 42, 7, 19"),
        Message("assistant", "7, 19, 42"),
        Message("user", "Thanks! Say hi in French, two words with a newline between."),
        Message("assistant", " Bonjour\ntout le monde. "),  # leading/trailing spaces and a newline inside
    ),
    "two turns, the template's default system prompt": (
        Message("user", "Hi"), Message("assistant", "Hello! How can I help?"), Message("user", "Count to 3."), Message("assistant", "1 2 3"),
    ),
    "ends on a user turn": (SYSTEM, Message("user", "Hi"), Message("assistant", "Hello."), Message("user", "Bye")),
}


def as_dicts(messages) -> list[dict]:
    return [m._asdict() for m in messages]


def test_the_real_template_is_chatml_and_the_marked_copy_renders_it_byte_for_byte(smol_tokenizer):
    assert smol_tokenizer.chat_template and "<|im_start|>" in smol_tokenizer.chat_template
    for messages in CONVERSATIONS.values():
        for generation_prompt in (False, True):
            real = smol_tokenizer.apply_chat_template(as_dicts(messages), tokenize=False, add_generation_prompt=generation_prompt)
            marked = smol_tokenizer.apply_chat_template(as_dicts(messages), tokenize=False, add_generation_prompt=generation_prompt,
                                                        chat_template=SMOLLM2_TEMPLATE_WITH_MARKERS)
            assert real == marked


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_the_assistant_mask_equals_the_generation_markers_mask(smol_tokenizer, name):
    messages = CONVERSATIONS[name]
    ids, trained = chat.tokenize_conversation(smol_tokenizer, Conversation(messages, None))
    reference = smol_tokenizer.apply_chat_template(as_dicts(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                                   chat_template=SMOLLM2_TEMPLATE_WITH_MARKERS)
    assert ids == list(reference["input_ids"])  # the pieces tokenised apart are the whole text tokenised at once
    assert [int(on) for on in trained] == list(reference["assistant_masks"])
    n_assistant = sum(m.role == "assistant" for m in messages)
    im_end = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sum(token == im_end for token, on in zip(ids, trained, strict=True) if on) == n_assistant  # each turn's end is learnt


def test_the_trained_text_is_each_assistant_content_and_its_end_of_turn_token(smol_tokenizer):
    messages = CONVERSATIONS["three turns, system prompt"]
    ids, trained = chat.tokenize_conversation(smol_tokenizer, Conversation(messages, None))
    runs, current = [], []
    for token, on in zip(ids, trained, strict=True):
        if on:
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    assert [smol_tokenizer.decode(run) for run in runs] == [m.content + "<|im_end|>" for m in messages if m.role == "assistant"]


def test_train_on_prompt_trains_every_token_and_truncation_keeps_the_first(smol_tokenizer):
    conversation = Conversation(CONVERSATIONS["three turns, system prompt"], None)
    ids, _ = chat.tokenize_conversation(smol_tokenizer, conversation)
    everything = tokens.tokenize_example(conversation, smol_tokenizer, 10_000, train_on_prompt=True)
    assert everything.input_ids == ids and everything.labels == ids
    cut = tokens.tokenize_example(conversation, smol_tokenizer, 20, train_on_prompt=False)
    assert cut is None  # the first 20 tokens are the system prompt and the question: nothing left to learn


def test_sharegpt_conversations_are_the_same_conversation_as_openai_messages():
    openai = {"messages": [{"role": r, "content": c} for r, c in [("system", "S"), ("user", "Q"), ("assistant", "A")]], "answer": 7}
    sharegpt = {"conversations": [{"from": f, "value": v} for f, v in [("system", "S"), ("human", "Q"), ("gpt", "A")]], "answer": 7}
    assert records.detect_format(openai) == records.detect_format(sharegpt) == "messages"
    first, second = (records.normalize_record(raw, "auto") for raw in (openai, sharegpt))
    assert first == second == Conversation((Message("system", "S"), Message("user", "Q"), Message("assistant", "A")), "7")


@pytest.mark.parametrize(("raw", "needle"), [
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]}, "unknown role 'bot'"),
    ({"conversations": [{"from": "user", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}, "unknown role 'user'; known: human, gpt, system"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]}, "turn 1 (assistant): empty content"),
    ({"messages": []}, "non-empty list"),
    ({"text": ""}, "needs a non-empty string 'text'"),
])
def test_bad_records_name_the_record_and_the_problem(raw, needle):
    fmt = "text" if "text" in raw else "messages"
    with pytest.raises(DataError, match="data.jsonl, record 3") as error:
        records.normalize_record(raw, fmt, source="data.jsonl", index=3)
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_a_tokenizer_without_a_chat_template_is_one_line(smol_tokenizer):
    template = smol_tokenizer.chat_template
    try:
        smol_tokenizer.chat_template = None
        with pytest.raises(DataError, match="has no chat template.*data.chat_template"):
            chat.tokenize_conversation(smol_tokenizer, Conversation(CONVERSATIONS["ends on a user turn"], None))
    finally:
        smol_tokenizer.chat_template = template


def test_held_out_prompts_are_the_masked_tokens_through_the_generation_prompt(smol_tokenizer):
    """Generation continues exactly the tokens that training masked before the last assistant turn."""
    train, heldout = quickstart.generate_chat(seed=0)
    conversation = records.normalize_record(heldout[0], "messages")
    prompt = generate.prompt_text(conversation, smol_tokenizer)
    assert prompt.endswith("<|im_start|>assistant\n") and quickstart.CHAT_SYSTEM in prompt
    ids, trained = chat.tokenize_conversation(smol_tokenizer, conversation)
    first_trained = trained.index(True)
    assert smol_tokenizer(prompt, add_special_tokens=False)["input_ids"] == ids[:first_trained]
    assert conversation.instruction == heldout[0]["messages"][1]["content"] and conversation.answer == heldout[0]["answer"]


def test_the_chat_quickstart_asks_the_quickstart_questions(smol_tokenizer):
    plain, chatty = quickstart.generate(seed=42), quickstart.generate_chat(seed=42)
    for part, conversations in zip(plain, chatty, strict=True):
        assert [c["messages"][1]["content"] for c in conversations] == [r["instruction"] for r in part]
        assert [c["messages"][2]["content"] for c in conversations] == [r["output"] for r in part]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def chat_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": f"Repeat {word} {k} times."},
                          {"role": "assistant", "content": " ".join([word] * k)}]}
            for k in range(1, n // 2 + 1) for word in ("red", "blue")]


def test_packing_of_conversations_equals_the_padded_batch(tiny_model_dir, smol_tokenizer, tmp_path):
    assert_packing_is_exact(tiny_model_dir, smol_tokenizer, write_jsonl(tmp_path / "chat.jsonl", chat_rows(12)))


def test_text_is_cut_into_rows_of_max_length_and_trained_on_every_token(smol_tokenizer, tmp_path):
    documents = [{"text": " ".join(f"word{i}" for i in range(n))} for n in (5, 40, 90)]
    train, _ = records.load_records(DataConfig(path=write_jsonl(tmp_path / "text.jsonl", documents), val_size=0), seed=0)
    dataset = tokens.build_dataset(train, smol_tokenizer, 32, train_on_prompt=False)
    by_document = [smol_tokenizer(d.text)["input_ids"] + [smol_tokenizer.eos_token_id] for d in train]
    pieces = [t.input_ids for t in dataset.examples]
    assert [token for piece in pieces for token in piece] == [token for ids in by_document for token in ids]  # nothing lost
    assert max(map(len, pieces)) == 32 and all(t.labels == t.input_ids for t in dataset.examples)
    assert dataset.n_truncated == 0 and len(pieces) == sum(-(-len(ids) // 32) for ids in by_document)


def test_dry_run_shows_the_first_conversation_and_its_assistant_tokens(tiny_model_dir, smol_tokenizer):
    result = CliRunner().invoke(app, ["train", str(REPO / "recipes/quickstart_chat.yaml"), f"model.name_or_path={tiny_model_dir}", "--dry-run"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    first = records.normalize_record(quickstart.generate_chat(seed=42)[0][0], "messages")
    ids, trained = chat.tokenize_conversation(smol_tokenizer, first)
    assert f"{sum(trained[1:])} of {len(ids)} tokens carry loss" in result.output  # the answer and its <|im_end|>
    assert chat.render(smol_tokenizer, first.messages).strip() in result.output


def test_conversations_train_alike_on_two_processes_and_resume_to_the_straight_run(tiny_model_dir, tmp_path):
    """The distributed and resume paths of test_distributed.py, on conversations: 2 processes score the held-out
    conversations (through the chat template) as one does and train the same adapter; a resume equals the straight run."""
    rows = [{**row, "answer": row["messages"][2]["content"].split()[0]} for row in chat_rows(24)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)

    def recipe(out) -> dict:
        raw = tiny_recipe(tiny_model_dir, data, out, "fp64", micro_batch_size=2, global_batch_size=4, max_steps=6, save_every=3, eval_every=None)
        raw["data"]["val_size"] = 6
        raw["eval"] = {"heldout": 6, "batch_size": 2, "max_new_tokens": 4}
        return raw
    one, two, stopped = tmp_path / "one", tmp_path / "two", tmp_path / "stopped"
    train(validate(recipe(one)), Console(quiet=True))  # float64: equal to the 2 processes whatever the summation order
    torchrun(write_recipe(tmp_path / "two.yaml", recipe(two)))
    heldout = [json.loads(line) for line in (one / "heldout_after.jsonl").read_text().splitlines()]
    assert len(heldout) == 6 and heldout[0]["instruction"].startswith("Repeat ")
    for name in ("heldout_before.jsonl", "heldout_after.jsonl"):
        assert (two / name).read_text() == (one / name).read_text()
    assert max_rel_diff(factors(two / "adapter"), factors(one / "adapter")) < EXACT_FP64  # helpers.EXACT_FP64's bound
    # The 1-process run stopped after its step-3 checkpoint, resumed.
    stopped_copy(one, stopped)
    summary = train(validate(recipe(stopped)), Console(quiet=True), resume_at="latest")
    assert "heldout_before" not in summary  # resumed, not trained again from the start
    assert summary["steps"] == 6 and max_rel_diff(factors(stopped / "adapter"), factors(one / "adapter")) <= EXACT_FP64


def test_data_chat_template_gives_a_tokenizer_without_one_the_named_template(tiny_model_dir, smollm2_path, tmp_path):
    """A model whose tokenizer has no chat template (refused alone, tests/test_bad_input.py) trains on conversations
    with data.chat_template naming SmolLM2's real chat_template.jinja."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").unlink()
    template = f"{smollm2_path}/chat_template.jinja"
    result = CliRunner().invoke(app, ["train", str(REPO / "recipes/quickstart_chat.yaml"), f"model.name_or_path={model}",
                                      f"data.chat_template={template}", "--dry-run"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "<|im_start|>assistant" in result.output and "tokens carry loss" in result.output
