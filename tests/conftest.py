"""Shared fixtures: tiny random Llama / Qwen2 models written as real Hugging Face directories.

Test tiers: a plain ``pytest`` run is the fast tier; tests marked ``full`` (and every ``smollm2``
test) are deselected unless ``--full`` is given (``build_scripts/test.sh``, i.e. CI, passes it) or
an explicit ``-m`` expression chooses (``pytest -m full`` runs only the full tier's tests).
"""

from __future__ import annotations

import itertools
import os
import string
from pathlib import Path

import pytest
import torch

from redrafter_trt.backends.torch_backend import TorchBackend
from redrafter_trt.formats.hf import load_hf_base
from redrafter_trt.models.base import BaseModel
from redrafter_trt.models.drafter import DrafterConfig, init_drafter
from redrafter_trt.runtime import Generator

ARCHS = ("llama", "qwen2")
VOCAB = 97
FULL = pytest.mark.full


def tiered(fast, *axes) -> list:
    """``parametrize`` values for the product of ``axes`` (an axis value that is a tuple spreads
    over several arguments): the cases in ``fast`` stay in the fast tier, every other case is
    marked ``full``. Ids join the values with ``-``.

    >>> [(p.values, p.marks != ()) for p in tiered({(1, 2, "llama")}, [(1, 2), (3, 4)], ["llama"])]
    [((1, 2, 'llama'), False), ((3, 4, 'llama'), True)]
    """
    cases = [
        tuple(v for x in combo for v in (x if isinstance(x, tuple) else (x,)))
        for combo in itertools.product(*axes)
    ]
    unknown = set(fast) - set(cases)
    if unknown:
        raise ValueError(f"tiered: fast cases {sorted(unknown)} are not among the cases")
    return [
        pytest.param(*c, marks=() if c in fast else FULL, id="-".join(map(str, c))) for c in cases
    ]


def tiny_hf_config(arch: str, vocab: int = VOCAB, tie: bool = False, **overrides):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    kw = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        initializer_range=0.2,
        eos_token_id=None,
        bos_token_id=None,
    )
    kw.update(overrides)
    return cls(**kw)


def write_tiny_hf(path: Path, arch: str, seed: int = 0, **cfg_overrides) -> Path:
    """Save a tiny random transformers model (the reference implementation) to ``path``."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[arch]
    torch.manual_seed(seed)
    model = cls(tiny_hf_config(arch, **cfg_overrides)).eval()
    if arch == "qwen2":  # transformers inits biases to zero; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.2)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_hf")
    return {arch: write_tiny_hf(root / arch, arch, seed=i) for i, arch in enumerate(ARCHS)}


def tiny_generator(
    model_dir: Path,
    num_beams: int,
    draft_len: int,
    dtype=torch.float64,
    proposer=None,
    max_batch_size: int = 16,
    drafter_seed: int = 0,
    warp_k: int = 50,
) -> Generator:
    cfg, sd = load_hf_base(model_dir)
    base = BaseModel(cfg)
    base.load_state_dict(sd)
    drafter = init_drafter(
        DrafterConfig(cfg.vocab_size, cfg.hidden_size, 2 * cfg.hidden_size, 1, True),
        seed=drafter_seed,
        std=0.5,
    )
    backend = TorchBackend(
        base.to(dtype),
        drafter.to(dtype),
        num_beams,
        draft_len,
        warp_k=warp_k,
        max_batch_size=max_batch_size,
        max_input_len=256,
        max_seq_len=512,
        proposer=proposer,
    )
    return Generator(backend)


@pytest.fixture(scope="session")
def native_library():
    """The C++ CPU references' library: built on demand locally, required in CI."""
    import subprocess

    from redrafter_trt import native

    if not native.available():
        if os.environ.get("CI"):
            pytest.fail(
                f"native library missing: {native.library_path()} "
                "(build_scripts/build_cpp.sh builds it)"
            )
        subprocess.run(
            ["bash", str(native.REPO_ROOT / "build_scripts" / "build_cpp.sh"), "--cpu-only"],
            check=True,
        )
    native.load_library()


def pytest_addoption(parser):
    parser.addoption(
        "--full",
        action="store_true",
        help="run the full tier too: the tests marked full or smollm2 (SmolLM2, server, "
        "subprocess CLIs, trainer runs, wide parametrizations); CI passes it",
    )


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.hookimpl(tryfirst=True)  # before -m filtering, so `-m full` sees the added markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("smollm2") and not item.get_closest_marker("full"):
            item.add_marker(FULL)
    if config.getoption("--full") or config.getoption("markexpr"):
        return
    fast = [i for i in items if not i.get_closest_marker("full")]
    if len(fast) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("full")])
        items[:] = fast


def pytest_report_header(config):
    if config.getoption("--full") or config.getoption("markexpr"):
        return "tier: as --full or -m selects"
    return "tier: fast (tests marked full or smollm2 deselected; --full runs them)"


# --------------------------------------------------------------------------- tiny ChatML base
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --------------------------------------------------------------------------- fixtures
def char_tokenizer(chat_template: str | None):
    """A 97-token character-level fast tokenizer (fits the tiny models' vocabulary)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    chars = list(
        " \n" + string.ascii_letters + string.digits + ".,:;!?'\"()-_/*+=<>[]{}@#$%&|~^`\\"
    )
    chars = chars[: 97 - len(specials)]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny Llama directory with a character tokenizer and a ChatML template.

    Its lm_head is scaled up so that its next-token distributions are peaked like a trained
    LM's (a random tiny model's are nearly uniform, which no distillation can make useful)."""
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("train") / "llama"
    torch.manual_seed(3)
    model = LlamaForCausalLM(tiny_hf_config("llama", initializer_range=0.02)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    model.save_pretrained(str(d))
    char_tokenizer(CHATML).save_pretrained(str(d))
    return d
