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
from milora_cli.data.tokens import Collator, build_dataset, pack_rows
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


def test_rows_hold_each_example_once_whole_within_row_tokens(smol_tokenizer, tiny_data):
    train, _ = load_records(DataConfig(path=tiny_data, val_size=0), seed=0)
    examples = build_dataset(train[:12], smol_tokenizer, 64, False).examples
    row_tokens = 2 * max(len(t.input_ids) for t in examples) + 5  # two or three examples a row
    batch = Collator(smol_tokenizer.pad_token_id, packed=True, row_tokens=row_tokens)(examples)
    ids, pos, labels = batch.inputs["input_ids"], batch.inputs["position_ids"], batch.labels
    assert 1 < len(ids) < len(examples) and ids.shape[1] <= row_tokens
    rows = pack_rows([len(t.input_ids) for t in examples], row_tokens)
    assert sorted(i for row in rows for i in row) == list(range(len(examples)))
    for r, row in enumerate(rows):  # each example whole, a row's examples in batch order, then the row's padding
        offset = 0
        for t in (examples[i] for i in row):
            assert ids[r, offset : offset + len(t.input_ids)].tolist() == t.input_ids
            assert pos[r, offset : offset + len(t.input_ids)].tolist() == list(range(len(t.input_ids)))
            offset += len(t.input_ids)
        assert pos[r, offset:].tolist() == list(range(ids.shape[1] - offset)) and (labels[r, offset:] == -100).all()
    assert batch.n_tokens == sum(len(t.input_ids) for t in examples) and len(batch.targets) == sum(t.n_targets for t in examples)


@pytest.mark.parametrize(("lengths", "row_tokens", "rows"), [
    ([150, 200, 150, 100], 300, [[0, 2], [1, 3]]),  # in order would take 3 rows of 250: 750 tokens for 600
    ([129] * 4, 256, [[0], [1], [2], [3]]),  # no two fit a row
    ([300, 5, 5], 256, [[0], [1, 2]]),  # a longer example than the cap: a row of its own, the width of the batch
    ([40, 30, 20, 10], 100, [[0, 1, 2, 3]]),
    ([90, 60, 50, 40, 30, 20, 10], 100, [[0, 6], [1, 3], [2, 4, 5]]),  # in order: 4 rows of up to 90 tokens
])
def test_pack_rows_finds_few_even_rows(lengths, row_tokens, rows):
    assert pack_rows(lengths, row_tokens) == rows
