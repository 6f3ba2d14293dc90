"""Training on a datasets.IterableDataset as TRL 1.16 does: max_steps required, the stream read in TRL's order
(a buffered shuffle seeded with `seed`, restarted when it ends), and the position resumed from a checkpoint."""
import pytest
from datasets import Dataset, IterableDataset

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def recorder(seen: list):
    def reward(prompts, completions, **kwargs):
        seen.append(list(prompts[::2]))  # one entry per prompt (G = 2)
        return [float(len(c)) for c in completions]

    return reward


def small_args(config_cls, out, **fields):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, num_generations=2, max_completion_length=2,
                max_steps=4, logging_steps=1, learning_rate=1e-3, bf16=False, use_cpu=True, report_to="none",
                save_strategy="no", disable_tqdm=True)
    return config_cls(**{**base, **fields})


def stream(n: int) -> IterableDataset:
    rows = tiny.addition_rows(n)
    return IterableDataset.from_generator(lambda: iter(rows))  # no declared features, no length


def test_the_stream_is_read_in_order_and_restarted(model_dir, tmp_path):
    seen = []
    GRPOTrainer(model_dir, recorder(seen), small_args(GRPOConfig, tmp_path, shuffle_dataset=False),
                train_dataset=stream(5)).train()
    prompts = [r["prompt"] for r in tiny.addition_rows(5)]
    # 2 prompts per step; the 5th row is an incomplete tail, dropped; then the stream starts again
    assert seen == [prompts[0:2], prompts[2:4], prompts[0:2], prompts[2:4]]


def test_shuffled_order_matches_trl(model_dir, tmp_path):
    trl = pytest.importorskip("trl")
    theirs, ours = [], []
    ds = Dataset.from_list(tiny.addition_rows(12)).to_iterable_dataset()
    trl.GRPOTrainer(model_dir, recorder(theirs), small_args(trl.GRPOConfig, tmp_path / "trl", max_steps=3),
                    train_dataset=ds).train()
    GRPOTrainer(model_dir, recorder(ours), small_args(GRPOConfig, tmp_path / "ours", max_steps=3),
                train_dataset=ds).train()
    assert ours == theirs and ours[0] != [r["prompt"] for r in tiny.addition_rows(2)]


def test_resume_continues_the_stream(model_dir, tmp_path):
    straight, first, resumed = [], [], []
    ds = Dataset.from_list(tiny.addition_rows(6)).to_iterable_dataset()
    GRPOTrainer(model_dir, recorder(straight), small_args(GRPOConfig, tmp_path / "a"), train_dataset=ds).train()
    GRPOTrainer(model_dir, recorder(first), small_args(GRPOConfig, tmp_path / "b", save_strategy="steps",
                                                      save_steps=1, max_steps=2), train_dataset=ds).train()
    GRPOTrainer(model_dir, recorder(resumed), small_args(GRPOConfig, tmp_path / "b"),
                train_dataset=ds).train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert first + resumed == straight and straight[3] != straight[0]  # step 4 is in the second, reshuffled epoch


def test_stream_settings_are_checked_as_trl_does(model_dir, tmp_path):
    with pytest.raises(ValueError, match="max_steps: must be set to a positive value"):
        GRPOTrainer(model_dir, tiny.short_reward, small_args(GRPOConfig, tmp_path, max_steps=-1),
                    train_dataset=stream(8))
    with pytest.raises(ValueError, match="Iterable datasets require `dispatch_batches=False`"):
        GRPOTrainer(model_dir, tiny.short_reward,
                    small_args(GRPOConfig, tmp_path, accelerator_config={"dispatch_batches": True}),
                    train_dataset=stream(8))
    trainer = GRPOTrainer(model_dir, tiny.short_reward, small_args(GRPOConfig, tmp_path), train_dataset=stream(1))
    with pytest.raises(ValueError, match="train_dataset: the stream has 1 rows, fewer than the 2 prompts"):
        trainer.train()
