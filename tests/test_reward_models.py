"""Reward models in reward_funcs, as TRL 1.16 uses them. The control is TRL's own `_calculate_rewards` on the same
prompts and completions, with the same tiny sequence classifier (built locally, random weights, no download)."""
import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForSequenceClassification

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def build_reward_model(tokenizer, seed: int) -> LlamaForSequenceClassification:
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=16, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config)


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm") / "tiny-rm"
    tok = tiny.build_tokenizer()
    build_reward_model(tok, seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def small_args(config_cls, out, **fields):
    return config_cls(output_dir=str(out), per_device_train_batch_size=4, num_generations=2, max_completion_length=3,
                      max_steps=1, logging_steps=1, learning_rate=1e-3, bf16=False, use_cpu=True, report_to="none",
                      save_strategy="no", disable_tqdm=True, **fields)


@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
def test_scores_match_trls_calculate_rewards(model_dir, reward_dir, tmp_path, chat):
    trl = pytest.importorskip("trl")
    rows = tiny.addition_rows(2)
    if chat:
        rows = [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows]
    ds = Dataset.from_list(rows)
    g = torch.Generator().manual_seed(7)
    texts = ["".join(tiny.CHARS[i] for i in torch.randint(0, 36, (n,), generator=g)) for n in (1, 5, 2, 9)]
    prompts = [r["prompt"] for r in rows for _ in range(2)]
    completions = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
    loaded = LlamaForSequenceClassification.from_pretrained(reward_dir)  # a loaded model beside a path
    funcs = [reward_dir, loaded, tiny.short_reward]
    rpcs = [None, tiny.build_tokenizer(), None]
    theirs = trl.GRPOTrainer(model_dir, list(funcs), small_args(trl.GRPOConfig, tmp_path / "trl"), train_dataset=ds,
                             reward_processing_classes=list(rpcs))
    inputs = [{**r} for r in rows for _ in range(2)]
    expected = theirs._calculate_rewards(inputs, prompts, completions, [[0]] * 4)  # [4, 3]

    ours = GRPOTrainer(model_dir, list(funcs), small_args(GRPOConfig, tmp_path / "ours"), train_dataset=ds,
                       reward_processing_classes=list(rpcs))
    assert ours.reward_func_names == theirs.reward_func_names == ["tiny-rm", "tiny-rm", "short_reward"]
    got = torch.tensor([f(prompts=prompts, completions=completions, completion_ids=[[0]] * 4, answer=[None] * 4)
                        for f in ours.reward_funcs]).T
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    assert got[:, 0].std() > 0  # the classifier really scores the texts differently


def test_training_with_a_reward_model_leaves_it_frozen(model_dir, reward_dir, tmp_path):
    trainer = GRPOTrainer(model_dir, [reward_dir, tiny.short_reward], small_args(GRPOConfig, tmp_path),
                          train_dataset=Dataset.from_list(tiny.addition_rows(4)))
    rm = trainer.reward_funcs[0].model
    before = {k: v.clone() for k, v in rm.state_dict().items()}
    trainer.train()
    entry = trainer.state.log_history[0]
    assert {"rewards/tiny-rm/mean", "rewards/tiny-rm/std", "rewards/short_reward/mean"} <= set(entry)
    assert not rm.training and not any(p.requires_grad for p in rm.parameters())
    assert all(torch.equal(before[k], v) for k, v in rm.state_dict().items())


def test_reward_processing_classes_length_is_checked_as_trl_does(model_dir, reward_dir, tmp_path):
    with pytest.raises(ValueError, match=r"number of reward processing classes \(2\) must match the number of "
                                         r"reward functions \(1\)"):
        GRPOTrainer(model_dir, reward_dir, small_args(GRPOConfig, tmp_path), train_dataset=Dataset.from_list(
            tiny.addition_rows(4)), reward_processing_classes=[None, None])
    with pytest.raises(ValueError, match="unknown reward 'no_such_reward'"):
        GRPOTrainer(model_dir, "no_such_reward", small_args(GRPOConfig, tmp_path),
                    train_dataset=Dataset.from_list(tiny.addition_rows(4)))
