"""Build the embedded default base model locally: no hub, no download.

    python -m daemon.train.tinymodel /tmp/tiny        # writes a Hugging Face model folder

A real Qwen3-architecture causal LM (about 0.2M parameters) with a real
byte-level BPE tokenizer trained here on the bundled example data, and a
ChatML chat template. The weights are briefly pretrained (a few seconds on a
CPU) on the plain-text renderings of the example facts: a randomly initialised
base gives LoRA almost nothing to steer, so its loss would barely move, where
a base that knows the language shows what fine-tuning does (learning the chat
format and answers) within a minute. It is a stand-in so that a fresh machine trains for
real within a minute; point `base_model` at your own local folder for work.

The build is deterministic (fixed seed, fixed corpus), cached under
`paths.models`, and published with one rename, so a crash mid-build leaves
nothing half-written behind. Any number of processes may ask for it at once
(the ranks of a new instance): one builds under a file lock, the others wait
for it and load what it published (see `ensure_embedded`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from daemon import atomic

log = logging.getLogger(__name__)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"  # the repository's bundled example data

# Bump when anything below changes what is built: the cache key includes it.
BUILD_VERSION = 2
NAME = f"tiny-qwen3-v{BUILD_VERSION}"
MARKER = ".traind-complete.json"  # written last into a build, published with it: the folder is whole
# What a build writes that loading needs; a folder from before the marker with all of them is whole too.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 1024
SEED = 0
PRETRAIN_STEPS = 80  # about 0.8 loss on the plain texts; more only memorises the tiny corpus
PRETRAIN_BATCH = 16
PRETRAIN_LR = 5e-3

# ChatML, as Qwen models use it. Prefix-consistent: rendering messages[:i] with
# add_generation_prompt=True is a prefix of rendering messages[:i+1], which is
# what the assistant-only loss mask relies on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

EXTRA_CORPUS = """\
The quick brown fox jumps over the lazy dog. A person leaves a machine training for weeks
and checks a browser tab now and then. Files arrive, are checked, queued and trained.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 50 100 1000.
Question and answer, instruction and response, prompt and completion, system, user, assistant.
"""


def corpus_lines() -> list[str]:
    """Text the tokenizer is trained on: the bundled examples plus a little English."""
    lines = EXTRA_CORPUS.splitlines()
    for path in sorted(EXAMPLES.glob("*.jsonl")):
        lines.extend(path.read_text(encoding="utf-8").splitlines())
    return lines


def build_tokenizer():
    """A byte-level BPE tokenizer with ChatML special tokens, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=1024
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def pretraining_texts() -> list[str]:
    """The example facts as plain text, without any chat formatting."""
    import json

    texts = []
    for line in (EXAMPLES / "text.jsonl").read_text(encoding="utf-8").splitlines():
        texts.append(json.loads(line)["text"])
    for line in (EXAMPLES / "prompt_completion.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        texts.append(rec["prompt"] + rec["completion"])
    return texts


def pretrain(model, tokenizer) -> float:
    """A short full-parameter warm-up on plain text; returns the last loss."""
    import torch

    ids = [tokenizer(t).input_ids[:63] + [tokenizer.eos_token_id] for t in pretraining_texts()]
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(PRETRAIN_STEPS):
        start = (step * PRETRAIN_BATCH) % max(len(ids) - PRETRAIN_BATCH, 1)
        batch = ids[start:start + PRETRAIN_BATCH]
        width = max(map(len, batch))
        input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in batch])
        labels = input_ids.masked_fill(input_ids == tokenizer.pad_token_id, -100)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    log.info("embedded model pretrained %d steps, loss %.3f", PRETRAIN_STEPS, loss.item())
    return loss.item()


def build(dest: str | Path) -> Path:
    """Write the tiny model folder to `dest` (which must not exist yet)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    dest = Path(dest)
    tokenizer = build_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config)
    pretrain(model, tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_marker(tmp)
        atomic.publish_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def ensure_embedded(models_dir: str | Path) -> Path:
    """The cached embedded model folder, built on first use by one process however many ask at once.

    A complete folder (its marker) is returned at once. Otherwise the caller takes an exclusive lock
    (`<models>/.<NAME>.lock`, fcntl.flock: released by the kernel if its holder dies) and looks again:
    whoever got the lock first has built it meanwhile, and the others load what it published. Without
    the lock two ranks of a new instance both built it, and the second's publish moved the first's
    folder away while the first was loading it (#26).
    """
    models_dir = Path(models_dir)
    dest = models_dir / NAME
    if is_complete(dest):
        return dest
    models_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(models_dir / f".{NAME}.lock"):
        if is_complete(dest):
            return dest
        _sweep_leftovers(models_dir)
        if dest.is_dir() and all((dest / f).is_file() and (dest / f).stat().st_size for f in REQUIRED_FILES):
            _write_marker(dest)  # built before there was a marker (and published whole, by one rename)
            return dest
        log.info("building embedded base model %s in %s", NAME, dest)
        return build(dest)  # replaces an incomplete folder (publish_dir moves it aside first)


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _write_marker(folder: Path) -> None:
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
             if p.is_file() and p.name != MARKER}
    atomic.write_json(folder / MARKER, {"name": NAME, "build_version": BUILD_VERSION, "files": files})


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    # The lock file stays: removing it would let a late comer lock a new file while another holds the old one.
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish building %s", NAME)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sweep_leftovers(models_dir: Path) -> None:
    """Temp folders of a builder that died (`.<NAME>.<random>`) and folders a publish moved aside: only the
    lock holder may call this, since no other builder can be writing one then."""
    for p in models_dir.glob(f".{NAME}.*"):
        if p.is_dir():
            log.info("removing %s, left by an interrupted build", p.name)
            shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(build(sys.argv[1]))
