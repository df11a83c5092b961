"""daemon.train.batching and the exact shortcuts of daemon.train.step.

Packed rows must give every example exactly the loss it has alone (no token
attends across examples, no example's last token predicts the next one's
first); length grouping must keep every example once per epoch in a seeded,
resumable order; a resumed file keeps the order its checkpoint was made with.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from daemon.config import DataConfig  # noqa: E402
from daemon.train.batching import (  # noqa: E402
    ATTENTION_PAIR_TOKENS, PIECE_OVERHEAD_TOKENS, batches, collate, grouped_batches, micro_batches, pack_rows,
    rows_at_least, width_pieces)
from daemon.train.data import IGNORE, Example, train_examples  # noqa: E402
from daemon.train.loop import Job, train_file  # noqa: E402
from daemon.train.model import load_for_training, lora_max_abs_diff, lora_state  # noqa: E402
from daemon.train.step import fast_paths, loss_sum  # noqa: E402
from daemon.validate import DataFormat  # noqa: E402
from tests.test_loop import Crash, make_cfg, one_thread, sha, small_file  # noqa: E402, F401 - one_thread: autouse

REL_TOL = 1e-5


def examples_of(lengths: list[int], seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for line, n in enumerate(lengths, 1):
        ids = [rng.randrange(5, 900) for _ in range(n)]
        out.append(Example(line, ids, [IGNORE] * (n // 3) + ids[n // 3:]))
    return out


def per_example_losses_packed(model, batch: list[Example], pad_id: int) -> list[float]:
    """Each example's summed loss, read out of one forward over the packed rows."""
    t = collate(batch, pad_id, pack=True)
    logits = model(input_ids=t["input_ids"], position_ids=t["position_ids"]).logits
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), t["labels"][:, 1:], ignore_index=IGNORE,
                                reduction="none")
    out = [0.0] * len(batch)
    for r, members in enumerate(pack_rows([len(ex.input_ids) for ex in batch], max(len(ex.input_ids) for ex in batch))):
        at = 0
        for i in members:
            n = len(batch[i].input_ids)
            out[i] = float(per_token[r, at:at + n - 1].sum())  # its positions predict its own next tokens only
            at += n
    return out


def alone(model, ex: Example) -> float:
    ids = torch.tensor([ex.input_ids])
    logits = model(input_ids=ids).logits
    return float(F.cross_entropy(logits[0, :-1].float(), torch.tensor(ex.labels[1:]), ignore_index=IGNORE, reduction="sum"))


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_packed_rows_give_each_example_its_own_loss(models_dir: Path, tmp_path: Path, quantization: str) -> None:
    cfg = make_cfg(models_dir, tmp_path, quantization)
    lm = load_for_training(cfg, seed=5)
    with torch.no_grad():
        for p in lm.model.parameters():  # a LoRA that does something, so its path is in the comparison
            if p.requires_grad:
                p.normal_(0, 0.05)
    lm.model.eval()
    tok = lm.tokenizer
    real = list(train_examples(small_file(tmp_path, "chat.jsonl", 16), DataFormat.CHAT, tok, cfg.data, 3, 0))[:8]
    # the `text` format has a label on an example's first token: packed, that one must not become a target
    batch = real + examples_of([3, 17, 2, 40], seed=1)
    rows = pack_rows([len(ex.input_ids) for ex in batch], max(len(ex.input_ids) for ex in batch))
    assert len(rows) < len(batch)  # the test is only worth something if rows really hold several examples
    with torch.no_grad():
        packed = per_example_losses_packed(lm.model, batch, tok.pad_token_id)
        single = [alone(lm.model, ex) for ex in batch]
        total_fast = float(loss_sum(lm.model, collate(batch, tok.pad_token_id, pack=True), label_only=True)[0])
    worst = max(abs(a - b) / abs(b) for a, b in zip(packed, single))
    assert worst <= REL_TOL, (worst, packed, single)
    assert math.isclose(total_fast, sum(single), rel_tol=REL_TOL)  # and the label-only loss of the whole packed batch


def test_packing_wastes_little_and_is_never_wider_than_padding() -> None:
    batch = examples_of([100, 30, 40, 20, 90, 10, 60, 5])
    padded, packed = collate(batch, 0, pack=False), collate(batch, 0, pack=True)
    assert packed["input_ids"].shape[1] == padded["input_ids"].shape[1] == 100
    assert packed["input_ids"].numel() == 400 < padded["input_ids"].numel() == 800  # 355 tokens in 4 rows, not 8
    assert "attention_mask" not in packed and set(padded) == {"input_ids", "attention_mask", "labels"}
    for r, members in enumerate(pack_rows([len(e.input_ids) for e in batch], 100)):
        starts = [sum(len(batch[j].input_ids) for j in members[:k]) for k in range(len(members))]
        assert [int(packed["position_ids"][r, s]) for s in starts] == [0] * len(members)
        assert all(int(packed["labels"][r, s]) == IGNORE for s in starts)  # no example's first token is a target


def test_rows_of_one_example_attend_causally_without_a_mask(models_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The padding at a row's end continues the positions: rows of one example each are plain causal rows
    (no block mask, SDPA's causal kernel), rows of several still get the mask, and every example's loss is
    what it is alone."""
    from transformers.masking_utils import find_packed_sequence_indices

    single_rows = examples_of([40, 37, 33, 26], seed=2)  # no two fit in 40: one example per row, padded tails
    t = collate(single_rows, 0, pack=True)
    assert t["input_ids"].shape == (4, 40)
    assert torch.equal(t["position_ids"], torch.arange(40).expand(4, 40))
    assert find_packed_sequence_indices(t["position_ids"]) is None
    shared = collate(examples_of([40, 25, 10, 38]), 0, pack=True)  # 25 + 10 share a row, with a 5-token tail
    assert find_packed_sequence_indices(shared["position_ids"]) is not None
    [two] = [r for r, members in enumerate(pack_rows([40, 25, 10, 38], 40)) if len(members) == 2]
    assert shared["position_ids"][two].tolist() == list(range(25)) + list(range(10)) + list(range(10, 15))

    lm = load_for_training(make_cfg(models_dir, tmp_path), seed=5)
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    lm.model.eval()
    calls: list[tuple[bool, bool]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask") is None, bool(kwargs.get("is_causal"))))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        packed = per_example_losses_packed(lm.model, single_rows, 0)
        assert calls and all(c == (True, True) for c in calls)  # no mask, the causal kernel, in every layer
        calls.clear()
        per_example_losses_packed(lm.model, examples_of([40, 25, 10, 38]), 0)
        assert calls and all(c == (False, False) for c in calls)  # a shared row: the block mask
        single = [alone(lm.model, ex) for ex in single_rows]
    assert max(abs(a - b) / abs(b) for a, b in zip(packed, single)) <= REL_TOL, (packed, single)
    cfg = make_cfg(models_dir, tmp_path / "bf16")  # bf16: through daemon.train.precision's attention too
    bf16 = load_for_training(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compute_dtype="bfloat16")),
                             seed=5)
    calls.clear()
    with torch.no_grad():
        per_example_losses_packed(bf16.model, single_rows, 0)
    assert calls and all(c == (True, True) for c in calls)


def lognormal(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [max(4, min(1000, int(rng.lognormvariate(math.log(200), 0.8)))) for _ in range(n)]


def waste(micro: list[list[Example]], pack: bool) -> float:
    real = sum(len(ex.input_ids) for mb in micro for ex in mb)
    slots = sum(collate(mb, 0, pack)["input_ids"].numel() for mb in micro)
    return 1 - real / slots


def test_grouping_keeps_every_example_once_and_cuts_padding() -> None:
    exs = examples_of(lognormal(2000))
    window = DataConfig().shuffle_buffer
    grouped = list(grouped_batches(exs, 8, window=window, seed=4, epoch=0))
    assert sorted(ex.line for mb in grouped for ex in mb) == list(range(1, 2001))
    assert len(grouped) == math.ceil(2000 / 8) and all(len(mb) == 8 for mb in grouped)
    assert list(grouped_batches(exs, 8, window, 4, 0)) == grouped != list(grouped_batches(exs, 8, window, 4, 1))
    odd = list(grouped_batches(exs[:203], 8, window=50, seed=4, epoch=0))  # windows not a multiple of 8
    assert [len(mb) for mb in odd] == [8] * 25 + [3]
    shuffled = list(batches(exs, 8))
    print(f"padding waste, lognormal lengths, micro-batch 8: shuffled {waste(shuffled, False):.1%}, "
          f"shuffled+packed {waste(shuffled, True):.1%}, grouped {waste(grouped, False):.1%}, "
          f"grouped+packed {waste(grouped, True):.1%}")
    assert waste(shuffled, False) > 0.3 and waste(grouped, True) < 0.03 and waste(shuffled, True) < waste(shuffled, False)


def slots(pieces: list[list[Example]]) -> int:
    return sum(collate(p, 0, pack=True)["input_ids"].numel() for p in pieces)


def test_width_pieces_cut_a_micro_batch_only_where_the_padding_outweighs_a_forward() -> None:
    # Seven short examples beside a long one: packed, the short ones fill a 600-wide row that is two-thirds
    # padding (and attends over 600 x 600); on their own they need rows 35 wide.
    batch = examples_of([30, 32, 28, 35, 31, 29, 33, 600])
    pieces = width_pieces(batch, packed=True)
    assert [[len(ex.input_ids) for ex in p] for p in pieces] == [[28, 29, 30, 31, 32, 33, 35], [600]]
    assert slots([batch]) == 1200 and slots(pieces) == 7 * 35 + 600
    # Similar lengths: the padding saved would not pay for another forward; the micro-batch stays whole.
    even = examples_of([100, 104, 98, 101, 97, 103, 99, 102])
    assert width_pieces(even, packed=True) == [even]
    one = examples_of([300])
    assert width_pieces(one, packed=True) == [one] and width_pieces([], packed=True) == [[]]
    # One padded row per example: the same cut, where rows cost their width each.
    assert [len(p) for p in width_pieces(examples_of([20] * 7 + [300]), packed=False)] == [7, 1]
    # Two examples of exactly half the width share a row; one more token and they cannot.
    assert rows_at_least([50, 50, 100], [0, 50, 100, 200], 0, 3) == 2 == len(pack_rows([50, 50, 100], 100))
    assert rows_at_least([50, 51, 100], [0, 50, 101, 201], 0, 3) == 3 == len(pack_rows([50, 51, 100], 100))


def test_the_row_estimate_never_exceeds_the_packing_and_a_cut_never_costs_more_than_the_whole() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        lengths = sorted(rng.randint(2, 600) for _ in range(rng.randint(1, 12)))
        prefix = [0]
        for n in lengths:
            prefix.append(prefix[-1] + n)
        i, j = sorted(rng.sample(range(len(lengths) + 1), 2))
        assert rows_at_least(lengths, prefix, i, j) <= len(pack_rows(lengths[i:j], lengths[j - 1]))
    def price(piece: list[Example]) -> float:  # the cost model, with the rows first-fit-decreasing really makes
        lengths = [len(ex.input_ids) for ex in piece]
        rows, width = len(pack_rows(lengths, max(lengths))), max(lengths)
        return PIECE_OVERHEAD_TOKENS + rows * width + ATTENTION_PAIR_TOKENS * rows * width * width / 2

    cut = 0
    for seed in range(300):  # ungrouped micro-batches, where the lengths spread most
        batch = examples_of(lognormal(8, seed=seed), seed=seed)
        pieces = width_pieces(batch, packed=True)
        assert pieces == [batch] or sum(price(p) for p in pieces) < price(batch)
        cut += pieces != [batch]
    assert cut > 100  # the check is worth something only if many were cut


def test_width_pieces_keep_every_example_once_and_cut_the_same_way_in_any_order() -> None:
    exs = examples_of(lognormal(96, seed=3))
    grouped = list(grouped_batches(exs, 8, window=1024, seed=1, epoch=0))
    cut = [width_pieces(mb, packed=True) for mb in grouped]
    for mb, pieces in zip(grouped, cut):
        assert sorted(ex.line for p in pieces for ex in p) == sorted(ex.line for ex in mb)
        shuffled = mb[:]
        random.Random(mb[0].line).shuffle(shuffled)
        assert width_pieces(shuffled, packed=True) == pieces or pieces == [mb]  # a pure function of the lengths
    flat = [p for pieces in cut for p in pieces]
    before, after = waste(grouped, True), waste(flat, True)
    print(f"padding waste, 96 lognormal examples, micro-batch 8: grouped+packed {before:.1%}, "
          f"in width pieces {after:.1%} ({len(flat)} forwards for {len(grouped)} micro-batches)")
    assert after < before / 2 and len(flat) < 2 * len(grouped)


def test_a_step_in_width_pieces_is_the_step_of_the_whole_micro_batch(models_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Each piece's summed loss is divided by the whole group's targets: the loss, the gradient and the
    updated adapter are those of the micro-batch in one forward."""
    from daemon.train import step
    from daemon.train.loop import build_optimizer, make_scaler

    cfg = make_cfg(models_dir, tmp_path)
    group = [examples_of([6, 60, 7, 5, 58, 8]), examples_of([9, 50, 4, 12], seed=2)]
    runs = {}
    for name, cut in (("whole", lambda mb, packed: [mb]),
                      ("pieces", lambda mb, packed: width_pieces(mb, packed, overhead=0.0))):  # cut wherever it saves
        monkeypatch.setattr(step, "width_pieces", cut)
        lm = load_for_training(cfg, seed=3)
        fast = fast_paths(lm)
        opt, sched = build_optimizer(lm.model, cfg.training, 10)
        stats = step.optimizer_step(lm, group, fast, True, opt, sched, make_scaler(lm), 1.0)
        runs[name] = stats, lora_state(lm.model)
    (whole, w_state), (cut_stats, c_state) = runs["whole"], runs["pieces"]
    assert cut_stats.slots < whole.slots  # the pieces really ran, and computed less padding
    assert math.isclose(cut_stats.loss, whole.loss, rel_tol=REL_TOL)
    assert math.isclose(cut_stats.grad_norm, whole.grad_norm, rel_tol=1e-4)
    assert lora_max_abs_diff(c_state, w_state) <= 1e-6


def test_fast_paths_hold_on_the_embedded_model_and_fail_safe_where_they_would_change_the_loss(
        models_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config

    cfg = make_cfg(models_dir, tmp_path)
    lm = load_for_training(cfg, seed=1)
    fast = fast_paths(lm)
    assert (fast.pack, fast.label_only) == (True, True)
    # Gemma 2 caps its logits after the LM head: computing only the head is not its loss, so it is not used.
    embedded = lm.base_path
    tok = AutoTokenizer.from_pretrained(embedded)
    gemma = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=5.0,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    folder = tmp_path / "gemma2"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(gemma).save_pretrained(folder)
    tok.save_pretrained(folder)
    capped = load_for_training(dataclasses.replace(cfg, base_model=str(folder)), seed=1)
    assert fast_paths(capped).label_only is False


def test_a_resumed_file_keeps_the_order_of_its_checkpoint(models_dir: Path, tmp_path: Path) -> None:
    """A checkpoint made with shuffled batches resumes shuffled even after data.group_by_length is turned on."""
    shuffled = make_cfg(models_dir, tmp_path, checkpoint_every_steps=3)
    shuffled = dataclasses.replace(shuffled, data=dataclasses.replace(shuffled.data, group_by_length=False))
    grouped = dataclasses.replace(shuffled, data=dataclasses.replace(shuffled.data, group_by_length=True))
    path = small_file(tmp_path, "chat.jsonl", 40)
    job = Job.for_file("o", path, "chat", sha(path))

    def run(cfg, folder: str, control=lambda: "continue"):  # noqa: ANN001, ANN202
        lm = load_for_training(cfg, seed=cfg.training.seed)
        events: list[dict] = []
        try:
            train_file(lm, cfg, job, global_step=0, ckpt_folder=tmp_path / folder, report=lambda m: events.append(m.to_wire()), control=control)
        except Crash:
            pass
        return lm, {e["step"]: e["loss"] for e in events if e["type"] == "step"}

    ref_lm, ref = run(shuffled, "ref")
    _, other = run(grouped, "other")
    assert other != ref  # the two orders really differ
    calls = iter(range(1000))

    def crash_after_7() -> str:
        if next(calls) == 7:
            raise Crash()
        return "continue"

    run(shuffled, "crash", crash_after_7)
    lm, resumed = run(grouped, "crash")  # the config now says grouped; the checkpoint says shuffled
    assert min(resumed) == 7 and all(abs(resumed[s] - ref[s]) <= 1e-5 for s in resumed)
    assert lora_max_abs_diff(lora_state(lm.model), lora_state(ref_lm.model)) <= 1e-5


def test_micro_batches_follow_the_order_asked_for() -> None:
    exs = examples_of(lognormal(40))
    assert list(micro_batches(exs, 8, "shuffled", 16, 1, 0)) == list(batches(exs, 8))
    assert list(micro_batches(exs, 8, "grouped", 16, 1, 0)) == list(grouped_batches(exs, 8, 16, 1, 0))
    assert DataConfig().group_by_length and DataConfig().packing  # the defaults


def test_choices_that_need_cuda_are_refused_with_the_reason_on_the_cpu(models_dir: Path, tmp_path: Path) -> None:
    from daemon.config import ModelConfig, TrainingConfig
    from daemon.train.loop import build_optimizer
    from daemon.train.model import ModelError, choose_attention

    assert choose_attention(ModelConfig(), "cpu") is None  # the architecture's own default (SDPA where it has it)
    with pytest.raises(ModelError, match="needs a CUDA GPU"):
        choose_attention(ModelConfig(attention="flash_attention_2"), "cpu")
    lm = load_for_training(make_cfg(models_dir, tmp_path), seed=1)
    with pytest.raises(ModelError, match="CUDA only"):
        build_optimizer(lm.model, TrainingConfig(optimizer="paged_adamw_8bit"), 10, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["adamw", "paged_adamw_8bit"])
def test_cuda_packed_label_only_training_in_bf16_and_8bit_adamw(models_dir: Path, tmp_path: Path, optimizer: str) -> None:
    """The CUDA path: nf4 base, bf16 (or fp16) compute, packed rows and label-only logits checked on the GPU."""
    cfg = make_cfg(models_dir, tmp_path, "nf4", epochs_per_file=3)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device="cuda"),
                              training=dataclasses.replace(cfg.training, optimizer=optimizer))
    lm = load_for_training(cfg, seed=1)
    fast = fast_paths(lm)
    assert fast.pack and fast.label_only
    path = small_file(tmp_path)
    events: list[dict] = []
    out = train_file(lm, cfg, Job.for_file("g", path, "alpaca", sha(path)), global_step=0, ckpt_folder=tmp_path / "ck",
                     report=lambda m: events.append(m.to_wire()), control=lambda: "continue")
    losses = [e["loss"] for e in events if e["type"] == "step"]
    assert out.status == "done" and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses


def test_compile_takes_the_decoder_block_by_block(models_dir: Path, tmp_path: Path) -> None:
    """training.compile wraps each block (one graph, reused by all), not the decoder; compiling happens at the
    first forward (the slow test below trains through it)."""
    from torch import nn

    from daemon.train.model import compile_blocks

    decoder = load_for_training(make_cfg(models_dir, tmp_path), seed=1).model.get_base_model().get_decoder()
    assert compile_blocks(decoder) == len(decoder.layers) >= 2
    assert torch._dynamo.config.recompile_limit >= 64  # the variants of a block's graph stay compiled
    assert all(layer._compiled_call_impl is not None for layer in decoder.layers)
    assert getattr(decoder, "_compiled_call_impl", None) is None
    flat = nn.Sequential(nn.Linear(2, 2), nn.ReLU())  # no list of blocks: the module itself
    assert compile_blocks(flat) == 1 and flat._compiled_call_impl is not None


@pytest.mark.slow
def test_a_compiled_decoder_trains_to_the_same_losses(models_dir: Path, tmp_path: Path) -> None:
    """training.compile: the same steps, the same losses within float tolerance (compiling takes minutes on a CPU)."""
    cfg = make_cfg(models_dir, tmp_path, epochs_per_file=1)
    compiled = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, compile=True))
    path = small_file(tmp_path, n=24)
    runs = []
    for c in (cfg, compiled):
        lm = load_for_training(c, seed=c.training.seed)
        events: list[dict] = []
        train_file(lm, c, Job.for_file("c", path, "alpaca", sha(path)), global_step=0, ckpt_folder=tmp_path / f"ck{len(runs)}",
                   report=lambda m: events.append(m.to_wire()), control=lambda: "continue")
        runs.append([e["loss"] for e in events if e["type"] == "step"])
    assert len(runs[0]) == len(runs[1]) and max(abs(a - b) for a, b in zip(*runs)) < 1e-4


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_the_packing_check_would_catch_attention_across_examples(models_dir: Path, tmp_path: Path,
                                                                compute_dtype: str) -> None:
    """fast_paths' probe really packs two examples in a row, and a layout that lets one attend to the
    other (position ids that do not restart, as a kernel that ignores them would see it) fails it, at the
    tolerance of the compute dtype."""
    from daemon.train.step import PROBE_LENGTHS, _agree, _losses, _probe_examples

    cfg = make_cfg(models_dir, tmp_path)
    lm = load_for_training(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compute_dtype=compute_dtype)), seed=1)
    dtype = getattr(torch, compute_dtype)
    assert lm.dtype == dtype and fast_paths(lm).pack
    lm.model.eval()
    examples = _probe_examples(len(lm.tokenizer), lm.tokenizer.pad_token_id)
    assert any(len(r) > 1 for r in pack_rows(list(PROBE_LENGTHS), max(PROBE_LENGTHS)))
    alone = sum(_losses(lm, [ex], False, False) for ex in examples)
    packed = collate(examples, lm.tokenizer.pad_token_id, pack=True)
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
    with torch.no_grad():
        leaked = float(loss_sum(lm.model, leaky)[0])
    assert _agree(_losses(lm, examples, True, False), alone, dtype)
    assert not _agree(leaked, alone, dtype), (leaked, alone)
