"""The dense self-teacher, computed inside the student's forward pass, layer by layer.

Mask-learn distils from the model itself with masks and LoRA off. As a pass of its own the teacher
costs a third ZeRO-3 gather of every parameter per micro-step (teacher forward, student forward,
student backward); on a 70B that is 140 GB more all-gather traffic per GPU and micro-step. Here each
decoder layer, right after the student has run it, runs once more on the teacher's hidden states
(no grad, masks and LoRA off) while its parameters are still gathered: ZeRO-3 keeps a parameter
whose next use lies within `stage3_max_reuse_distance`, and the next use is this second call. The
final norm and the LM head do the same. The numbers are those of a separate teacher pass: the same
modules on the same inputs.

Hooks sit outside HF's activation checkpointing (it checkpoints `forward`, not `__call__`), so a
layer recomputed in backward does not run the teacher again. The teacher's first hidden states
are the student's input to layer 0: embeddings are neither masked nor adapted.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_CACHE_ARGS = ("past_key_values", "cache")


@contextmanager
def switched_off(*switches: Any) -> Iterator[None]:
    """Every switch (an object with `enabled`: the masks, the LoRA adapters) off inside the block, so
    the model computes its dense self, the teacher; back on after, also when the block raises."""
    for switch in switches:
        switch.enabled = False
    try:
        yield
    finally:
        for switch in switches:
            switch.enabled = True


@dataclass
class TeacherOutputs:
    """What one student forward produced for the teacher (filled as the forward runs)."""

    hidden: torch.Tensor | None = None  # the teacher's hidden states after the layer just run
    normed: torch.Tensor | None = None  # after the final norm (what the LM head reads)
    student_normed: torch.Tensor | None = None
    logits: torch.Tensor | None = None


@dataclass
class ShadowTeacher:
    """Hooks that make a student forward compute the teacher alongside (see the module doc)."""

    model: nn.Module
    switch_off: Callable[[], Any]  # a context manager: masks and LoRA off
    # False without logit distillation (hidden-state only): the teacher's LM head, a full-vocabulary
    # matmul per token, is not run for logits nobody reads.
    logits_wanted: bool = True
    active: bool = False
    running: bool = False  # inside a teacher call: the hooks of the modules it calls stand aside
    outputs: TeacherOutputs = field(default_factory=TeacherOutputs)

    def attach(self) -> "ShadowTeacher":
        """Hooks for the life of the model, as the mask and LoRA hooks are."""
        layers = self.model.model.layers
        layers[0].register_forward_pre_hook(self._start)
        for layer in layers:
            layer.register_forward_hook(self._layer, with_kwargs=True)
        self.model.model.norm.register_forward_hook(self._norm)
        if self.logits_wanted:
            self.model.lm_head.register_forward_hook(self._head)
        return self

    @contextmanager
    def collect(self) -> Iterator[TeacherOutputs]:
        """Within this block every forward of the model also fills the yielded teacher outputs."""
        self.outputs, self.active = TeacherOutputs(), True
        try:
            yield self.outputs
        finally:
            self.active = False

    def _run(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """The module's __call__ (ZeRO-3's fetch hooks must see the call) as the teacher."""
        self.running = True
        try:
            with torch.no_grad(), self.switch_off():
                return module(*args, **kwargs)
        finally:
            self.running = False

    def _wanted(self) -> bool:
        return self.active and not self.running

    def _start(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._wanted():
            self.outputs.hidden = args[0].detach()

    def _layer(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if self._wanted():
            # Never the student's KV cache: the teacher's keys would join the student's. transformers
            # 5.24 renamed the layers' `past_key_values` argument to `cache`.
            kwargs = {k: None if k in _CACHE_ARGS else v for k, v in kwargs.items()}
            out = self._run(module, self.outputs.hidden, *args[1:], **kwargs)
            self.outputs.hidden = out[0] if isinstance(out, tuple) else out

    def _norm(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        if self._wanted():
            self.outputs.student_normed = output
            self.outputs.normed = self._run(module, self.outputs.hidden)

    def _head(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        if self._wanted():
            logits = self._run(module, self.outputs.normed)
            # Families that soft-cap their logits do it after the head, in the CausalLM forward.
            cap = getattr(self.model.config, "final_logit_softcapping", None)
            self.outputs.logits = logits if cap is None else torch.tanh(logits / cap) * cap
