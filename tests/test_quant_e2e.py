"""QLoRA for real: the daemon trains on a 4-bit (nf4, fp4) base, and its adapter loads
onto the 4-bit and the full-precision base alike.

Both daemons run at once (one torch thread each, FAST in conftest), so the file
costs about one daemon's time on 2 cores.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from daemon.config import load_config
from bench.harness import lines_of, write_instance
from bench.harness import Daemon

pytestmark = pytest.mark.e2e
torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

DATA = lines_of("chat.jsonl", 80)
QUANTS = ("nf4", "fp4")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, models_dir):
    """One daemon per 4-bit type, all training the same file at once; yields {quant: Daemon}."""
    daemons = {q: Daemon(write_instance(tmp_path_factory.mktemp(q), models_dir, model={"quantization": q},
                                        training={"epochs_per_file": 2}))
               for q in QUANTS}
    try:
        for d in daemons.values():
            d.start().drop("chat.jsonl", DATA)
        for d in daemons.values():
            d.wait_counts(done=1, timeout=240)
            d.wait_for(lambda s: s["status"] == "idle" and s["adapter_version"] == 1, what="idle after the file")
        yield daemons
    finally:
        for d in daemons.values():
            d.close()


@pytest.mark.parametrize("quant", QUANTS)
def test_daemon_trains_a_file_on_a_4bit_base(trained, quant):
    d = trained[quant]
    st = d.status()
    assert st["quantization"] == quant and st["device"] == "cpu" and st["last_error"] is None
    assert st["queue"]["done"] == 1 and st["queue"]["failed"] == 0
    losses = [loss for _, loss in d.losses()]
    assert len(losses) == st["global_step"] >= 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"{quant}: {len(losses)} steps, mean loss of first 5 {first:.3f}, last 5 {last:.3f}")
    assert last < first * 0.8, (first, last)


def test_nf4_adapter_loads_onto_4bit_and_full_base(trained):
    from safetensors.torch import load_file

    from daemon.adapters import read_current
    from daemon.train.model import load_adapter, load_for_training, lora_max_abs_diff, lora_state

    d = trained["nf4"]
    current = read_current(d.cfg.path("adapters"))
    saved = load_file(str(current.path / "adapter_model.safetensors"))
    assert current.manifest.base_model == d.cfg.base_model
    nf4 = load_config(d.config_path)
    full = dataclasses.replace(nf4, model=dataclasses.replace(nf4.model, quantization="none"))
    for cfg in (nf4, full):
        lm = load_for_training(cfg, seed=cfg.training.seed + 1)  # a different init, so the load must overwrite it
        assert lora_max_abs_diff(lora_state(lm.model), saved) > 0
        load_adapter(lm.model, current.path)
        assert lora_max_abs_diff(lora_state(lm.model), saved) == 0.0, cfg.model.quantization
        assert json.loads((current.path / "adapter_config.json").read_text())["r"] == cfg.lora.r
