"""Packing (data.packing): the examples of a micro-batch in one row, position_ids restarting per example.

With dropout off it computes what the padded batch computes, exactly in exact arithmetic: the same summed
loss and the same adapter gradients. Tested in float64 (model, factors and gradients), where the two
summation orders differ by ~1e-14 relative on any CPU, on the tiny Llama and on the real SmolLM2; plus one
float32 smoke check whose bound is the padded batch's own float32 error on the same problem.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import rel_max_error
from milora_cli import adapter, models
from milora_cli.data.records import load_records
from milora_cli.data.tokens import Collator, build_dataset, pack_rows
from milora_cli.errors import RecipeError
from milora_cli.recipe import DataConfig
from milora_cli.training.step import CausalLMLoss, loss_inputs, packs

# float64: the unit roundoff is 2^-53 ~ 1.1e-16; a sum of n terms in another order differs by at most ~n u times
# the sum of the terms' magnitudes, and the loss's and gradients' sums here have n < 10^4 terms of one sign mostly
# (condition ~1 to 10^2): ~1e-11 at worst. A real difference (a token masked wrongly, attention across examples,
# a position offset) moves the loss by >1e-3.
EXACT_FP64 = 1e-10


def adapted_model(model_dir: str, dtype: str = "fp64") -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.load_model(model_dir, dtype)
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


def examples_of_mixed_length(tokenizer, data_path: str):
    train, _ = load_records(DataConfig(path=data_path, val_size=0), seed=0)
    examples = build_dataset(train[:6], tokenizer, 64, False).examples
    assert len({len(t.input_ids) for t in examples}) > 1, "the batch must mix lengths, or padding is no test"
    return examples


def packed_collators(tokenizer, examples) -> list[Collator]:
    """One row; rows of one or two examples, padded with a segment of their own."""
    longest = max(len(t.input_ids) for t in examples)
    collators = [Collator(tokenizer.pad_token_id, packed=True, row_tokens=n) for n in (10_000, longest + 10, 2 * longest)]
    assert [len(c(examples).inputs["input_ids"]) > 1 for c in collators] == [False, True, True]
    return collators


def assert_packing_is_exact(model_dir: str, tokenizer, data_path: str) -> None:
    examples = examples_of_mixed_length(tokenizer, data_path)
    model = adapted_model(model_dir)
    padded = loss_and_grads(model, Collator(tokenizer.pad_token_id, packed=False), examples)
    assert padded[0].dtype == torch.float64 and all(g.dtype == torch.float64 for g in padded[1].values())
    for collate in packed_collators(tokenizer, examples):
        packed = loss_and_grads(model, collate, examples)
        assert rel_max_error(packed[0], padded[0]) <= EXACT_FP64
        assert padded[1].keys() == packed[1].keys() and padded[1]
        for name, grad in padded[1].items():
            assert ((packed[1][name] - grad).norm() / grad.norm()).item() <= EXACT_FP64, (collate.row_tokens, name)


def test_packed_loss_and_gradients_equal_the_padded_batch_tiny(tiny_model_dir, smol_tokenizer, tiny_data):
    assert_packing_is_exact(tiny_model_dir, smol_tokenizer, tiny_data)


@pytest.mark.slow
def test_packed_loss_and_gradients_equal_the_padded_batch_smollm2(smollm2_path, smol_tokenizer, tiny_data):
    assert_packing_is_exact(smollm2_path, smol_tokenizer, tiny_data)


def test_packing_in_float32_is_as_accurate_as_padding(tiny_model_dir, smol_tokenizer, tiny_data):
    """The float32 smoke check: against the float64 gradients, packed float32 ones are no further off than the
    padded float32 ones' own rounding error (or float32's unit roundoff 2^-24 where that is smaller) times 10:
    both sum the same terms in float32, only in other orders, so the same bound holds for both on any CPU."""
    examples = examples_of_mixed_length(smol_tokenizer, tiny_data)
    exact = loss_and_grads(adapted_model(tiny_model_dir), Collator(smol_tokenizer.pad_token_id, packed=False), examples)[1]
    model = adapted_model(tiny_model_dir, "fp32")
    padded = loss_and_grads(model, Collator(smol_tokenizer.pad_token_id, packed=False), examples)[1]
    for collate in packed_collators(smol_tokenizer, examples):
        packed = loss_and_grads(model, collate, examples)[1]
        for name, truth in exact.items():
            bound = 10 * max((padded[name].double() - truth).norm().item(), 2**-24 * truth.norm().item())
            assert (packed[name].double() - truth).norm().item() <= bound, (collate.row_tokens, name)


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
