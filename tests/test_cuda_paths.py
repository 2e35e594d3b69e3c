"""The CUDA-only branches, checked on the CPU by their mechanism (issue 24): what transformers' flash attention
sees of a packed batch, the fp16 loss-scaler rule, the interruption flag's CPU-side reduction, the cached
autocast copies of A0/B0, bitsandbytes' int8 note. No GPU runs here; where only a GPU can show a thing (pinned
memory), the test is marked gpu and skips."""

import logging
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from transformers import LlamaConfig
from transformers.masking_utils import create_causal_mask
from transformers.modeling_flash_attention_utils import _is_packed_sequence

from milora_cli.data.tokens import IGNORE_INDEX, Collator, TokenizedExample
from milora_cli.errors import RecipeError
from milora_cli.training import distributed

# Examples of 5, 3, 7, 2 and 6 tokens: rows of at most 9 tokens hold them in several rows.
LENGTHS = [5, 3, 7, 2, 6]


def examples() -> list[TokenizedExample]:
    ids = iter(range(1, 1000))
    return [TokenizedExample(input_ids=[next(ids) for _ in range(n)], labels=[next(ids) for _ in range(n)], truncated=False) for n in LENGTHS]


def segments(position_ids: torch.Tensor) -> torch.Tensor:
    """(R, T) segment number of each token: a new segment wherever the positions restart at 0."""
    return (position_ids == 0).long().cumsum(-1)


def test_under_flash_attention_a_micro_batch_packs_into_the_one_row_transformers_detects():
    """transformers' flash attention takes its variable-length path (examples apart) only for a batch of ONE
    row (modeling_flash_attention_utils._is_packed_sequence); over several rows it would attend across the
    examples of each row. The one-row collate is detected; the capped rows, which sdpa/eager need, are not."""
    one_row = Collator(pad_token_id=0, packed=True, row_tokens=None)(examples())
    position_ids = one_row.inputs["position_ids"]
    assert position_ids.shape == (1, sum(LENGTHS))
    assert bool(_is_packed_sequence(position_ids, batch_size=1))
    capped = Collator(pad_token_id=0, packed=True, row_tokens=9)(examples())
    assert capped.inputs["position_ids"].shape[0] > 1
    assert not _is_packed_sequence(capped.inputs["position_ids"], batch_size=capped.inputs["position_ids"].shape[0])
    # the same tokens and targets either way: one row is only another layout of the micro-batch
    assert one_row.targets.sort().values.equal(capped.targets.sort().values) and one_row.n_tokens == capped.n_tokens


def test_the_training_collate_follows_the_attention_kernel(tiny_model_dir, tiny_data, tmp_path):
    from transformers import AutoConfig

    from milora_cli.recipe import Recipe
    from milora_cli.training.train import collator

    class Model(torch.nn.Module):
        config = AutoConfig.from_pretrained(tiny_model_dir)

    raw = {"model": {"name_or_path": tiny_model_dir}, "data": {"path": tiny_data, "max_length": 64}, "output": {"dir": str(tmp_path)}}
    assert collator(Recipe.model_validate(raw), Model(), 0).row_tokens == 64
    raw["model"]["attn_implementation"] = "flash_attention_2"
    assert collator(Recipe.model_validate(raw), Model(), 0).row_tokens is None


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sdpa_and_eager_masks_of_packed_rows_are_block_diagonal(attn):
    """transformers builds the masks of milora's capped rows from their position ids: each token sees the
    earlier tokens of its own example only (the padding is a segment of its own)."""
    batch = Collator(pad_token_id=0, packed=True, row_tokens=9)(examples())
    position_ids = batch.inputs["position_ids"]  # (R, T)
    rows, width = position_ids.shape
    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1, vocab_size=16)
    config._attn_implementation = attn
    mask = create_causal_mask(config=config, inputs_embeds=torch.zeros(rows, width, 8), attention_mask=None, cache=None,
                              position_ids=position_ids)
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0  # (R, T, T): eager's mask is additive
    seg = segments(position_ids)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    expected = (seg[:, :, None] == seg[:, None, :]) & causal  # (R, T, T)
    assert torch.equal(allowed, expected)


def test_an_fp16_base_never_trains_without_a_loss_scaler():
    """accelerate makes a GradScaler only for mixed_precision=fp16 on a GPU; anything else would train an fp16 base
    with unscaled fp16 gradients (they underflow)."""
    from milora_cli.training.train import autocast_dtype

    assert autocast_dtype("auto", "fp16", cuda=True) == "fp16"
    assert autocast_dtype("fp16", "fp16", cuda=True) == "fp16"
    with pytest.raises(RecipeError, match="model.dtype=fp16 with train.mixed_precision=no would train without a loss scaler"):
        autocast_dtype("no", "fp16", cuda=True)
    for choice in ("auto", "no", "fp16"):
        with pytest.raises(RecipeError, match="model.dtype=fp16 on a CPU would train without a loss scaler"):
            autocast_dtype(choice, "fp16", cuda=False)


def _flag_worker(rank: int, world: int, init_file: str, raised_on: int, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        group = distributed.control_group()
        results[rank] = (group is None, distributed.any_process(rank == raised_on, group), distributed.any_process(False, group))
    finally:
        torch.distributed.destroy_process_group()


def test_the_interruption_flag_is_reduced_on_the_cpu_and_reaches_every_process():
    """Each step's stop decision is one all-reduce of a CPU tensor over a gloo group (the default group when it is
    gloo already; a new gloo group under NCCL), so reading it never waits for a GPU; a flag raised on one process
    stops all of them at the same step."""
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "init")
        mp.start_processes(_flag_worker, args=(2, init_file, 1, results), nprocs=2, join=True, start_method="spawn")
    assert dict(results) == {0: (True, True, False), 1: (True, True, False)}


def _generation_worker(rank: int, world: int, init_file: str, results) -> None:
    from torch.distributed.tensor import DTensor
    from transformers import LlamaForCausalLM

    from milora_cli.evaluation import generate

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
        model = LlamaForCausalLM(config).eval()
        distributed.shard(model, "cpu")
        weight = lambda: model.model.layers[0].self_attn.q_proj.weight  # noqa: E731 - the attribute FSDP2 swaps
        prompt = torch.tensor([[1, 2, 3, 4]])
        with torch.no_grad():
            plain = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
            after_plain = isinstance(weight(), DTensor)
            with generate.gathered(model):
                kept = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
                inside = isinstance(weight(), DTensor)
        results[rank] = (after_plain, inside, isinstance(weight(), DTensor), torch.equal(plain, kept))
    finally:
        torch.distributed.destroy_process_group()


def test_under_fsdp_generation_gathers_each_layer_once_not_once_a_token():
    """FSDP2 reshards a unit after every forward, so generate() all-gathered every layer again for each decoded
    token. Within generate.gathered (where every process has room for the whole model, as here) a unit's
    weights stay gathered after its forward until the generation ends, then are sharded again; the tokens
    are the same."""
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_generation_worker, args=(2, os.path.join(folder, "init"), results), nprocs=2, join=True, start_method="spawn")
    # sharded after a plain forward; whole (no DTensor) inside, between tokens; sharded again after; same tokens
    assert dict(results) == {0: (True, False, True, True), 1: (True, False, True, True)}


def test_under_autocast_a0_b0_are_cast_once_and_the_init_stays_exact():
    """Autocast caches its casts only of tensors that require grad: the frozen A0/B0 would be cast on every
    forward. The layer keeps autocast-dtype copies until A0/B0 change; the correction still cancels exactly."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from test_adapter import adapted, tiny_llama, tokens

    class Casts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default:
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    x = tokens()
    model, layers = adapted("milora", torch.bfloat16)
    initial_shapes = {shape for layer in layers.values() for shape in (tuple(layer.lora_A0.shape), tuple(layer.lora_B0.shape))}
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert torch.equal(model(x).logits, tiny_llama(torch.bfloat16)(x).logits)  # exact at init, copies made
        with Casts() as casts:
            model(x)
    # the trained lora_A/lora_B have these shapes too, but autocast caches their casts (they require grad): so,
    # within one autocast region, no cast of such a shape at all once the copies exist
    assert not [shape for shape in casts.shapes if shape in initial_shapes]
    layer = next(iter(layers.values()))
    copies = layer.initial_factors_in("cpu")
    layer.set_factors(layer.lora_A0 * 2, layer.lora_B0)  # new initial factors: new copies
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer.initial_factors_in("cpu")[0], (layer.lora_A0).to(torch.bfloat16))
        assert layer.initial_factors_in("cpu")[0] is not copies[0]
    assert layer.initial_factors_in("cpu")[0] is layer.lora_A0  # no autocast: the buffers themselves


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned memory exists only beside a GPU")
def test_a_batch_goes_to_the_gpu_through_pinned_memory():
    batch = Collator(pad_token_id=0, packed=True, row_tokens=9)(examples())
    moved = batch.to("cuda")
    torch.cuda.synchronize()
    assert moved.inputs["input_ids"].is_cuda and torch.equal(moved.inputs["input_ids"].cpu(), batch.inputs["input_ids"])
    assert batch.to("cpu") is batch  # to the CPU: nothing copied


def test_int8_with_a_bf16_base_notes_the_fp16_cast_once(tiny64_model_dir, caplog):
    pytest.importorskip("bitsandbytes")
    from milora_cli import quantize

    model = quantize.load_model(tiny64_model_dir, "bf16", "int8")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"), torch.no_grad():
        for _ in range(3):
            model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    notes = [r for r in caplog.records if r.getMessage().startswith("MatMul8bitLt: inputs will be cast")]
    assert len(notes) <= 1


def test_labels_of_the_one_row_layout_never_cross_examples():
    """An example's first label would be the previous example's last token's target: never trained, in one row too."""
    batch = Collator(pad_token_id=0, packed=True, row_tokens=None)(examples())
    starts = (batch.inputs["position_ids"][0] == 0).nonzero().flatten()
    assert all(batch.labels[0, s] == IGNORE_INDEX for s in starts.tolist())
