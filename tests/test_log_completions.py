"""log_completions=True: OUTPUT_DIR/completions.jsonl holds, per logging step, the generation batch the step
trained on (TRL's completions table: step, prompt, completion, one column per reward function, advantage), and a
rich table is printed with num_completions_to_print rows."""
import json
import math

import pytest
import torch
from datasets import Dataset

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer
from fastrl.logging_utils import print_completions

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_completions_jsonl_is_the_rollout_each_logging_step(model_dir, tmp_path, capsys):
    calls = []  # what the reward function saw and returned, one entry per generation batch

    def answer(prompts, completions, answer, **kwargs):
        rewards = tiny.first_char_reward(completions, answer)
        calls.append((list(prompts), list(completions), rewards))
        return rewards

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=6, max_steps=2, logging_steps=1, learning_rate=1e-3, bf16=False,
                      save_strategy="no", disable_tqdm=True, report_to="none", log_completions=True,
                      num_completions_to_print=3)
    trainer = GRPOTrainer(model_dir, [answer, tiny.short_reward], args,
                          train_dataset=Dataset.from_list(tiny.addition_rows(16)))
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "completions.jsonl")]
    assert len(calls) == 2 and len(rows) == 16
    for step, (prompts, completions, rewards) in enumerate(calls, start=1):
        got = [r for r in rows if r["step"] == step]
        assert set(got[0]) == {"step", "prompt", "completion", "answer", "short_reward", "advantage"}
        assert [r["prompt"] for r in got] == prompts and [r["completion"] for r in got] == completions
        assert [r["answer"] for r in got] == rewards
        short = tiny.short_reward(completions)
        assert [r["short_reward"] for r in got] == pytest.approx(short)
        # TRL's group advantages, by hand: (r − group mean) / (group std + 1e-4), r the sum of both rewards
        for g in range(2):
            total = [a + b for a, b in zip(rewards[4 * g:4 * g + 4], short[4 * g:4 * g + 4])]
            mean = sum(total) / 4
            std = math.sqrt(sum((x - mean) ** 2 for x in total) / 3)
            expected = [(x - mean) / (std + 1e-4) for x in total]
            assert [r["advantage"] for r in got[4 * g:4 * g + 4]] == pytest.approx(expected, abs=1e-5)
    # step 2's rows are the batch the trainer holds (shuffled into micro-batches)
    held = torch.cat([b.advantages for b in trainer._buffer]).sort().values
    logged = torch.tensor(sorted(r["advantage"] for r in rows if r["step"] == 2))
    torch.testing.assert_close(held.cpu(), logged, rtol=0, atol=1e-6)
    out = capsys.readouterr().out
    assert "Step 1" in out and "Step 2" in out and "Advantage" in out and "short_reward" in out


def test_printed_table_has_num_completions_to_print_rows(capsys):
    records = [{"prompt": f"prompt-{i}", "completion": [{"role": "assistant", "content": f"reply-{i}"}],
                "r": float(i), "advantage": None if i == 0 else 0.5} for i in range(10)]
    print_completions(records, step=7, num_to_print=3)
    out = capsys.readouterr().out
    assert "Step 7" in out and out.count("prompt-") == 3 and out.count("ASSISTANT") == 3
    print_completions(records, step=7, num_to_print=None)  # None: all, as TRL
    assert capsys.readouterr().out.count("prompt-") == 10
    print_completions(records, step=7, num_to_print=0)
    assert capsys.readouterr().out == ""
    print_completions([{**r, "prompt": "same"} for r in records], step=7, unique_prompts=True)
    assert capsys.readouterr().out.count("ASSISTANT") == 1


def test_a_resumed_run_writes_the_same_completions(model_dir, tmp_path):
    """The rows travel with the checkpoint's rollout buffer, and rows after the checkpoint's step are dropped on
    resume (as metrics.jsonl's): 2 steps straight == 1 step + resume for the second (num_iterations=2, so step 2
    logs the batch generated before the checkpoint)."""
    def run(out, **kw):
        args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=8, num_generations=4,
                          max_completion_length=4, max_steps=2, logging_steps=1, learning_rate=1e-3, bf16=False,
                          save_strategy="steps", save_steps=1, disable_tqdm=True, report_to="none",
                          log_completions=True, num_completions_to_print=0, num_iterations=2)
        trainer = GRPOTrainer(model_dir, tiny.first_char_reward, args,
                              train_dataset=Dataset.from_list(tiny.addition_rows(16)))
        trainer.train(**kw)
        return [json.loads(line) for line in open(out / "completions.jsonl")]

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "a", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    assert [r["step"] for r in straight] == [1] * 8 + [2] * 8
    assert resumed == straight


def test_printed_table_is_laid_out_as_trls(capsys):
    """Conversational and tool rollouts (reasoning, tool calls with dict or JSON-string arguments, typed content
    blocks), rewards, advantages and log_extra columns: the same rendered table as TRL's
    print_prompt_completions_sample on the same rows."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    pytest.importorskip("rich")
    call = lambda name, args: {"type": "function", "function": {"name": name, "arguments": args}}  # noqa: E731
    prompts = [[{"role": "user", "content": "1+2= Use add."}], "plain text prompt",
               [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]]
    completions = [
        [{"role": "assistant", "content": "", "tool_calls": [call("add", {"a": 1, "b": 2}), call("mul", '{"x": 3}')]},
         {"role": "tool", "name": "add", "content": "3"}, {"role": "tool", "name": "mul", "content": "{'error': 'no'}"},
         {"role": "assistant", "content": "it is 3", "thinking": "easy"}],
        " a text completion",
        [{"role": "assistant", "content": "hello", "reasoning_content": "greet back"}]]
    rewards = {"first": [0.5, -1.25, float("nan")], "Adder": [1.0, 0.0, 2.0]}
    advantages, extra = [0.7071, -0.123, 1.5], {"source": ["env", 3, [{"role": "user", "content": "x"}]]}
    trl_utils.print_prompt_completions_sample(prompts, completions, rewards, advantages, step=3, extra=extra)
    expected = capsys.readouterr().out
    records = [{"prompt": p, "completion": c, "first": rewards["first"][i], "Adder": rewards["Adder"][i],
                "advantage": advantages[i], "source": extra["source"][i]}
               for i, (p, c) in enumerate(zip(prompts, completions))]
    print_completions(records, step=3)
    assert capsys.readouterr().out == expected and "add(a=1, b=2)" in expected
