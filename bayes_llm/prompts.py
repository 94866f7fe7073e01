"""The text formats the model sees. Pretraining, evaluation and dispatch all go through these, so
the base learns exactly the format it is later asked in.

A base pretrained here reads plain text after its BOS token. A checkpoint with a chat template (an
instruct model) is asked through that template instead: the same plain question is the user turn,
and its reply starts right after the template's assistant header, so it follows without a space.
"""

from __future__ import annotations

from collections.abc import Sequence

# A worked solution (GSM8K's shape) ends '#### <answer>': data, pretraining and rewards all read it there.
FINAL_MARK = "####"


def answer_prompt(prompt: str) -> str:
    return f"Question: {prompt}\nAnswer:"


def answer_document(prompt: str, answer: str) -> str:
    return f"{answer_prompt(prompt)} {answer}"


def classify_prompt(prompt: str) -> str:
    """The first-pass question: which domain is this prompt from?"""
    return f"Task: {prompt}\nDomain:"


def classify_document(prompt: str, domain: str) -> str:
    return f"{classify_prompt(prompt)} {domain}"


def classify_question(tokenizer, prompt: str, labels: Sequence[str]) -> str:
    """The first-pass question as `tokenizer`'s model is asked it: a chat model, never trained on the
    classification format, is also told the labels to choose from (Transformer²'s self-classification)."""
    if not is_chat(tokenizer):
        return classify_prompt(prompt)
    ask = f"Which of these is the task below: {', '.join(labels)}? Reply with that word only."
    return f"{ask}\n\n{classify_prompt(prompt)}"


def is_chat(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def model_context(tokenizer, text: str) -> str:
    """What the model sees before its reply to `text` (e.g. `answer_prompt(...)`), special tokens included."""
    if is_chat(tokenizer):
        turn = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    return (tokenizer.bos_token or "") + text


def reply_separator(tokenizer) -> str:
    """Between a plain prompt and its reply a space (the documents' shape); after a chat header nothing."""
    return "" if is_chat(tokenizer) else " "
