#!/usr/bin/env python3
"""Writes the tokenizer fixtures of tests/test_tokenizer.cpp with Hugging Face's
`tokenizers` library (the reference the C++ byte-level BPE must equal):

  tests/fixtures/tokenizers/gpt2_style.json    ByteLevel pre-tokenizer with GPT-2's regex
  tests/fixtures/tokenizers/llama3_style.json  Split(Llama 3's regex) + ByteLevel(use_regex=false), ignore_merges,
                                               a TemplateProcessing post-processor that puts a BOS first
  tests/fixtures/tokenizers/nfc_style.json     an NFC normalizer (as Qwen2's) before the GPT-2-style steps
  tests/fixtures/tokenizers/llama2_style.json  SentencePiece BPE with byte fallback as Llama 2, TinyLlama and
                                               Mistral files have it (transformers 4): normalizer Prepend("▁") +
                                               Replace(" ", "▁"), no pre-tokenizer, unk_token, "<s> $A" template,
                                               decoder Replace + ByteFallback + Fuse + Strip
  tests/fixtures/tokenizers/metaspace_style.json  the same model as transformers 5 converts it: pre-tokenizer
                                               Metaspace(prepend_scheme first, split false), no normalizer
  tests/fixtures/tokenizers/unk_style.json     the same without byte fallback: unknown characters are unk_token
                                               (fused runs), Metaspace(prepend_scheme always, split true) and the
                                               Metaspace decoder
  tests/fixtures/tokenizers/encodings.json     {"texts": [...], "<name>": [[ids...], ...] (encode(text)),
                                               "<name>_plain": ... (add_special_tokens=False),
                                               "<name>_decoded": decode(<name>_plain)} for each

Each is a small BPE (vocabulary 600) trained here on the multilingual text below
plus CPython's own sources, so no download is needed; the SentencePiece ones by
the sentencepiece trainer (byte_fallback), converted to tokenizer.json by
transformers' LlamaTokenizer as a user's checkpoint was. Needs a venv with the
PyPI packages tokenizers, sentencepiece, transformers and protobuf (not needed by
./test.sh; the outputs are committed):
    python3 -m venv /tmp/tk && /tmp/tk/bin/pip install tokenizers sentencepiece transformers protobuf
    /tmp/tk/bin/python scripts/make_tokenizer_fixtures.py
"""
import glob
import json
import os
import sysconfig
import tempfile

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "tokenizers")

MULTILINGUAL = """The quick brown fox jumps over the lazy dog. It's 2026; we're testing 1234567 tokens!
Der Fluß ist schön, die Straße ist lang. Ça coûte 12,50 € — très cher, n'est-ce pas?
Москва — столица России. Ελληνικά γράμματα: αβγδε. 日本語のテキストです。中文文本测试。
مرحبا بالعالم. שלום עולם. हिन्दी पाठ। 한국어 텍스트입니다. Emoji: 🙂🚀👩‍💻 and tabs\tand
newlines\r\n  indented   spaces    end.
"""

TEXTS = [
    "Hello world",
    " Hello  world ",
    "It's a test: don't, we'll, they're, I'VE, you'D.",
    MULTILINGUAL,
    "numbers 1 12 123 1234 12345 3.14159 -42 1e-5",
    "<|endoftext|>after a special token<|endoftext|>",
    "code: def f(x):\n    return x ** 2  # square\n\n\n",
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces",
    "decomposed: e\u0301 A\u030a \u1100\u1161 \u212b ﬁ",
    "",
    "a",
    "🙂",
    "<s>starts with a special token</s> and <s> between  two spaces",
    "  leading spaces and a trailing one ",
]

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def corpus():
    lib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(lib, "*.py")))[:40]
    text = [MULTILINGUAL * 20]
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            text.append(fh.read())
    return text


def train(pre, ignore_merges, normalizer=None):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return tok


def sentencepiece_styles():
    """Llama-2-style tokenizer.json files from a SentencePiece BPE model (byte fallback)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "corpus.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(corpus()))
        spm.SentencePieceTrainer.train(
            input=os.path.join(d, "corpus.txt"), model_prefix=os.path.join(d, "tokenizer"), vocab_size=600,
            model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, max_sentence_length=1 << 20,
            num_threads=1, minloglevel=2)
        LlamaTokenizer.from_pretrained(d, legacy=False).save_pretrained(os.path.join(d, "out"))
        with open(os.path.join(d, "out", "tokenizer.json"), encoding="utf-8") as f:
            base = json.load(f)
    bos = {"type": "TemplateProcessing",
           "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    out = {}
    j = json.loads(json.dumps(base))  # transformers 4's layout (legacy)
    j["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                           {"type": "Replace", "pattern": {"String": " "},
                                                            "content": "▁"}]}
    j["pre_tokenizer"] = None
    j["model"]["unk_token"] = "<unk>"
    j["post_processor"] = bos
    out["llama2_style"] = j
    j = json.loads(json.dumps(base))  # transformers 5's conversion as it is, with a BOS
    assert j["pre_tokenizer"]["type"] == "Metaspace" and j["pre_tokenizer"]["prepend_scheme"] == "first", j
    j["post_processor"] = bos
    out["metaspace_style"] = j
    j = json.loads(json.dumps(base))
    j["model"]["byte_fallback"] = False
    j["model"]["unk_token"] = "<unk>"
    j["model"]["fuse_unk"] = True
    j["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    j["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    out["unk_style"] = j
    return {name: Tokenizer.from_str(json.dumps(j)) for name, j in out.items()}


def main():
    os.makedirs(HERE, exist_ok=True)
    toks = {
        "gpt2_style": train(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False),
        "llama3_style": train(pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), True),
        "nfc_style": train(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False, normalizers.NFC()),
    }
    toks["llama3_style"].post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    enc = {"texts": TEXTS}
    for name, tok in toks.items():
        tok.save(os.path.join(HERE, name + ".json"))
        enc[name] = [tok.encode(t).ids for t in TEXTS]
        enc[name + "_plain"] = [tok.encode(t, add_special_tokens=False).ids for t in TEXTS]
        enc[name + "_decoded"] = [tok.decode(ids, skip_special_tokens=False) for ids in enc[name + "_plain"]]
        for t, ids in zip(TEXTS, enc[name + "_plain"]):
            assert tok.decode(ids, skip_special_tokens=False) == (tok.normalizer.normalize_str(t) if tok.normalizer
                                                                   else t), (name, t)
    for name, tok in sentencepiece_styles().items():
        tok.save(os.path.join(HERE, name + ".json"))
        enc[name] = [tok.encode(t).ids for t in TEXTS]
        enc[name + "_plain"] = [tok.encode(t, add_special_tokens=False).ids for t in TEXTS]
        enc[name + "_decoded"] = [tok.decode(ids, skip_special_tokens=False) for ids in enc[name + "_plain"]]
    with open(os.path.join(HERE, "encodings.json"), "w", encoding="utf-8") as f:
        json.dump(enc, f, ensure_ascii=False, indent=1)
    for n in os.listdir(HERE):
        print(n, os.path.getsize(os.path.join(HERE, n)), "bytes")


if __name__ == "__main__":
    main()
