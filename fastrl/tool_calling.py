"""Multi-turn tool calling as TRL 1.16 does it (trl/trainer/grpo_trainer.py `_tool_call_loop`,
`_get_tool_suffix_ids`): the same token layout and the same tool_mask, so the loss trains the same tokens.

A row's completion grows turn by turn, by concatenating token ids (never re-tokenizing what was sampled):
    completion = turn 1 | tool suffix 1 | turn 2 | tool suffix 2 | ...    tool_mask = 1…1 | 0…0 | 1…1 | 0…0 | ...
A turn is parsed with the tokenizer's response template (transformers' `parse_response`, through TRL's
`trl.chat_template_utils`, which also holds the response templates of the chat templates TRL knows); each tool
call runs (an exception, or an unknown tool, becomes {"error": ...} as the tool's result, counted as a failure);
the tool messages are rendered by the chat template and their tokens appended; the model continues.
A row stops when its turn calls no tool, after max_tool_calling_iterations turns, or when the tool result would
take it past max_completion_length or the model's context (the result is then dropped); the last turn is cut at
max_completion_length.
"""
from __future__ import annotations

import asyncio
import inspect
from typing import Callable

from fastrl import distributed
from fastrl.data import tokenize_prompts
from fastrl.generation.base import Rollout


def trl_chat_utils():
    """TRL's chat-template helpers (response parsing), needed by tools and environment_factory."""
    try:
        import trl.chat_template_utils as utils
    except ImportError:
        raise ValueError("tools / environment_factory: tool calling parses the model's turns with TRL's chat-template "
                         "helpers; install trl (pip install trl)") from None
    return utils


class ToolCalling:
    """The tokenizer side of tool calling: prompts with tool schemas, parsing a turn, rendering tool results."""

    def __init__(self, processing_class, chat_template_kwargs: dict | None, has_tools: bool):
        utils = trl_chat_utils()
        if not utils.supports_tool_calling(processing_class):  # TRL's check and message
            raise ValueError("processing_class: The provided chat template does not support tool calling. The "
                             "template must be able to render a full tool-calling conversation (user -> assistant "
                             "with tool_calls -> tool).")
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.processing_class, self.kwargs, self.chat_template = processing_class, chat_template_kwargs or {}, None
        if has_tools:  # TRL's set-up: a response template to parse turns, a prefix-preserving template to append
            if getattr(self.tokenizer, "response_template", None) is None and \
                    getattr(self.tokenizer, "response_schema", None) is None:
                utils.add_response_schema(processing_class)  # TRL's ValueError for a template it does not know
            if not utils.is_chat_template_prefix_preserving(processing_class):
                self.chat_template = utils.get_training_chat_template(processing_class)
        self._parse = utils.parse_response

    def prompt_ids(self, prompts: list, tools: list[list], max_prompt_length: int | None) -> list[list[int]]:
        """Chat prompts rendered with each row's tool schemas (rows with the same tools in one call)."""
        out: list = [None] * len(prompts)
        for group in _same_tools(tools):
            ids = tokenize_prompts(self.processing_class, [prompts[i] for i in group], max_prompt_length,
                                   self.kwargs, tools=tools[group[0]] or None, chat_template=self.chat_template)
            for i, row in zip(group, ids):
                out[i] = row
        return out

    def parse(self, ids: list[int], prefix: list[int], tools: list) -> dict:
        """One model turn -> an assistant message ({"role", "content"[, "tool_calls"]})."""
        return self._parse(self.tokenizer, ids, prefix=prefix, tools=tools)

    def suffix_ids(self, tool_messages: list[dict]) -> list[int]:
        """The tokens that follow an assistant turn ending in eos when these tool messages are appended, up to the
        next assistant header: rendered on a one-turn dummy conversation and cut after its last eos (TRL's
        `_get_tool_suffix_ids`)."""
        call = [{"type": "function", "function": {"name": tool_messages[0]["name"], "arguments": {}}}]
        dummy = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": call}]
        render = lambda messages, more: self.processing_class.apply_chat_template(  # noqa: E731
            messages, add_generation_prompt=more, tokenize=True, chat_template=self.chat_template, return_dict=False,
            **self.kwargs)
        prefix, full = list(render(dummy, False)), list(render(dummy + tool_messages, True))
        eos = [i for i, t in enumerate(prefix) if t == self.tokenizer.eos_token_id]
        prefix = prefix[:eos[-1] + 1] if eos else prefix
        if full[:len(prefix)] != prefix:
            raise ValueError("processing_class: the chat template renders a conversation's start differently once "
                             "tool messages follow (its eos-trimmed prefix is not a prefix of the whole)")
        return full[len(prefix):]


def _same_tools(tools: list[list]) -> list[list[int]]:
    """Row indices grouped by tool list (an environment's methods count as the same tool on every instance)."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tools):
        groups.setdefault(tuple(getattr(f, "__func__", f) for f in t), []).append(i)
    return list(groups.values())


def call_tools(tool_calls: list[dict], tools: dict[str, Callable]) -> tuple[list[dict], int]:
    """Run one turn's tool calls -> (tool messages, failures). A failure's result is {"error": message} (TRL)."""
    messages, failures = [], 0
    for call in tool_calls:
        if call.get("type") != "function":
            name, result = call.get("name", "unknown"), {"error": f"Unsupported tool call type: {call.get('type')}"}
            failures += 1
        else:
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            try:
                if name not in tools:
                    raise ValueError(f"Tool {name} not found.")
                result = tools[name](**arguments)
                if inspect.isawaitable(result):
                    result = asyncio.run(_awaited(result))
            except Exception as e:  # the model's call was wrong: its error is the tool's answer
                result, failures = {"error": str(e)}, failures + 1
        messages.append({"role": "tool", "name": name, "content": result if isinstance(result, list) else str(result)})
    return messages, failures


async def _awaited(awaitable):
    return await awaitable


def tool_loop(calling: ToolCalling, generate: Callable[[list[list[int]], list[int], int], Rollout],
              prompt_ids: list[list[int]], first: Rollout, tools: list[list], tool_dicts: list[dict],
              max_iterations: int, max_completion_length: int, max_model_len: int
              ) -> tuple[Rollout, list, tuple[int, int]]:
    """B first turns -> (the multi-turn Rollout with tool_mask, B completions as message lists, (tool calls,
    failed calls)).

    generate(ids, rows, turn) samples one continuation for each of `ids` (the rows `rows` of the batch). With
    several processes sampling is collective (the sampler's loop stops on every rank together; a sharded model's
    forwards gather its shards), so a rank goes on calling generate() while any rank has a row left: with none
    of its own it passes no rows (the caller samples a stand-in). TRL's loop runs per process instead; the rows'
    own random streams make the rollouts those of one process either way."""
    ids = [list(c) for c in first.completion_ids]
    logprobs = None if first.logprobs is None else [list(lp) for lp in first.logprobs]
    mask = [[1] * len(c) for c in ids]
    completions = [[calling.parse(c, p, t)] for c, p, t in zip(ids, prompt_ids, tools)]
    active = [i for i, c in enumerate(completions) if c[-1].get("tool_calls")]
    calls = failures = turn = 0
    while _any_rank(bool(active)) and turn < max_iterations:
        extended = {}
        for i in active:
            messages, failed = call_tools(completions[i][-1]["tool_calls"], tool_dicts[i])
            calls, failures = calls + len(messages), failures + failed
            whole = prompt_ids[i] + ids[i] + calling.suffix_ids(messages)
            if len(whole) - len(prompt_ids[i]) <= max_completion_length and len(whole) < max_model_len:
                completions[i].extend(messages)
                extended[i] = whole  # else: the result would not fit; the row ends with its turn as it is
        active = list(extended)
        if not _any_rank(bool(active)):
            break
        more = generate([extended[i] for i in active], active, turn + 1)
        for k, i in enumerate(active):
            whole, room = extended[i], max_completion_length - (len(extended[i]) - len(prompt_ids[i]))
            new = list(more.completion_ids[k])[:room]
            tool_length = len(whole) - len(prompt_ids[i]) - len(ids[i])
            mask[i] += [0] * tool_length + [1] * len(new)
            if logprobs is not None:
                logprobs[i] += [0.0] * tool_length + list(more.logprobs[k])[:len(new)]
            ids[i] = whole[len(prompt_ids[i]):] + new
            if new:  # a turn cut to nothing adds no message
                completions[i].append(calling.parse(new, whole, tools[i]))
        last = {i: completions[i][-1] for i in active}  # a row whose new turn calls tools goes on
        active = [i for i in active if last[i]["role"] == "assistant" and last[i].get("tool_calls")]
        turn += 1
    return Rollout(ids, logprobs, [], prompt_ids=prompt_ids, tool_mask=mask), completions, (calls, failures)


def _any_rank(flag: bool) -> bool:
    return not distributed.all_ranks(not flag)
