"""Reference for text/tests/tamm_tokenizer.rs: tamm's AFMTokenizer and AFM v6 chat format.

Trains small SentencePiece models inside the test (unigram and BPE, byte fallback, the
user-defined symbol `<n>`, nmt_nfkc normalisation), writes each into a toolkit-style folder
(`tokenizer.model` + tamm's `tokenizer-config.json`, which adds `<turn_start>` / `<turn_end>`)
and records tamm's token ids for every test string and chat conversation.

usage: tamm_tokenizer.py OUT_DIR
"""

import json
import random
import sys
from pathlib import Path

import sentencepiece as spm
from tamm.preprocessors.instruct_lm.afm.afm_v6 import AFMChatTemplateV6Preprocessor
from tamm.tokenizers.afm import AFMTokenizer
from tamm.utils import json as tamm_json

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Apple Foundation Models run on device and on Private Cloud Compute.",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "El zorro marrón rápido salta sobre el perro perezoso.",
    "素早い茶色の狐が怠け者の犬を飛び越える。",
    "敏捷的棕色狐狸跳过了懒狗。",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "ثعلب بني سريع يقفز فوق الكلب الكسول",
    "1234567890 3.14159 2,718 +42 -7 100%",
    "def f(x):\n    return x * 2\n",
    "Hello, world! How are you today?\nI am fine, thanks.",
]

EXTRA = [
    "",
    " ",
    "   leading spaces",
    "trailing spaces   ",
    "two  spaces and   three",
    "tab\tseparated\tvalues",
    "new\nline",
    "\n\nblank lines\n\n\n",
    "emoji 😀🚀 and ❤️ hearts",
    "byte fallback: ǅ ∰ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "full-width ＡＢＣ１２３ and ｶﾀｶﾅ",
    "<n> literal and <turn_start> markers <turn_end>",
    "digits 000111222333444555",
    "mixed Ελληνικά עברית हिन्दी ไทย",
    "ligatures ﬁ ﬂ and ½ ² ℃",
    "CamelCaseWordsTogether and snake_case_words",
    "URL https://example.com/path?q=1&r=2#frag",
    "  \n  \n  ",
]


def strings():
    rng = random.Random(0)
    words = " ".join(CORPUS).replace("\n", " ").split()
    out = list(CORPUS) + list(EXTRA)
    while len(out) < 220:
        n = rng.randint(1, 12)
        seps = [" ", " ", " ", "  ", "\n", "\t", ", ", "\n\n"]
        s = ""
        for i in range(n):
            s += rng.choice(words)
            if i + 1 < n:
                s += rng.choice(seps)
        if rng.random() < 0.2:
            s = " " + s
        if rng.random() < 0.2:
            s += rng.choice(["\n", " ", "!", "😀"])
        out.append(s)
    return out


def conversations():
    rng = random.Random(1)
    pool = strings()
    convs = []
    for i in range(24):
        msgs = []
        if i % 3 == 0:
            msgs.append({"role": "system", "content": "You are terse.\nAnswer briefly."})
        for t in range(1 + i % 3):
            msgs.append({"role": "user", "content": rng.choice(pool) or "hi"})
            if t < i % 3:
                msgs.append({"role": "assistant", "content": rng.choice(pool) or "ok"})
        convs.append(msgs)
    return convs


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20) + "\n")
    tests = strings()
    convs = conversations()
    ref = {"strings": tests, "conversations": convs, "models": {}}
    for kind, vocab in [("unigram", 400), ("bpe", 400)]:
        d = out / kind
        d.mkdir(exist_ok=True)
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(d / "tokenizer"),
            vocab_size=vocab,
            model_type=kind,
            byte_fallback=True,
            user_defined_symbols=["<n>"],
            character_coverage=0.9995,
            hard_vocab_limit=False,
            minloglevel=2,
        )
        cfg = AFMTokenizer.Config(
            vocab_path="tokenizer.model",
            user_defined_tokens=["<turn_start>", "<turn_end>"],
        )
        (d / "tokenizer-config.json").write_text(tamm_json.dumps(cfg, indent=2))
        tok = AFMTokenizer(
            vocab_path=str(d / "tokenizer.model"),
            user_defined_tokens=["<turn_start>", "<turn_end>"],
        )
        tok.eot_id = tok.tokenizer.piece_to_id("<turn_end>")
        pre = AFMChatTemplateV6Preprocessor(tok, generate_prefix=True)
        ref["models"][kind] = {
            "vocab_size": len(tok),
            "ids": [tok.encode(s) for s in tests],
            "decoded": [tok.decode(tok.encode(s)) for s in tests],
            "chat": [
                pre([dict(m) for m in c] if c[0]["role"] == "system" else [dict(m) for m in c]).input_ids
                if c[0]["role"] != "system"
                else AFMChatTemplateV6Preprocessor(
                    tok, generate_prefix=True, prepend_system_message=False
                )([dict(m) for m in c]).input_ids
                for c in convs
            ],
        }
    (out / "reference.json").write_text(json.dumps(ref, ensure_ascii=False))


if __name__ == "__main__":
    main()
