"""``transformers`` interop: QAT-train a captured Hugging Face model with ``transformers.Trainer``.

A prepared graph of a Hugging Face model returns what the model returned (logits in a
``ModelOutput``) and takes positional tensors, while ``Trainer`` calls
``model(**batch)`` with ``input_ids``, ``attention_mask`` and ``labels`` and reads
``outputs.loss``. :class:`GraphForTrainer` is the thin ``nn.Module`` between them: it
passes the graph's inputs by position, computes the loss the way the Hugging Face head
does, and returns a ``ModelOutput`` with ``loss`` and ``logits``::

    model = LlamaForCausalLM(LlamaConfig(..., use_cache=False))
    wrapped = qgraph.recipes.hf.prepare_qat_for_trainer(model, {"input_ids": ids})
    Trainer(model=wrapped, args=TrainingArguments(..., report_to=[]), train_dataset=data).train()
    quantized = qgraph.convert(wrapped.graph)

The losses (``task``):

* ``"causal_lm"``: ``CE(logits[:, :-1], labels[:, 1:])`` over positions whose label is not
  ``-100`` — the shift of ``LlamaForCausalLM`` (``labels`` may simply be ``input_ids``).
* ``"sequence_classification"``: ``CE(logits, labels)``; with one label, ``MSE`` (regression),
  as the Hugging Face heads choose by ``num_labels``.

The graph is captured with a fixed sequence length and a dynamic batch, so batches must be
padded to the example's length (the last, smaller batch of an epoch is fine).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutput, SequenceClassifierOutput

from qgraph.api.pipeline import prepare_qat
from qgraph.core.errors import ConfigError

TASKS = ("causal_lm", "sequence_classification")


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ConfigError(f"GraphForTrainer: the graph returned {type(output).__name__}; expected logits or a "
                      "ModelOutput with .logits")


class GraphForTrainer(nn.Module):
    """A captured (prepared or converted) graph as a model ``transformers.Trainer`` can train.

    ``input_names`` are the graph's positional inputs in order (as captured, e.g.
    ``("input_ids", "attention_mask")``); a missing ``attention_mask`` is all ones. ``config``
    (a Hugging Face config, copied) is exposed as ``.config`` for the Trainer.
    """

    main_input_name = "input_ids"

    def __init__(self, graph: torch.fx.GraphModule, task: str, input_names: Sequence[str] = ("input_ids",),
                 config: Any = None) -> None:
        super().__init__()
        if task not in TASKS:
            raise ConfigError(f"GraphForTrainer: task={task!r} must be one of {TASKS}")
        unknown = [n for n in input_names if n not in ("input_ids", "attention_mask")]
        if not input_names or input_names[0] != "input_ids" or unknown:
            raise ConfigError(f"GraphForTrainer: input_names={tuple(input_names)} must start with 'input_ids' and "
                              "name only 'input_ids' and 'attention_mask'")
        self.graph = graph
        self.task = task
        self.input_names = tuple(input_names)
        self.config = copy.deepcopy(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None):
        given = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "attention_mask" in self.input_names and attention_mask is None:
            given["attention_mask"] = torch.ones_like(input_ids)
        logits = _logits(self.graph(*(given[n] for n in self.input_names)))
        loss = None if labels is None else self._loss(logits, labels)
        if self.task == "causal_lm":
            return CausalLMOutput(loss=loss, logits=logits)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.task == "causal_lm":
            shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
            return F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)
        if logits.shape[-1] == 1:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.float(), labels.reshape(-1))


def infer_task(model: nn.Module) -> str:
    """``"causal_lm"`` for ``*ForCausalLM``, ``"sequence_classification"`` for
    ``*ForSequenceClassification`` (by class name: the heads share no base class)."""
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "causal_lm"
    if name.endswith("ForSequenceClassification"):
        return "sequence_classification"
    raise ConfigError(f"cannot tell the task of {name}; pass task='causal_lm' or 'sequence_classification'")


def prepare_qat_for_trainer(model: nn.Module, example_inputs: dict[str, torch.Tensor], task: str | None = None,
                            **prepare_kwargs: Any) -> GraphForTrainer:
    """:func:`qgraph.prepare_qat` a Hugging Face model and wrap it for ``transformers.Trainer``.

    ``example_inputs`` maps input names to example tensors (``{"input_ids": ids}`` or with
    ``"attention_mask"``); they are passed by position in the order of ``model.forward``'s
    parameters, which must begin with them. ``prepare_kwargs`` go to ``prepare_qat``
    (``backend``, ``config``, ``dump_dir``). Build the model with ``use_cache=False``.
    """
    if getattr(getattr(model, "config", None), "use_cache", False):
        raise ConfigError("build the model with use_cache=False: a kv cache output cannot be quantized or trained")
    params = list(inspect.signature(model.forward).parameters)
    names = list(example_inputs)
    if params[: len(names)] != names:
        raise ConfigError(f"example_inputs {names} must be the first parameters of {type(model).__name__}.forward "
                          f"in order: {params[: len(names) + 1]}")
    prepared = prepare_qat(model, tuple(example_inputs.values()), **prepare_kwargs)
    return GraphForTrainer(prepared, task or infer_task(model), names, getattr(model, "config", None))
