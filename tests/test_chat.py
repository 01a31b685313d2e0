"""ChatSession: the cache kept across turns (only new tokens are prefilled), answers equal to
generate_text on the whole conversation, streaming, stopping, reset, and a clear error when full."""

import jax.numpy as jnp
import pytest

import llama_jax

MAX_NEW = 24


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    model = llama_jax.from_pretrained(smollm2_dir, dtype=jnp.float32, progress=False)
    return model, llama_jax.load_tokenizer(smollm2_dir)


def template_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_turns_prefill_only_new_tokens_and_answer_like_generate_text(smollm2):
    model, tokenizer = smollm2
    session = llama_jax.ChatSession(model, tokenizer, system="You are a helpful assistant.")
    pieces = []
    first = session.ask("What is the capital of France?", max_new_tokens=MAX_NEW, stream=pieces.append)
    conversation = session.messages[:-1]
    assert session.prefilled == len(template_ids(tokenizer, conversation))  # nothing cached yet
    assert "Paris" in first and "".join(pieces) == first
    assert first == llama_jax.generate_text(model, tokenizer, conversation, chat=True, max_new_tokens=MAX_NEW)

    cached = list(session.ids)
    second = session.ask("And the capital of Germany?", max_new_tokens=MAX_NEW)
    conversation = session.messages[:-1]
    whole = template_ids(tokenizer, conversation)
    assert whole[: len(cached)] == cached  # the cache holds the start of the conversation ...
    assert session.prefilled == len(whole) - len(cached)  # ... so only the rest is prefilled
    assert session.prefilled < len(whole) // 2
    print(f"turn 2 prefilled {session.prefilled} of {len(whole)} tokens")
    assert "Berlin" in second
    assert second == llama_jax.generate_text(
        model, tokenizer, conversation, chat=True, max_new_tokens=MAX_NEW
    )
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_stopped_answer_is_kept_and_the_next_turn_still_matches(smollm2):
    model, tokenizer = smollm2
    session = llama_jax.ChatSession(model, tokenizer)
    cut = session.ask("Tell me about Paris.", max_new_tokens=MAX_NEW, stop=lambda: True)
    assert len(tokenizer(cut, add_special_tokens=False)["input_ids"]) == 1  # the prefill's token only
    assert session.messages[-1] == {"role": "assistant", "content": cut}
    answer = session.ask("What is the capital of Italy?", max_new_tokens=MAX_NEW)
    conversation = session.messages[:-1]
    assert answer == llama_jax.generate_text(
        model, tokenizer, conversation, chat=True, max_new_tokens=MAX_NEW
    )


def test_reset_starts_over(smollm2):
    model, tokenizer = smollm2
    session = llama_jax.ChatSession(model, tokenizer)
    session.ask("Hi!", max_new_tokens=4)
    session.reset()
    assert session.messages == [] and session.ids == []
    session.ask("Hi!", max_new_tokens=4)
    assert session.prefilled == len(template_ids(tokenizer, session.messages[:-1]))


def test_a_full_cache_is_a_clear_error_and_the_session_survives(smollm2):
    model, tokenizer = smollm2
    session = llama_jax.ChatSession(model, tokenizer, max_length=64)
    with pytest.raises(ValueError, match=r"needs \d+ cache slots but this session holds 64.*reset\(\)"):
        session.ask("Describe the history of France in detail.", max_new_tokens=48)
    assert session.messages == []
    assert session.ask("Hi", max_new_tokens=4)


def test_a_tokenizer_without_chat_template_is_refused(smollm2):
    model, _ = smollm2

    class Plain:
        chat_template = None

    with pytest.raises(ValueError, match="no chat template"):
        llama_jax.ChatSession(model, Plain())
