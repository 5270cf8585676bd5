"""llama.cpp decode-speed reference for `afm-vl bench text --vs-llama-cpp`.

Usage: llama_cpp_generate.py GGUF PROMPT_IDS_JSON NEW_TOKENS THREADS
Loads the GGUF with llama-cpp-python once, then serves rounds: for every line "round" read on
stdin it runs one greedy generation of exactly NEW_TOKENS tokens from the prompt ids (fresh
context) and prints one JSON line with the prefill and decode speeds; "quit" ends. The caller
interleaves these rounds with its own.
"""
import json
import sys
import time

from llama_cpp import Llama

gguf, ids_json, new_tokens, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ids = json.load(open(ids_json))
llm = Llama(model_path=gguf, n_ctx=max(2048, len(ids) + new_tokens + 8), n_threads=threads,
            n_threads_batch=threads, n_batch=512, logits_all=False, verbose=False)


def one_round():
    llm.reset()
    t0 = time.perf_counter()
    first = None
    n = 0
    tokens = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                            reset=True):
        n += 1
        tokens.append(int(tok))
        if first is None:
            first = time.perf_counter()
        if n >= new_tokens:
            break
    end = time.perf_counter()
    return {"prefill_tok_s": len(ids) / (first - t0),
            "decode_tok_s": (n - 1) / max(end - first, 1e-9),
            "new_tokens": n, "tokens": tokens}


one_round()  # warm-up
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    if line.strip() != "round":
        break
    print(json.dumps(one_round()), flush=True)
