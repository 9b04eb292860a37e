"""The one place a chat template turns messages into prompt token ids (worker, calibration, collection, bench)."""

from __future__ import annotations


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` under the model's chat template, ending with the assistant's turn opened."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def chat_prompt_ids(tokenizer, system_prompt: str, question: str) -> list[int]:
    """The paper's prompt: a system message (the answer format) and the question as the user's turn."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return chat_ids(tokenizer, messages + [{"role": "user", "content": question}])
