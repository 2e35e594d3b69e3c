"""Packing (data.packing): the examples of a micro-batch in one row, position_ids restarting per example.

With dropout off it must compute what the padded batch computes: the same summed loss (1e-5 relative) and
the same adapter gradients (1e-5 relative in norm, fp32), on the tiny Llama and on the real SmolLM2.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import rel_max_error
from milora_cli import adapter
from milora_cli.data.records import load_records
from milora_cli.data.tokens import Collator, build_dataset
from milora_cli.errors import RecipeError
from milora_cli.recipe import DataConfig
from milora_cli.training.step import CausalLMLoss, loss_inputs, packs


def adapted_model(model_dir: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    layers = adapter.inject(model, adapter.find_targets(model, ["q_proj", "v_proj", "down_proj"]), 4, 4, 0.0)
    adapter.initialise(layers, "milora", "float64", "gram", seed=0)
    for layer in layers.values():  # a trained-looking adapter, so that B A != B0 A0 and every factor has a gradient
        layer.lora_B.weight.data += 0.01 * torch.randn_like(layer.lora_B.weight)
    return model


def loss_and_grads(model: torch.nn.Module, collate: Collator, examples) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = CausalLMLoss(model)(**loss_inputs(collate(examples)))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_packing_is_exact(model_dir: str, tokenizer, data_path: str) -> None:
    train, _ = load_records(DataConfig(path=data_path, val_size=0), seed=0)
    examples = build_dataset(train[:6], tokenizer, 64, False).examples
    assert len({len(t.input_ids) for t in examples}) > 1, "the batch must mix lengths, or padding is no test"
    model = adapted_model(model_dir)
    padded = loss_and_grads(model, Collator(tokenizer.pad_token_id, packed=False), examples)
    longest = max(len(t.input_ids) for t in examples)
    for row_tokens in (10_000, longest + 10, 2 * longest):  # one row; rows of one or two examples, padded with a segment of their own
        collate = Collator(tokenizer.pad_token_id, packed=True, row_tokens=row_tokens)
        assert (len(collate(examples).inputs["input_ids"]) > 1) == (row_tokens < 10_000)
        packed = loss_and_grads(model, collate, examples)
        assert rel_max_error(packed[0], padded[0]) <= 1e-5
        assert padded[1].keys() == packed[1].keys() and padded[1]
        for name, grad in padded[1].items():  # relative error in norm: fp32 sums in another order over 30 layers
            assert ((packed[1][name] - grad).norm() / grad.norm()).item() <= 1e-5, (row_tokens, name)


def test_packed_loss_and_gradients_equal_the_padded_batch_tiny(tiny_model_dir, smol_tokenizer, tiny_data):
    assert_packing_is_exact(tiny_model_dir, smol_tokenizer, tiny_data)


@pytest.mark.slow
def test_packed_loss_and_gradients_equal_the_padded_batch_smollm2(smollm2_path, smol_tokenizer, tiny_data):
    assert_packing_is_exact(smollm2_path, smol_tokenizer, tiny_data)


def test_a_packed_row_holds_every_example_once_with_positions_restarting(smol_tokenizer, tiny_data):
    train, _ = load_records(DataConfig(path=tiny_data, val_size=0), seed=0)
    examples = build_dataset(train[:3], smol_tokenizer, 64, False).examples
    batch = Collator(smol_tokenizer.pad_token_id, packed=True, row_tokens=10_000)(examples)
    assert batch.inputs["input_ids"][0].tolist() == [token for t in examples for token in t.input_ids]
    assert batch.inputs["position_ids"][0].tolist() == [p for t in examples for p in range(len(t.input_ids))]
    assert "attention_mask" not in batch.inputs and batch.n_tokens == sum(len(t.input_ids) for t in examples)
    assert len(batch.targets) == sum(t.n_targets for t in examples)


def test_packing_on_is_refused_for_an_architecture_without_packed_masks(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert packs("auto", model) and packs("on", model) and not packs("off", model)
    model.config.model_type = "gpt2"
    assert not packs("auto", model)
    with pytest.raises(RecipeError, match="data.packing=on"):
        packs("on", model)


def test_rows_hold_at_most_row_tokens_and_every_example_once_in_order(smol_tokenizer, tiny_data):
    train, _ = load_records(DataConfig(path=tiny_data, val_size=0), seed=0)
    examples = build_dataset(train[:12], smol_tokenizer, 64, False).examples
    row_tokens = 2 * max(len(t.input_ids) for t in examples) + 5  # two or three examples a row
    batch = Collator(smol_tokenizer.pad_token_id, packed=True, row_tokens=row_tokens)(examples)
    ids, pos, labels = batch.inputs["input_ids"], batch.inputs["position_ids"], batch.labels
    assert 1 < len(ids) < len(examples) and ids.shape[1] <= row_tokens
    row, offset, used = 0, 0, {}
    for t in examples:  # each example whole, in order, starting a new row only when it would not fit
        if offset and offset + len(t.input_ids) > row_tokens:
            row, offset = row + 1, 0
        assert ids[row, offset : offset + len(t.input_ids)].tolist() == t.input_ids
        assert pos[row, offset : offset + len(t.input_ids)].tolist() == list(range(len(t.input_ids)))
        offset += len(t.input_ids)
        used[row] = offset
    assert row == len(ids) - 1
    for r, n in used.items():  # the rest of a row is padding: its own segment, no loss
        assert pos[r, n:].tolist() == list(range(ids.shape[1] - n)) and (labels[r, n:] == -100).all()
    assert batch.n_tokens == sum(used.values()) and len(batch.targets) == sum(t.n_targets for t in examples)
