"""llama_jax.load_tokenizer's lean Tokenizer against transformers' AutoTokenizer on the bundled model."""

import numpy as np

import llama_jax

TEXTS = [
    "The capital of France is",
    "  leading spaces, trailing spaces  ",
    "Ünïcödé — ça va? 日本語のテキスト 🙂",
    "def fibonacci(n):\n\treturn n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "<|im_start|>user\nHi<|im_end|>\n",
    "don't , isn't . they're ! ",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Name a prime number."},
    ],
]


def test_lean_tokenizer_equals_autotokenizer(smollm2_dir):
    """load_tokenizer skips transformers' import: same ids, decoding, special tokens and chat template."""
    import transformers

    ours = llama_jax.load_tokenizer(smollm2_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    assert isinstance(ours, llama_jax.Tokenizer)
    for name in ("bos_token", "eos_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.chat_template == theirs.chat_template and len(ours) == len(theirs)
    for text in TEXTS:
        for special in (True, False):
            assert ours(text, add_special_tokens=special) == dict(theirs(text, add_special_tokens=special))
        ids = theirs(text)["input_ids"]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    np.testing.assert_array_equal(
        ours(TEXTS[0], return_tensors="np")["input_ids"], theirs(TEXTS[0], return_tensors="np")["input_ids"]
    )
    for conversation in CONVERSATIONS:
        for prompt in (True, False):
            kwargs = dict(add_generation_prompt=prompt)
            assert ours.apply_chat_template(conversation, tokenize=False, **kwargs) == (
                theirs.apply_chat_template(conversation, tokenize=False, **kwargs)
            )
            assert ours.apply_chat_template(conversation, **kwargs) == dict(
                theirs.apply_chat_template(conversation, **kwargs)
            )
    # anything else is transformers' own tokenizer for the same files
    assert ours.convert_ids_to_tokens([1, 2]) == theirs.convert_ids_to_tokens([1, 2])
