"""daemon.train.lastblock: the last decoder block only at the rows the loss reads.

It must give the loss and every gradient of logits only where labels are (fp32
rounding), padded or packed, with labels in one run or several per example; leave the
block its own forward without `label_rows`; and be refused by the step's probe where it
would change the loss.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from daemon.train import lastblock  # noqa: E402
from daemon.train.batching import collate  # noqa: E402
from daemon.train.data import IGNORE, Example, train_examples  # noqa: E402
from daemon.train.model import load_for_training  # noqa: E402
from daemon.train.step import fast_paths, loss_sum  # noqa: E402
from daemon.validate import DataFormat  # noqa: E402
from tests.test_batching import examples_of  # noqa: E402
from tests.test_loop import make_cfg, one_thread, small_file  # noqa: E402, F401 - one_thread: autouse


def test_label_rows_are_each_rows_kept_positions_in_order_then_filler() -> None:
    keep = torch.tensor([[0, 1, 1, 0, 1, 0],
                         [0, 0, 0, 0, 0, 0],
                         [1, 0, 0, 0, 0, 1]], dtype=torch.bool)
    rows, valid = lastblock.label_rows(keep)
    assert rows.shape == valid.shape == (3, 3)
    assert rows[0].tolist() == [1, 2, 4] and valid[0].tolist() == [True] * 3
    assert valid[1].tolist() == [False] * 3
    assert rows[2, :2].tolist() == [0, 5] and valid[2].tolist() == [True, True, False]
    assert not keep.gather(1, rows)[~valid].any()  # filler points at positions nobody reads
    rows, valid = lastblock.label_rows(torch.zeros(2, 4, dtype=torch.bool))
    assert rows.shape == (2, 1) and not valid.any()  # a batch without a label still runs (its loss is 0)


def with_lora(models_dir: Path, tmp_path: Path, dtype: str = "float32", seed: int = 4):
    cfg = make_cfg(models_dir, tmp_path)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compute_dtype=dtype))
    lm = load_for_training(cfg, seed=seed)
    with torch.no_grad():
        for p in lm.model.parameters():  # a LoRA that does something, so its gradients are in the comparison
            if p.requires_grad:
                p.normal_(0, 0.05)
    assert lastblock.install(lm.model.get_base_model())
    return cfg, lm


def two_turns(n: int, seed: int) -> Example:
    """An example labelled in two separate runs, as a chat with two assistant turns is."""
    ex = examples_of([n], seed)[0]
    labels = [t if n // 4 <= i < n // 2 or i >= 3 * n // 4 else IGNORE for i, t in enumerate(ex.input_ids)]
    return Example(ex.line, ex.input_ids, labels)


def loss_and_grads(lm, batch: dict, last_block: bool) -> tuple[float, list[torch.Tensor]]:
    loss, _ = loss_sum(lm.model, batch, label_only=True, last_block=last_block)
    loss.backward()
    params = [p for p in lm.model.parameters() if p.requires_grad]
    grads = [p.grad.clone() for p in params]
    lm.model.zero_grad(set_to_none=True)
    return float(loss), grads


@pytest.mark.parametrize("layout", ["padded", "packed", "one example per row"])
def test_loss_and_gradients_equal_logits_only_where_labels_are(models_dir: Path, tmp_path: Path, layout: str) -> None:
    cfg, lm = with_lora(models_dir, tmp_path)
    tok = lm.tokenizer
    if layout == "one example per row":  # none fits beside another: no mask at all, SDPA's causal rows
        batch = [two_turns(40, 1), *examples_of([36, 25, 39], seed=2)]
    else:
        chat = list(train_examples(small_file(tmp_path, "chat.jsonl", 12), DataFormat.CHAT, tok, cfg.data, 3, 0))[:6]
        batch = chat + examples_of([3, 40, 2, 17]) + [two_turns(33, 5), two_turns(12, 6)]
    tensors = collate(batch, tok.pad_token_id, pack=layout != "padded")
    if layout != "padded":
        firsts = (tensors["position_ids"] == 0).sum(dim=1)
        assert bool((firsts > 1).any()) == (layout == "packed")  # rows of several examples, or none
        assert int(tensors["input_ids"].shape[1]) == max(len(ex.input_ids) for ex in batch)
    want, want_grads = loss_and_grads(lm, tensors, last_block=False)
    got, grads = loss_and_grads(lm, tensors, last_block=True)
    assert math.isclose(got, want, rel_tol=1e-6), (got, want)
    assert len(grads) == len(want_grads) and all(g.abs().sum() > 0 for g in want_grads)
    scale = max(float(w.abs().max()) for w in want_grads)
    assert max(float((g - w).abs().max()) for g, w in zip(grads, want_grads)) <= 1e-5 * scale


def test_without_label_rows_the_block_is_its_own(models_dir: Path, tmp_path: Path) -> None:
    cfg, lm = with_lora(models_dir, tmp_path)
    block = lm.model.get_base_model().get_decoder().layers[-1]
    t = collate(examples_of([9, 14]), lm.tokenizer.pad_token_id)
    with torch.no_grad():
        out = lm.model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        own = block.forward
        del block.forward  # the class's forward again
        try:
            ref = lm.model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        finally:
            block.forward = own
    assert torch.equal(out, ref)


def test_bf16_is_within_rounding(models_dir: Path, tmp_path: Path) -> None:
    _, lm = with_lora(models_dir, tmp_path, dtype="bfloat16")
    tensors = collate(examples_of([30, 12, 25, 7]), lm.tokenizer.pad_token_id, pack=True)
    with torch.no_grad():
        want = float(loss_sum(lm.model, tensors, True, False)[0])
        got = float(loss_sum(lm.model, tensors, True, True)[0])
    assert math.isclose(got, want, rel_tol=5e-3), (got, want)


def test_the_step_uses_it_only_where_its_probe_agrees(models_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg(models_dir, tmp_path)
    lm = load_for_training(cfg, seed=1)
    assert fast_paths(lm).last_block is True
    # An off-by-one in the rows (each row's hidden state taken one position early) changes the loss: refused.
    right = lastblock.label_rows

    def early(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, valid = right(keep)
        return (rows - 1).clamp(min=0), valid

    monkeypatch.setattr(lastblock, "label_rows", early)
    fast = fast_paths(load_for_training(cfg, seed=1))
    assert fast.label_only is True and fast.last_block is False
