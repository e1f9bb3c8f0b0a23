"""What ``vlablocks bench`` runs, shared by its timings (:mod:`vlablocks.tools.bench`) and its
peak-memory probes (:mod:`vlablocks.tools.memory`): the settings, the seeded model, the benchmark
batch (with its task prompts), the autocast context and the training step."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from vlablocks.data.meta import read_meta
from vlablocks.policy import batch as keys
from vlablocks.policy.batch import to_device
from vlablocks.policy.checks import random_batch
from vlablocks.policy.vla import VLA
from vlablocks.recipes.builder import build

Dtype = Literal["fp32", "bf16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class BenchSettings:
    """How to measure.

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        dtype: ``"fp32"`` or ``"bf16"`` (autocast; see :mod:`vlablocks.tools.bench`).
        compile: ``"off"``; ``"step"``: ``torch.compile`` (static shapes) the prefix pass, the
            denoise step and the joint pass, each one graph that the chunk loops call, and the
            training forward; ``"chunk"``: as ``"step"``, but each whole chunk (prefix pass and
            ``N`` steps) is one unrolled graph: no per-step guard checks, much longer compilation.
        batch: observations per inference call (1: one robot's control loop).
        train_batch: samples per training step.
        steps: ODE steps per action chunk ``N``.
        repeats: timed runs per figure (the median is reported).
        warmup: untimed runs before them (compilation happens here).
        train: measure the training step.
        memory: measure peak memory (CPU: one fresh process per figure).
        seed: seeds the weights and the inputs.
        prompt_tokens: make every task prompt exactly this many tokens as the policy's text
            encoder sees it (its own prompt template and newline included; see
            :func:`fit_prompt`); ``None``: the short built-in tasks of
            :func:`~vlablocks.policy.checks.random_batch`.
        prompts: take the task strings from this file (one per line) or LeRobot dataset directory
            (its ``meta/tasks``), cycled over the batch; exclusive with ``prompt_tokens``.
        fuse, quantize: time the inference figures of the policy optimised for inference
            (:func:`~vlablocks.policy.inference.optimize_for_inference`: fused projections;
            ``"int8"`` dynamic int8 linears, CPU only); training is always timed as built.
    """

    device: str = "cpu"
    dtype: Dtype = "fp32"
    compile: Literal["off", "step", "chunk"] = "off"
    batch: int = 1
    train_batch: int = 8
    steps: int = 10
    repeats: int = 10
    warmup: int = 2
    train: bool = True
    memory: bool = True
    seed: int = 0
    prompt_tokens: int | None = None
    prompts: str | None = None
    fuse: bool = False
    quantize: Literal["none", "int8"] = "none"

    def __post_init__(self) -> None:
        if self.quantize not in ("none", "int8"):
            raise ValueError(f"quantize must be 'none' or 'int8'; got {self.quantize!r}")
        if self.quantize == "int8" and self.device != "cpu":
            raise ValueError(f"quantize='int8' is dynamic CPU quantisation; got device {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {self.dtype!r}")
        if self.compile not in ("off", "step", "chunk"):
            raise ValueError(f"compile must be 'off', 'step' or 'chunk'; got {self.compile!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda'; got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")
        for name in ("batch", "train_batch", "steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0; got {self.warmup}")
        if self.prompt_tokens is not None and self.prompts is not None:
            raise ValueError(f"give prompt_tokens or prompts, not both; got prompt_tokens={self.prompt_tokens} "
                             f"and prompts={self.prompts!r}")
        if self.prompt_tokens is not None and self.prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be >= 1; got {self.prompt_tokens}")
        if self.prompts is not None and not Path(self.prompts).exists():
            raise ValueError(f"prompts must be a text file or a LeRobot dataset directory; got {self.prompts!r}, "
                             "which does not exist")


def build_for_bench(recipe: str, overrides: Sequence[str], seed: int, device: str) -> VLA:
    """The recipe's model with seeded random weights (nothing loaded), on ``device``."""
    torch.manual_seed(seed)
    return build(recipe, overrides, load_weights=False, device=device)


def bench_autocast(settings: BenchSettings) -> AbstractContextManager:
    """``torch.autocast`` to the settings' dtype, or nothing for fp32."""
    if settings.dtype == "fp32":
        return nullcontext()
    return torch.autocast(settings.device, dtype=DTYPES[settings.dtype])


def make_train_phases(vla: VLA, settings: BenchSettings) -> tuple[Callable[[], float], Callable[[], None]]:
    """The two halves of a training step on a fixed benchmark batch (:func:`bench_batch`).

    ``forward_backward()``: the gradients set to ``None``, then loss and backward (returns the
    loss); ``optimizer_step()``: the AdamW step and ``zero_grad(set_to_none=True)``. Called in
    turn they make one whole training step.
    """
    vla.train()
    batch = bench_batch(vla, settings.train_batch, settings)
    params = [p for p in vla.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    forward = torch.compile(vla, dynamic=False) if settings.compile != "off" else vla
    gen = torch.Generator(settings.device).manual_seed(settings.seed)

    def forward_backward() -> float:
        optimizer.zero_grad(set_to_none=True)  # a no-op after optimizer_step, but each half stands alone
        with bench_autocast(settings):
            loss = forward(batch, generator=gen).loss
        loss.backward()
        return loss.item()

    def optimizer_step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return forward_backward, optimizer_step


def make_train_step(vla: VLA, settings: BenchSettings) -> Callable[[], float]:
    """A closure running one loss + backward + AdamW step on a fixed benchmark batch."""
    forward_backward, optimizer_step = make_train_phases(vla, settings)

    def step() -> float:
        loss = forward_backward()
        optimizer_step()
        return loss

    return step


# ------------------------------------------------------------------------------------ prompts

#: words the fitted prompts are made of (cycled; each sample starts at a different one).
PROMPT_WORDS = ("pick", "up", "the", "red", "block", "and", "place", "it", "in", "open", "drawer", "then",
                "push", "green", "button", "close", "window", "slowly")
_MARKER = "VLABLOCKSPROMPTMARKER"  # stands for the task while the policy's template is read


def read_prompts(source: str | Path) -> list[str]:
    """Task strings: a text file's non-empty lines (stripped), or a LeRobot dataset directory's
    ``meta/tasks`` in task-index order (read by :func:`~vlablocks.data.meta.read_meta`)."""
    path = Path(source)
    if path.is_dir():
        tasks = read_meta(path).tasks
        prompts = [tasks[index] for index in sorted(tasks)]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts must hold at least one task string; got none in {str(path)!r}")
    return prompts


def prompt_templates(vla: VLA, batch: dict[str, Any]) -> list[tuple[str, str]]:
    """Per sample, the text around the task in what ``vla.encode(batch)`` gives its text encoder
    (``task_newline``'s ``"\\n"``, pi0.5's ``"Task: ..., State: ...;\\nAction: "``): ``(before, after)``.

    Found by encoding the batch with a marker task up to the text encoder and reading the texts it
    receives (then stopping: nothing is tokenized), so the policy's own prompt building is used.
    """

    def capture(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        raise _Captured(list(args[0]))

    hook = vla.text.register_forward_pre_hook(capture)
    try:
        with torch.no_grad():
            vla.encode({**batch, keys.TASK: [_MARKER] * len(batch[keys.TASK])})
    except _Captured as captured:
        texts = captured.texts
    else:
        raise RuntimeError("vla.encode never called its text encoder: no prompt to fit")
    finally:
        hook.remove()
    if any(text.count(_MARKER) != 1 for text in texts):
        raise RuntimeError(f"could not find the task in the texts the text encoder receives: {texts!r:.200}")
    return [tuple(text.split(_MARKER)) for text in texts]  # type: ignore[misc]


class _Captured(Exception):
    """Stops :func:`prompt_templates`' encoding at the text encoder, carrying its texts."""

    def __init__(self, texts: list[str]) -> None:
        super().__init__("captured")
        self.texts = texts


def fit_prompt(count: Callable[[str], int], tokens: int, start: int = 0) -> str:
    """A task text of words from :data:`PROMPT_WORDS` (from word ``start`` on) for which ``count``
    gives exactly ``tokens``: the shortest such prefix of the word sequence, grown word by word and
    the last word character by character. One token short, a last character is appended without a
    space first (a byte tokenizer counts ``" u"`` as two tokens; at ``max_length`` the second would
    be truncated, unseen). ValueError when no prefix lands on ``tokens``."""
    words = itertools.cycle(PROMPT_WORDS[start % len(PROMPT_WORDS):] + PROMPT_WORDS[:start % len(PROMPT_WORDS)])
    text = ""
    shortest = count(PROMPT_WORDS[start % len(PROMPT_WORDS)][0])
    if tokens < shortest:
        raise ValueError(f"prompt_tokens must be >= {shortest} for this policy (its prompt template and a "
                         f"one-letter task take that many tokens); got {tokens}")
    extras = ("s", "a", "x")  # a last character that adds one token, not two
    for word in words:
        if text and count(text) == tokens - 1:
            for extra in extras:
                if count(text + extra) == tokens:
                    return text + extra
        joined = f"{text} " if text else ""
        for end in range(1, len(word) + 1):
            found = count(joined + word[:end])
            if found == tokens:
                return joined + word[:end]
            if found > tokens:
                base = (joined + word[: end - 1]).rstrip()
                for extra in extras:
                    if base and count(base + extra) == tokens:
                        return base + extra
                raise ValueError(f"prompt_tokens: no task text tokenizes to exactly {tokens} tokens "
                                 f"(the tokenizer jumps from {count(text)} to {found}); try {tokens + 1}")
        text = joined + word
    raise AssertionError("unreachable: the word cycle is endless")


def bench_batch(vla: VLA, batch_size: int, settings: BenchSettings) -> dict[str, Any]:
    """:func:`~vlablocks.policy.checks.random_batch` on ``settings.device``, its tasks replaced as
    ``settings.prompt_tokens`` / ``settings.prompts`` ask (see :class:`BenchSettings`).

    With ``prompt_tokens = N`` the text part of the prefix is ``N`` tokens for every sample: the
    prefix is ``P = image tokens + N`` (+ 1 state token, SmolVLA). ValueError when ``N`` exceeds
    the tokenizer's ``max_length``.
    """
    batch = to_device(random_batch(vla, batch_size, seed=settings.seed), settings.device)
    if settings.prompts is not None:
        prompts = read_prompts(settings.prompts)
        batch[keys.TASK] = [prompts[i % len(prompts)] for i in range(batch_size)]
    elif settings.prompt_tokens is not None:
        tokenizer = vla.text.tokenizer
        if settings.prompt_tokens > tokenizer.max_length:
            raise ValueError(f"prompt_tokens must be <= the text encoder's max_length {tokenizer.max_length}; "
                             f"got {settings.prompt_tokens}")

        def counter(before: str, after: str) -> Callable[[str], int]:
            return lambda task: int(tokenizer([before + task + after])[1].sum())

        with bench_autocast(settings):  # encoded as the timed calls encode it (a bf16 model, pi0.5's binned state)
            templates = prompt_templates(vla, batch)
        batch[keys.TASK] = [fit_prompt(counter(before, after), settings.prompt_tokens, start=i)
                            for i, (before, after) in enumerate(templates)]
    return batch
