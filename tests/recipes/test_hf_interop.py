"""transformers interop: tiny Llama and DistilBERT go capture → QAT (with Trainer) → convert.

Models are built from small configs (no downloads); Trainer runs a few CPU steps with
``report_to=[]`` and writes nothing outside ``tmp_path``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)
from transformers.loss.loss_utils import ForCausalLMLoss

import qgraph
from qgraph.core.errors import ConfigError
from qgraph.observers.base import FakeQuantize
from qgraph.ops.qdq import qd
from qgraph.passes.lora.adapter import LoraAdapter
from qgraph.recipes.hf import GraphForTrainer, infer_task, prepare_qat_for_trainer
from qgraph.recipes.lora import add_lora

SEQ, VOCAB = 16, 64


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ, use_cache=False)
    return LlamaForCausalLM(config)


def _distilbert() -> DistilBertForSequenceClassification:
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                              max_position_embeddings=SEQ, num_labels=3)
    return DistilBertForSequenceClassification(config)


def _lm_data(n: int) -> list[dict]:
    """Sequences counting up by a per-sample stride: the next token is learnable."""
    rows = []
    for i in range(n):
        ids = (torch.arange(SEQ) * (1 + i % 3) + i) % VOCAB
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def _cls_data(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        ids[0] = i % 3  # the label is the first token
        rows.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": torch.tensor(i % 3)})
    return rows


def _train(wrapped: GraphForTrainer, data: list[dict], tmp_path) -> list[float]:
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=5e-3,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
                             seed=0)
    trainer = Trainer(model=wrapped, args=args, train_dataset=data)
    trainer.train()
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def _output_step(converted: torch.fx.GraphModule) -> float:
    """The scale of the dequantize that produces the logits (one output quantization step)."""
    out = next(iter(converted.graph.find_nodes(op="output"))).args[0]
    node = out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))
    assert node.target == qd.dequantize_per_tensor.default
    return node.args[1]


def _check_trained_and_converts(wrapped: GraphForTrainer, before: dict, losses: list[float], inputs: tuple):
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    after = dict(wrapped.graph.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the optimizer stepped
    assert all(m.has_range for m in wrapped.graph.modules() if isinstance(m, FakeQuantize))
    wrapped.eval()
    prepared_logits = wrapped.graph(*inputs).logits
    converted = qgraph.convert(wrapped.graph)
    converted_logits = converted(*inputs).logits
    # Converted Q/DQ ops use the fake-quant's qparams; an intermediate value that lands on a
    # rounding tie in one float association and not the other moves by one step, which a
    # few layers can grow to a few steps of the logits — never more on these tiny models.
    assert (converted_logits - prepared_logits).abs().max() <= 4 * _output_step(converted)
    return converted


def test_llama_qat_with_trainer_then_convert(tmp_path):
    model = _llama()
    ids = torch.stack([row["input_ids"] for row in _lm_data(2)])
    wrapped = prepare_qat_for_trainer(model, {"input_ids": ids})
    assert wrapped.task == "causal_lm" and wrapped.config is not model.config
    before = {k: v.detach().clone() for k, v in wrapped.graph.named_parameters()}
    losses = _train(wrapped, _lm_data(16), tmp_path)
    assert losses[-1] < losses[0]  # a learnable sequence: 4 Adam steps at 5e-3 already help
    _check_trained_and_converts(wrapped, before, losses, (ids,))
    # The wrapper's loss is Hugging Face's causal-LM loss (shift by one, -100 ignored).
    labels = ids.clone()
    labels[:, -3:] = -100
    out = wrapped(ids, labels=labels)
    torch.testing.assert_close(out.loss, ForCausalLMLoss(out.logits, labels, VOCAB), rtol=0, atol=1e-6)
    # QAT + LoRA with the Trainer: only the adapters move.
    lora = GraphForTrainer(add_lora(wrapped.graph, r=4, alpha=8, targets=r".*\.(q_proj|v_proj)"), "causal_lm")
    frozen = {k: v.detach().clone() for k, v in lora.graph.named_parameters() if not v.requires_grad}
    _train(lora, _lm_data(16), tmp_path)
    now = dict(lora.graph.named_parameters())
    assert all(torch.equal(v, now[k]) for k, v in frozen.items())
    assert all(m.lora_B.abs().sum() > 0 for m in lora.graph.modules() if isinstance(m, LoraAdapter))


def test_distilbert_qat_with_trainer_then_convert(tmp_path):
    model = _distilbert()
    rows = _cls_data(16)
    ids = torch.stack([r["input_ids"] for r in rows[:2]])
    mask = torch.ones_like(ids)
    wrapped = prepare_qat_for_trainer(model, {"input_ids": ids, "attention_mask": mask})
    assert wrapped.task == "sequence_classification" and wrapped.input_names == ("input_ids", "attention_mask")
    before = {k: v.detach().clone() for k, v in wrapped.graph.named_parameters()}
    losses = _train(wrapped, rows, tmp_path)
    _check_trained_and_converts(wrapped, before, losses, (ids, mask))
    out = wrapped(ids, labels=torch.tensor([0, 2]))  # no mask given: all ones, as captured
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2])))


def test_wrapper_refuses_what_it_cannot_train():
    model = _llama()
    model.config.use_cache = True
    with pytest.raises(ConfigError, match="use_cache=False"):
        prepare_qat_for_trainer(model, {"input_ids": torch.zeros(1, SEQ, dtype=torch.long)})
    with pytest.raises(ConfigError, match="first parameters"):
        prepare_qat_for_trainer(_distilbert(), {"attention_mask": torch.ones(1, SEQ, dtype=torch.long)})
    with pytest.raises(ConfigError, match="task"):
        infer_task(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="task="):
        GraphForTrainer(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()), "masked_lm")
