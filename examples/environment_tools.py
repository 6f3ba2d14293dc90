"""A multi-turn environment with a tool, trained by fastrl's GRPOTrainer through TRL's `environment_factory`.

    python examples/environment_tools.py                                  # the built-in tiny model, CPU, 2 steps
    python examples/environment_tools.py --model Qwen/Qwen3-0.6B --max_steps 200 --use_vllm   # on a GPU

Each rollout gets its own `NumberGame`: reset() hides a number and tells the model the range; the model may call
`guess(n)`, which the environment answers with "higher", "lower" or "correct" (appended as a tool message, not
trained); get_reward() is 1 when the number was found, minus 0.1 per guess. No reward function is needed.
The script needs `trl` installed (tool calls are parsed with its response templates). With the random-init tiny
model the whole pipeline runs (prompts with the tool's schema, sampling, environment rewards, the GRPO step) but
the model does not call the tool: its turns are random characters. A tool-tuned model plays the game.
"""
from __future__ import annotations

import argparse
import random

from datasets import Dataset

from fastrl import GRPOConfig, GRPOTrainer


class NumberGame:
    """Guess a hidden number in [0, 100) with higher/lower hints."""

    def reset(self, seed: int, **row) -> str:
        self.secret, self.guesses, self.found = random.Random(seed).randrange(100), 0, False
        return " I am thinking of a number from 0 to 99: find it with the guess tool."

    def guess(self, n: int) -> str:
        """Guess the hidden number.

        Args:
            n: The number to try.
        """
        self.guesses += 1
        self.found = self.found or n == self.secret
        return "correct" if n == self.secret else ("higher" if n < self.secret else "lower")

    def get_reward(self) -> float:
        return float(self.found) - 0.1 * self.guesses


def tiny_tool_model(output_dir: str) -> str:
    """The built-in tiny model under Qwen3's chat template (tool roles), with room for the tool's schema."""
    from trl.chat_template_utils import qwen3_chat_template

    from fastrl.tasks.tiny_model import build_tiny_model

    return build_tiny_model(output_dir, max_position_embeddings=1400, chat_template=qwen3_chat_template)


def main(argv=None) -> GRPOTrainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--output_dir", default="runs/environment_tools")
    parser.add_argument("--max_steps", type=int, default=2)
    parser.add_argument("--use_vllm", action="store_true")
    a = parser.parse_args(argv)
    model = tiny_tool_model(f"{a.output_dir}/tiny-model") if a.model == "tiny" else a.model
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "Let's play."}], "seed": i}
                                 for i in range(64)])
    args = GRPOConfig(output_dir=a.output_dir, max_steps=a.max_steps, num_generations=4,
                      per_device_train_batch_size=8, max_completion_length=64 if a.model == "tiny" else 512,
                      max_tool_calling_iterations=8, learning_rate=1e-4 if a.model == "tiny" else 1e-6,
                      logging_steps=1, save_strategy="no", report_to="none", use_vllm=a.use_vllm,
                      bf16=a.model != "tiny", overwrite_output_dir=True)
    trainer = GRPOTrainer(model, reward_funcs=None, args=args, train_dataset=dataset, environment_factory=NumberGame)
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
