"""One tool-calling run of tests/test_rollout_hooks.py: started by torchrun (2 ranks) or plainly (one process).

    python tests/rollout_hooks_worker.py MODEL_DIR OUT_DIR PER_DEVICE_BATCH [field=value ...]

Two optimizer steps of 2 prompts x 4 completions with tools=[multiply], then an evaluation of one prompt with one
completion (rank 0 holds no row of it). Every turn is sampled by the real generator (with several processes its
sampling is collective); a planned row's sampled turn is then replaced by a scripted tool call: the rows of prompt
'0+b=' call the tool once when b is 1 or 2, so the group on rank 0 stops after its first turn in step 1 while rank
1's goes on, and the other way round in step 2. Rank 0 writes OUT_DIR/metrics.jsonl and completions.jsonl; every rank writes OUT_DIR/standins-rank{R}.json, how
often it sampled a stand-in row (it had no row left).
"""
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)  # 2 cores shared by every rank and other jobs

from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from fastrl import GRPOConfig, GRPOTrainer  # noqa: E402
from fastrl.generation.base import Rollout  # noqa: E402
from helpers_tiny import multiply  # noqa: E402


class PlannedCalls:
    """The real generator, with planned rows' turns replaced by a scripted tool call (see the module doc)."""

    def __init__(self, real, tokenizer, out: str):
        self.real, self.tok, self.standins = real, tokenizer, 0
        self.path = os.path.join(out, f"standins-rank{os.environ.get('RANK', '0')}.json")

    def generate(self, prompt_ids, num_generations, sampling):
        sampled = self.real.generate(prompt_ids, num_generations, sampling)
        if prompt_ids == [[self.tok.pad_token_id]]:  # the trainer's stand-in row
            self.standins += 1
            with open(self.path, "w") as f:
                json.dump(self.standins, f)
            return sampled
        ids, logprobs = list(sampled.completion_ids), list(sampled.logprobs)
        for i, prompt in enumerate(p for p in prompt_ids for _ in range(num_generations)):
            text = self.tok.decode(prompt)
            b, turn = int(re.search(r"\d\+(\d)=", text).group(1)), text.count("<tool_response>")
            if turn < (b in (1, 2)):
                call = json.dumps({"name": "multiply", "arguments": {"a": b, "b": turn + 2}})
                ids[i] = self.tok(f"<tool_call>\n{call}\n</tool_call><|im_end|>", add_special_tokens=False)["input_ids"]
                logprobs[i] = [None] * len(ids[i])  # not sampled: no sampler logprob
        return Rollout(ids, logprobs, [self.tok.eos_token_id not in c for c in ids])

    def push_weights(self, model):
        self.real.push_weights(model)

    def sleep(self):
        self.real.sleep()


def digit_share(completions, **kwargs):
    """Partial credit, so the sampled groups' rewards differ: the share of digits in the completion's messages."""
    texts = [" ".join(str(m.get("tool_calls") or m["content"]) for m in c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]


def main(model_dir: str, out: str, per_device: int, *overrides: str) -> None:
    extra = dict(o.split("=", 1) for o in overrides)
    args = GRPOConfig(output_dir=out, per_device_train_batch_size=per_device, num_generations=4, max_steps=2,
                      max_completion_length=160, logging_steps=1, eval_strategy="steps", eval_steps=2,
                      per_device_eval_batch_size=per_device // 4, num_generations_eval=1, learning_rate=1e-3, bf16=False, save_strategy="no",
                      disable_tqdm=True, report_to="none", log_completions=True, num_completions_to_print=0,
                      use_cpu=True, temperature=1.3, shuffle_dataset=False, **extra)
    rows = [{"prompt": [{"role": "user", "content": f"0+{b}="}]} for b in range(8)]
    trainer = GRPOTrainer(model_dir, digit_share, args, train_dataset=Dataset.from_list(rows), tools=[multiply],
                          eval_dataset=Dataset.from_list(rows[1:2]))
    os.makedirs(out, exist_ok=True)
    trainer.generator = PlannedCalls(trainer.generator, AutoTokenizer.from_pretrained(model_dir), out)
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
