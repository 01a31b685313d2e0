"""``llama-jax finetune`` (``llama_jax.train.finetune``): a run from JSONL data to a peft adapter and an orbax
training state, exact resumption (after a clean stop and after SIGKILL), ``--adapter`` and ``merge``, and
one-line errors that overwrite nothing. On a tiny random model with the bundled SmolLM2's tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import llama_jax
from llama_jax import cli
from llama_jax.train import RUN_FILE, STATE_DIR, saved_steps

NAMES = ["Maria", "John", "Aisha", "Kenji", "Olga", "Pedro", "Fatima", "Liam", "Chen", "Sofia"]
CITIES = ["Lisbon", "Paris", "Nairobi", "Osaka", "Warsaw", "Lima"]


def write_data(directory, rows: int = 24, valid: int = 6) -> str:
    """train.jsonl and valid.jsonl in all three of mlx-lm's formats."""
    rng = np.random.default_rng(0)
    os.makedirs(directory, exist_ok=True)

    def row(i):
        name, city, age = rng.choice(NAMES), rng.choice(CITIES), int(rng.integers(18, 90))
        sentence = f"{name}, {age}, moved to {city}."
        answer = json.dumps({"name": str(name), "age": age, "city": str(city)})
        if i % 3 == 0:
            return {
                "messages": [{"role": "user", "content": sentence}, {"role": "assistant", "content": answer}]
            }
        if i % 3 == 1:
            return {"prompt": sentence, "completion": answer}
        return {"text": f"{sentence} {answer}"}

    for name, count in (("train", rows), ("valid", valid)):
        with open(os.path.join(directory, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(row(i)) + "\n" for i in range(count))
    return str(directory)


def adapters(directory) -> dict[str, np.ndarray]:
    return load_file(os.path.join(directory, "adapter_model.safetensors"))


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def finetune_args(checkpoint, data, output, *extra) -> list[str]:
    return [
        "finetune",
        "--model",
        checkpoint,
        "--data",
        data,
        "--output",
        str(output),
        "--batch",
        "4",
        "--rank",
        "4",
        "--lr",
        "1e-2",
        "--max-length",
        "64",
        *extra,
    ]


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return write_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_chat_checkpoint, data, tmp_path_factory) -> dict:
    """Whole runs, the adapters every resumed run must reproduce: 8 steps at a constant rate, and 200 on a
    cosine schedule (long enough for the kill test to stop it mid-run)."""
    runs = {}
    for schedule, steps, save_every in (("constant", "8", "4"), ("cosine", "200", "20")):
        output = tmp_path_factory.mktemp(f"whole-{schedule}") / "run"
        args = finetune_args(tiny_chat_checkpoint, data, output, "--steps", steps, "--save-every", save_every)
        assert cli.main([*args, "--schedule", schedule, "--warmup", "2"]) == 0
        runs[schedule] = str(output)
    return runs


def test_a_run_writes_a_peft_adapter_the_state_and_held_out_losses(tiny_chat_checkpoint, data, uninterrupted):
    output = uninterrupted["constant"]
    assert sorted(os.listdir(output)) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        RUN_FILE,
        STATE_DIR,
    ]
    assert saved_steps(output) == [4, 8]
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # readable by others, as peft's are
        assert os.stat(os.path.join(output, name)).st_mode & 0o777 == 0o644
    config = json.load(open(os.path.join(output, "adapter_config.json")))
    assert (config["r"], config["lora_alpha"]) == (4, 16.0)
    run = json.load(open(os.path.join(output, RUN_FILE)))
    assert run["model"] == tiny_chat_checkpoint and run["rank"] == 4
    # the adapter at the top is the state's: the same numbers orbax saved for step 8
    model = llama_jax.from_pretrained(tiny_chat_checkpoint, dtype=jnp.float32, progress=False)
    llama_jax.load_adapter(model, output)
    schedule = llama_jax.train.learning_rate_schedule(1e-2, 8, "constant", warmup=2)
    result_losses = llama_jax.train.restore_state(
        output, model, llama_jax.train.lora_optimizer(model, schedule)
    )
    assert result_losses["step"] == 8 and len(result_losses["losses"]) == 8
    held_out = {int(k): v for k, v in result_losses["held_out"].items()}
    print("held-out loss by step:", held_out, "training losses:", np.round(result_losses["losses"], 3))
    assert sorted(held_out) == [0, 4, 8] and held_out[8] < held_out[0]


def test_half_a_run_then_resume_gives_the_same_adapters(
    tiny_chat_checkpoint, data, uninterrupted, tmp_path, capsys
):
    """Constant learning rate: 4 steps, then --resume --steps 8, equals 8 steps in one go."""
    output = tmp_path / "run"
    args = finetune_args(tiny_chat_checkpoint, data, output, "--save-every", "4", "--warmup", "2")
    assert run_cli([*args, "--steps", "4"], capsys)[0] == 0
    code, out, err = run_cli([*args, "--steps", "8", "--resume"], capsys)
    assert code == 0, err
    assert "resuming" in err and "trained steps 5-8" in out
    difference = largest_difference(adapters(output), adapters(uninterrupted["constant"]))
    print(f"4 steps + resume to 8 vs 8 steps: adapters differ by at most {difference:.1e}")
    assert difference <= 1e-6


def test_a_run_killed_between_saves_resumes_to_the_same_adapters(
    tiny_chat_checkpoint, data, uninterrupted, tmp_path
):
    """Cosine schedule, 200 steps: SIGKILL as soon as the first save (step 20) is complete, then --resume:
    the adapters of the uninterrupted run. A half-written save (what a kill during a save leaves) is
    ignored."""
    output = tmp_path / "run"
    args = finetune_args(tiny_chat_checkpoint, data, output, "--steps", "200", "--save-every", "20")
    args += ["--schedule", "cosine", "--warmup", "2"]
    env = {**os.environ, "LLAMA_JAX_NO_COMPILATION_CACHE": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "llama_jax", *args], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while not saved_steps(output) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGKILL, child.stderr.read()[-2000:]
    killed_after = max(saved_steps(output))
    assert killed_after < 200, "the run finished before the kill"
    # what a kill in the middle of the next save leaves behind: orbax's temporary directory
    os.makedirs(output / STATE_DIR / f"{killed_after + 20}.orbax-checkpoint-tmp-1234" / "adapters")
    assert max(saved_steps(output)) == killed_after
    assert cli.main([*args, "--resume"]) == 0
    difference = largest_difference(adapters(output), adapters(uninterrupted["cosine"]))
    print(f"killed after the step-{killed_after} save, resumed: adapters differ by {difference:.1e}")
    assert difference <= 1e-6


def test_adapter_option_and_merge_give_the_trained_model(
    tiny_chat_checkpoint, uninterrupted, tmp_path, capsys
):
    output = uninterrupted["constant"]
    ids = np.arange(5, 40)[None]
    adapted = llama_jax.load_adapter(
        llama_jax.from_pretrained(tiny_chat_checkpoint, dtype=jnp.float32, progress=False), output
    )
    code, out, err = run_cli(
        ["generate", "Hi", "--model", tiny_chat_checkpoint, "--adapter", output, "--max-new-tokens", "6"],
        capsys,
    )
    assert code == 0, err
    tokenizer = llama_jax.load_tokenizer(tiny_chat_checkpoint)
    expected = llama_jax.generate_text(adapted, tokenizer, "Hi", max_new_tokens=6)
    base = llama_jax.from_pretrained(tiny_chat_checkpoint, dtype=jnp.float32, progress=False)
    assert expected != llama_jax.generate_text(base, tokenizer, "Hi", max_new_tokens=6)  # the adapter shows
    assert out.rstrip("\n") == expected
    merged_dir = tmp_path / "merged"
    code, _out, err = run_cli(
        ["merge", "--model", tiny_chat_checkpoint, "--adapter", output, "--output", str(merged_dir)], capsys
    )
    assert code == 0, err
    assert os.path.exists(merged_dir / "tokenizer.json")
    merged = llama_jax.from_pretrained(merged_dir, dtype=jnp.float32, progress=False)
    difference = float(np.abs(np.asarray(merged(ids)) - np.asarray(adapted(ids))).max())
    print(f"merged checkpoint vs base + adapter: logits differ by at most {difference:.1e}")
    assert difference <= 1e-4
    # transformers loads the merged checkpoint and agrees
    import torch
    import transformers

    reference = transformers.LlamaForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(torch.as_tensor(ids)).logits.numpy()
    assert float(np.abs(theirs - np.asarray(merged(ids))).max()) <= 1e-4


def test_errors_are_one_line_and_overwrite_nothing(
    tiny_chat_checkpoint, data, uninterrupted, tmp_path, capsys
):
    output = uninterrupted["constant"]
    before = {name: os.path.getmtime(os.path.join(output, name)) for name in os.listdir(output)}
    base = finetune_args(tiny_chat_checkpoint, data, output, "--steps", "8")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": \n')
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"question": "?"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    other_model = str(tmp_path / "other")
    shutil.copytree(tiny_chat_checkpoint, other_model)  # the same files under another name
    cases = {
        "already holds a run: pass --resume": base,
        "was trained with rank=4": [*base, "--resume", "--rank", "8"],
        "was trained with targets=": [*base, "--resume", "--targets", "q_proj,v_proj"],
        "was trained with model=": [*finetune_args(other_model, data, output), "--resume"],
        "bad.jsonl:2": finetune_args(tiny_chat_checkpoint, str(bad_json), tmp_path / "a"),
        "unknown.jsonl:1": finetune_args(tiny_chat_checkpoint, str(unknown), tmp_path / "b"),
        "empty.jsonl": finetune_args(tiny_chat_checkpoint, str(empty), tmp_path / "c"),
        "holds no run to resume": [*finetune_args(tiny_chat_checkpoint, data, tmp_path / "d"), "--resume"],
    }
    for expected, args in cases.items():
        code, _out, err = run_cli(args, capsys)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and expected in lines[0], (expected, err[-2000:])
        print(lines[0])
    after = {name: os.path.getmtime(os.path.join(output, name)) for name in os.listdir(output)}
    assert after == before
    for name in "abcd":
        assert not os.path.exists(tmp_path / name) or not os.listdir(tmp_path / name)
