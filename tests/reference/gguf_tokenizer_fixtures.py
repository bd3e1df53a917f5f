"""Tokenizer fixtures for tests/gguf_tokenizer.rs: token ids from Hugging Face's own
GGUF tokenizer conversion (transformers `AutoTokenizer.from_pretrained(dir, gguf_file=...)`,
independent of `ipo import-gguf`) for a list of tricky strings. Not run in CI; rerun by hand:

    .venv-ref/bin/python tests/reference/gguf_tokenizer_fixtures.py GGUF [IMPORTED_DIR]

Writes tests/fixtures/tokenizer/smollm2_ids.json = {"source", "cases": [{"text", "ids"}]}
(ids without added BOS/EOS). With IMPORTED_DIR it also checks that Python `tokenizers` loads
IMPORTED_DIR/tokenizer.json and gives the same ids and decodes them back to the text.
"""
import json
import os
import sys

from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "tokenizer", "smollm2_ids.json")

TEXTS = [
    "Hello, world!",
    "12345",
    "The year 2024 had 366 days; pi is 3.14159.",
    " 7 77 777 a1b2c3",
    "multiple   spaces    here",
    "trailing spaces   ",
    "   leading spaces",
    "tabs\tand\t\ttabs",
    "line one\nline two\n\n\nline five\r\nwindows",
    "\n\n",
    "café naïve résumé Ærøskøbing",
    "Привет, мир! Γειά σου κόσμε",
    "emoji 😀🎉👍🏽 and 👨‍👩‍👧 family",
    "中文分词测试，日本語のテキスト、한국어 문장",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>ipo<file_sep>src/main.rs",
    "I'm sure they'll say we've done it, don't you?",
    "URL: https://example.com/path?q=1&x=%20y",
    "mixed CASE and ALLCAPS and camelCaseWords",
    "¡¿Qué?! — “quotes” ‘single’ …",
    "zero\u200bwidth and nbsp\u00a0here",
]


def main():
    gguf = os.path.abspath(sys.argv[1])
    imported = sys.argv[2] if len(sys.argv) > 2 else None
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    cases = [{"text": t, "ids": tok(t, add_special_tokens=False).input_ids} for t in TEXTS]
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as fh:
        json.dump({"source": "transformers AutoTokenizer.from_pretrained(gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf), add_special_tokens=False",
                   "cases": cases}, fh, indent=1, ensure_ascii=False)
    print("wrote", OUT)
    if imported:
        from tokenizers import Tokenizer
        mine = Tokenizer.from_file(os.path.join(imported, "tokenizer.json"))
        bad = 0
        for c in cases:
            ids = mine.encode(c["text"], add_special_tokens=False).ids
            back = mine.decode(ids, skip_special_tokens=False)
            if ids != c["ids"] or back != c["text"]:
                bad += 1
                print("MISMATCH", repr(c["text"]), ids, c["ids"], repr(back))
        print(f"python tokenizers on {imported}: {len(cases) - bad}/{len(cases)} cases equal")


if __name__ == "__main__":
    main()
