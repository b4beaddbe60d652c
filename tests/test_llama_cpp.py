"""Files made for llama.cpp's tools and their figures read back (baichuan2.llama_cpp, baichuan2.synthetic_vocab,
example/make_random_gguf.py). llama.cpp itself is not built here (scripts/build_llama_cpp.sh, outside `make test`):
these check what we write and what we parse."""
import string
import subprocess

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from baichuan2.llama_cpp import LlamaCppError, float_gguf, parse_perplexity, tool
from baichuan2.synthetic_vocab import SPACE, SPECIAL_IDS, pieces, scores
from helpers import run_module


def test_synthetic_vocab_gives_every_id_a_distinct_piece():
    vocab = pieces(125696)
    assert len(vocab) == 125696 and len(set(vocab)) == 125696
    assert vocab[:3] == ["<unk>", "<s>", "</s>"] and SPECIAL_IDS == {"unk": 0, "bos": 1, "eos": 2}
    assert all(piece for piece in vocab)
    # every printable ASCII character is a piece (space as SentencePiece's mark), so ASCII text never needs <unk>
    assert set(string.printable.strip()) | {SPACE, "\n"} <= set(vocab)
    assert {SPACE + "the", "the", SPACE + "zz", "zz"} <= set(vocab)
    assert pieces(1000) == vocab[:1000]  # a prefix: smaller vocabularies are the same ids
    assert scores(5) == [0.0, 0.0, 0.0, -3.0, -4.0]
    with pytest.raises(ValueError, match="at least 3"):
        pieces(2)


def test_make_random_gguf_writes_a_llama_file_with_the_synthetic_vocabulary(tmp_path):
    out = tmp_path / "tiny.gguf"
    done = subprocess.run(run_module("example/make_random_gguf.py", out, "--layers", 2, "--hidden", 64, "--heads", 4,
                                     "--ffn", 96, "--vocab", 500, "--context", 128),
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    reader = gguf.GGUFReader(str(out))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama" and field("llama.block_count") == 2
    assert (field("llama.embedding_length"), field("llama.attention.head_count"), field("llama.feed_forward_length"),
            field("llama.rope.freq_base"), field("llama.context_length")) == (64, 4, 96, 10000.0, 128)
    assert field("tokenizer.ggml.model") == "llama" and field("tokenizer.ggml.tokens") == pieces(500)
    assert field("tokenizer.ggml.token_type")[:4] == [3, 3, 3, 1] and field("tokenizer.ggml.add_bos_token") is False
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 2 * 9 + 1
    assert list(reversed(tensors["token_embd.weight"].shape.tolist())) == [500, 64]
    assert list(reversed(tensors["blk.1.ffn_down.weight"].shape.tolist())) == [64, 96]
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    w = np.asarray(tensors["blk.0.ffn_up.weight"].data, np.float32)
    assert abs(w.std() - 0.02) < 0.002 and np.all(tensors["output_norm.weight"].data == 1)
    assert not (tmp_path / "tiny.gguf.partial").exists()


def test_float_gguf_holds_the_dequantised_values_and_the_metadata(tmp_path):
    rng = np.random.default_rng(0)
    src, dst = str(tmp_path / "q.gguf"), str(tmp_path / "f32.gguf")
    weight = rng.standard_normal((8, 64)).astype(np.float32)
    writer = gguf.GGUFWriter(src, "llama")
    writer.add_block_count(1)
    writer.add_token_list(["<unk>", "a", "b"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tensor("w.weight", quantize(weight, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("n.weight", np.arange(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    float_gguf(src, dst)
    source, result = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    assert result.fields["tokenizer.ggml.tokens"].contents() == ["<unk>", "a", "b"]
    assert result.fields["llama.block_count"].contents() == 1
    assert result.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    got = {t.name: t for t in result.tensors}
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in got.values())
    q = next(t for t in source.tensors if t.name == "w.weight")
    expected = dequantize(q.data, q.tensor_type)
    assert np.array_equal(np.asarray(got["w.weight"].data).reshape(8, 64), expected)
    assert not np.array_equal(expected, weight)  # the quantised values, not the original floats
    assert np.array_equal(got["n.weight"].data, np.arange(64, dtype=np.float32))


def test_llama_perplexity_output_is_read_or_refused(tmp_path):
    log = ("perplexity: tokenizing the input ..\nperplexity: calculating perplexity over 4 chunks, n_ctx=512, "
           "batch_size=512, n_seq=1\n[1]12.5,[2]13.0,[3]13.9,[4]14.1,\nFinal estimate: PPL = 14.1234 +/- 0.56789\n")
    assert parse_perplexity(log) == (14.1234, 0.56789, 4, 512)
    with pytest.raises(LlamaCppError, match="no final estimate.*out of memory"):
        parse_perplexity("perplexity: calculating perplexity over 4 chunks, n_ctx=512\nout of memory\n")
    with pytest.raises(LlamaCppError, match="build_llama_cpp.sh"):
        tool(str(tmp_path), "llama-perplexity")


def test_quant_quality_refuses_llama_cpp_rows_it_cannot_make(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("some text\n", encoding="utf-8")
    done = subprocess.run(run_module("example/quant_quality.py", tmp_path, "--text", text, "--llama_cpp", tmp_path),
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "--llama_cpp needs MODEL as a .gguf file" in done.stderr, done.stderr
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    done = subprocess.run(run_module("example/quant_quality.py", model, "--text", text, "--llama_cpp", tmp_path),
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "llama-quantize is not an executable" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_perplexity_can_score_the_second_half_of_each_chunk_as_llama_perplexity_does():
    from baichuan2.quality import perplexity  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(1)
    chunk, vocab = 8, 5
    ids = rng.integers(0, vocab, 2 * chunk)
    table = rng.standard_normal((2 * chunk, vocab))  # logits per position of the text

    class Model:  # stands in for a loaded model: logits for the chunk being scored
        calls = 0

        def __call__(self, tokens, attention_mask):
            start, Model.calls = Model.calls * chunk, Model.calls + 1
            assert np.array_equal(tokens.asnumpy()[0], ids[start:start + chunk]) and attention_mask.shape == (1, chunk)
            return type("Out", (), {"asnumpy": lambda _: table[None, start:start + chunk].astype(np.float32)})()

    def expected(first):
        losses = [np.log(np.exp(table[c * chunk + j]).sum()) - table[c * chunk + j, ids[c * chunk + j + 1]]
                  for c in range(2) for j in range(first, chunk - 1)]
        return np.exp(np.mean(losses))

    assert np.isclose(perplexity(Model(), ids, chunk), expected(0), rtol=1e-5)
    Model.calls = 0
    assert np.isclose(perplexity(Model(), ids, chunk, first=chunk // 2), expected(chunk // 2), rtol=1e-5)
    assert not np.isclose(expected(0), expected(chunk // 2), rtol=1e-3)
