"""Conversations and plain text: their records, their rendering by the chat template, their loss masks.

A conversation is rendered by the tokenizer's own chat template (or `data.chat_template`), never by a
template of ours, so a model is tuned on exactly the text it is prompted with. The loss mask comes from the
template itself: for each assistant turn k, the rendering of messages[:k] with the generation prompt ends
where the turn's tokens begin, and the rendering of messages[:k+1] ends where they end. What the template
writes after the turn's last special token (ChatML's "\\n" after "<|im_end|>") carries no loss: generation
stops at the end-of-turn token, so the model never produces that text; the next turn's prompt supplies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from milora_cli import atomic
from milora_cli.errors import DataError

ROLES = ("system", "user", "assistant")
# ShareGPT's speakers as roles: LLaMA-Factory's defaults for its sharegpt format (hiyouga/LLaMA-Factory,
# data/README.md: role_tag "from", content_tag "value", user_tag "human", assistant_tag "gpt", system_tag "system").
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class Message(NamedTuple):
    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """A conversation with at least one assistant turn; `answer` is the gold short answer where the record has one."""

    messages: tuple[Message, ...]
    answer: str | None

    @property
    def prompt_messages(self) -> tuple[Message, ...]:
        """The conversation before its last assistant turn: what held-out generation is prompted with."""
        last = max(i for i, message in enumerate(self.messages) if message.role == "assistant")
        return self.messages[:last]

    @property
    def instruction(self) -> str:
        """The last user turn before the last assistant turn (what a held-out record shows and a scorer reads)."""
        return next((m.content for m in reversed(self.prompt_messages) if m.role == "user"), "")


@dataclass(frozen=True)
class Text:
    """A document for continued pretraining: the loss is on every token."""

    text: str
    answer: None = None


def from_messages(raw: dict, where: str) -> Conversation:
    """OpenAI's `messages` [{role, content}] or ShareGPT's `conversations` [{from, value}] -> Conversation."""
    if "messages" in raw:
        key, role_key, content_key, roles = "messages", "role", "content", {role: role for role in ROLES}
    elif "conversations" in raw:
        key, role_key, content_key, roles = "conversations", "from", "value", SHAREGPT_ROLES
    else:
        raise DataError(f"{where}: a conversation needs 'messages' (role, content) or 'conversations' (from, value); keys seen: {sorted(raw)}")
    turns = raw[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: '{key}' must be a non-empty list of turns")
    messages = tuple(_message(turn, i, role_key, content_key, roles, where) for i, turn in enumerate(turns))
    if not any(message.role == "assistant" for message in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn; roles seen: {[m.role for m in messages]}")
    answer = raw.get("answer")  # optional, as in the instruction layouts
    return Conversation(messages, None if answer is None else str(answer))


def _message(turn: Any, i: int, role_key: str, content_key: str, roles: dict[str, str], where: str) -> Message:
    if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
        raise DataError(f"{where}, turn {i}: expected an object with '{role_key}' and '{content_key}', got {turn!r:.80}")
    role, content = turn[role_key], turn[content_key]
    if role not in roles:
        raise DataError(f"{where}, turn {i}: unknown role {role!r}; known: {', '.join(roles)}")
    if not isinstance(content, str) or not content.strip():
        raise DataError(f"{where}, turn {i} ({role}): empty content; every turn needs text")
    return Message(roles[role], content)


def from_text(raw: dict, where: str) -> Text:
    """A `text` record -> Text."""
    text = raw.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: a text record needs a non-empty string 'text'; got {text!r:.80}")
    return Text(text)


def read_template(path: str | None) -> str | None:
    """The Jinja chat template that data.chat_template names (it replaces the tokenizer's own), or None."""
    if path is None:
        return None
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data.chat_template: {path} is not a file; it names a Jinja chat template (e.g. a model's chat_template.jinja)")
    return atomic.read_text(file, DataError)


def render(tokenizer: Any, messages: tuple[Message, ...], generation_prompt: bool = False) -> str:
    """The text the chat template makes of `messages` (with the assistant's header when `generation_prompt`)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'the model')} has no chat template, which conversations need; "
            "name a Jinja file in data.chat_template"
        )
    try:
        return tokenizer.apply_chat_template([m._asdict() for m in messages], tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as error:  # jinja2's TemplateError or a template's own raise_exception(...)
        raise DataError(f"the chat template cannot render the conversation: {str(error).strip() or type(error).__name__}") from None


def user_prompt(tokenizer: Any):
    """(instruction, input) -> one user turn (the input after a blank line) through the chat template with the
    generation prompt: a benchmark question as a chat model is asked it (`milora eval --prompt chat`)."""

    def prompt(instruction: str, input: str) -> str:  # noqa: A002 - the field's name in every dataset
        question = f"{instruction}\n\n{input}" if input else instruction
        return render(tokenizer, (Message("user", question),), generation_prompt=True)

    return prompt


def segments(tokenizer: Any, conversation: Conversation) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant_turn) pieces at the template's own turn boundaries.

    1. Render the whole conversation once.
    2. For each assistant turn k: it starts where messages[:k] rendered with the generation prompt ends, and
       ends where messages[:k+1] ends; both renderings must be prefixes of the whole (a template that rewrites
       earlier turns when later ones follow has no fixed boundary, and is refused).
    """
    messages = conversation.messages
    whole = render(tokenizer, messages)
    pieces, done = [], 0
    for k, message in enumerate(messages):
        if message.role != "assistant":
            continue
        start = len(_prefix(whole, render(tokenizer, messages[:k], generation_prompt=True), k))
        end = len(_prefix(whole, render(tokenizer, messages[: k + 1]), k))
        if not done <= start < end:
            raise DataError(f"the chat template renders assistant turn {k} out of order; its turns have no fixed boundaries")
        pieces += [(whole[done:start], False), (whole[start:end], True)]
        done = end
    pieces.append((whole[done:], False))
    return [(text, trained) for text, trained in pieces if text]


def _prefix(whole: str, part: str, k: int) -> str:
    if not whole.startswith(part):
        raise DataError(
            f"the chat template renders the conversation up to turn {k} differently from the start of the whole conversation "
            "(it rewrites earlier turns when later ones follow), so the assistant's tokens cannot be told apart"
        )
    return part


def tokenize_conversation(tokenizer: Any, conversation: Conversation) -> tuple[list[int], list[bool]]:
    """(input_ids, whether each token is the assistant's and carries loss) of a conversation.

    Each piece is tokenised on its own (the template writes any BOS itself, so no special tokens are added) and
    the pieces concatenated, so a boundary never falls inside a token. An assistant piece is trained up to and
    including its last special token (the end-of-turn token); the template's text after it is not.
    """
    special = set(tokenizer.all_special_ids)
    ids: list[int] = []
    trained: list[bool] = []
    for text, is_assistant in segments(tokenizer, conversation):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ends = [i for i, token in enumerate(piece) if token in special]
        n_trained = (ends[-1] + 1 if ends else len(piece)) if is_assistant else 0
        ids += piece
        trained += [True] * n_trained + [False] * (len(piece) - n_trained)
    return ids, trained


def text_chunks(tokenizer: Any, text: Text, max_length: int) -> list[list[int]]:
    """A document's tokens (the tokenizer's BOS where it adds one, EOS at the end) cut into pieces of max_length.

    Long documents are split, not truncated: continued pretraining learns from all of the text. A last piece
    of one token predicts nothing and is left out.
    """
    ids = tokenizer(text.text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    return [ids[start : start + max_length] for start in range(0, len(ids), max_length) if len(ids) - start > 1]
