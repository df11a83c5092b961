import json
from pathlib import Path

import pytest

from daemon.config import EMBEDDED_MODEL, config_from_dict, explain, load_config, locked_values
from daemon.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_repo_config_is_valid_and_documented():
    cfg = load_config(REPO / "config.json")
    assert cfg.base_model == EMBEDDED_MODEL
    assert cfg.path("inbox") == REPO / "inbox"
    raw = json.loads((REPO / "config.json").read_text())
    documented = {k for k, _, _ in explain()}
    in_file = {"base_model"} | {f"{s}.{k}" for s, sec in raw.items() if isinstance(sec, dict) for k in sec}
    assert in_file == documented  # every key in the file, every key explained


def test_relative_paths_resolve_against_config_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"paths": {"inbox": "in", "logs": "/abs/logs"}}))
    cfg = load_config(tmp_path / "config.json")
    assert cfg.path("inbox") == tmp_path / "in"
    assert cfg.path("logs") == Path("/abs/logs")
    assert cfg.path("queue") == tmp_path / "queue"


def test_every_problem_reported_at_once():
    raw = {"bogus": 1, "data": {"max_length": 2, "nope": 0}, "model": {"quantization": "int3"},
           "training": {"learning_rate": "fast", "micro_batch_size": 0}, "lora": {"target_modules": []}}
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, Path("/tmp"))
    text = str(e.value)
    assert len(e.value.problems) == 7, e.value.problems
    for needle in ("`bogus`", "`data.nope`", "`data.max_length` = 2", "'int3'", "'nf4', 'fp4', 'none'",
                   "`training.learning_rate`", "`training.micro_batch_size` = 0", "`lora.target_modules`"):
        assert needle in text


def test_base_model_folder_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        config_from_dict({"base_model": str(tmp_path / "nothing")}, tmp_path)


def test_config_is_frozen_and_typed(tmp_path):
    cfg = config_from_dict({"intake": {"settle_seconds": 2}}, tmp_path)
    assert isinstance(cfg.intake.settle_seconds, float)
    with pytest.raises(AttributeError):
        cfg.intake.settle_seconds = 0.1  # type: ignore[misc]


def test_locked_values_name_the_adapter_shaping_keys(tmp_path):
    keys = set(locked_values(config_from_dict({}, tmp_path)))
    assert keys == {"base_model", "data.max_length", "model.quantization", "lora.r", "lora.target_modules",
                    "training.micro_batch_size", "training.grad_accum_steps", "training.optimizer"}


def test_invalid_json_names_line(tmp_path):
    (tmp_path / "c.json").write_text('{\n  "data": {,}\n}')
    with pytest.raises(ConfigError, match="line 2"):
        load_config(tmp_path / "c.json")


def test_readme_table_lists_every_key_with_its_default():
    readme = (REPO / "README.md").read_text()
    for key, default, _ in explain():
        assert f"| `{key}` | `{json.dumps(default)}` |" in readme, key


def test_the_shipped_config_has_the_documented_defaults():
    raw = json.loads((REPO / "config.json").read_text())
    defaults = {k: v for k, v, _ in explain()}
    shipped = {"base_model": raw["base_model"]} | {f"{s}.{k}": v for s, sec in raw.items() if isinstance(sec, dict)
                                                   for k, v in sec.items()}
    assert {k: v for k, v in shipped.items() if v != defaults[k]} == {}


def test_the_embedded_model_gets_its_own_learning_rate_and_says_so(tmp_path):
    from daemon.config import EMBEDDED_LEARNING_RATE

    shipped = load_config(REPO / "config.json")  # the default written out, as shipped
    assert shipped.training.learning_rate == EMBEDDED_LEARNING_RATE == 0.002
    assert len(shipped.tuned) == 1 and "training.learning_rate 0.002 for the embedded model" in shipped.tuned[0]
    own = config_from_dict({"training": {"learning_rate": 0.0005}}, tmp_path)  # a value of one's own is kept
    assert own.training.learning_rate == 0.0005 and own.tuned == ()
    folder = tmp_path / "m"
    folder.mkdir()
    for name, text in (("config.json", '{"model_type": "llama"}'), ("model.safetensors", ""), ("tokenizer.json", "{}")):
        (folder / name).write_text(text)
    real = config_from_dict({"base_model": str(folder)}, tmp_path)  # a real base keeps the documented default
    assert real.training.learning_rate == 0.0002 and real.tuned == ()
