"""The cost of constrained decoding (JSON schema, tool calls) per generated token, against the
decode time it rides on, for qpack's engine (llguidance), outlines-core and llama.cpp's own
grammar sampler, on the same GGUF in one run.

    python bench/constrained.py [MODEL.gguf ...] [-t 2] [-n 96] [--llama-python PYTHON]

Defaults: SmolLM2-135M and Gemma 3 270M from their packages. For each model and grammar:
  - qpack: the mask (llguidance's computation + applying it to the logits row) and the
    advance, timed inside the engine's own loop, over a greedy generation until the grammar
    ends; reported as ms per token and as % of the decode time per token of the same run;
    plus the one-off costs (vocabulary adapter, grammar compile);
  - outlines-core (if installed): index compile time and the mask per token on the same token
    sequence (write_mask_into + advance), as % of qpack's decode time per token;
  - llama.cpp (llama-cpp-python in a separate Python, --llama-python): greedy tokens/s with its
    GBNF grammar from the same schema (LlamaGrammar.from_json_schema) and without it: the
    grammar's overhead in %, and qpack's constrained tokens/s against its constrained tokens/s.
xgrammar is not measured: its wheel requires torch, transformers and triton, which do not
belong in a one-file executable.
The machine is shared: the load average is printed; read the percentages, not the absolute ms.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import numpy as np

SCHEMAS = {
    "object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40},
            "country": {"type": "string", "maxLength": 40},
            "population_millions": {"type": "number", "minimum": 0, "maximum": 100},
            "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 3},
        },
        "required": ["name", "country", "population_millions", "landmarks"],
        "additionalProperties": False,
    },
    "tool call (generic)": None,  # the generic tool-call grammar, built from TOOLS
}  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                     "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}]  # fmt: skip
QUESTION = "Describe Paris as JSON: name, country, population in millions, three landmarks."

LLAMA_WORKER = r"""
import json, sys, time
import llama_cpp
a = json.loads(sys.argv[1])
llm = llama_cpp.Llama(a["model"], n_ctx=1024, n_threads=a["threads"], verbose=False)
grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(a["schema"]), verbose=False)
out = {}
for name, g in (("free", None), ("grammar", grammar)):
    rates = []
    for _ in range(a["reps"]):
        llm.reset()
        t0 = time.perf_counter()
        n = 0
        for tok in llm.generate(llm.tokenize(a["prompt"].encode(), special=True), temp=0.0,
                                top_k=1, grammar=g, reset=True):
            if n == 0:
                t1 = time.perf_counter()  # after the prompt: decode only
            n += 1
            if tok == llm.token_eos() or n >= a["n"]:
                break
        rates.append((n - 1) / (time.perf_counter() - t1))
    out[name] = sorted(rates)[len(rates) // 2]
print(json.dumps(out))
"""


class TimedConstraint:
    """Wraps a constraint and adds up the time the engine spends in it."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds = 0.0
        self.tokens: list[int] = []

    def mask(self, logits):
        t = time.perf_counter()
        out = self.inner.mask(logits)
        self.seconds += time.perf_counter() - t
        return out

    def advance(self, token):
        t = time.perf_counter()
        self.inner.advance(token)
        self.seconds += time.perf_counter() - t
        self.tokens.append(token)


def qpack_run(loaded, prompt: list[int], grammar_text: str | None, n: int):
    from qpack.runtime.grammar import GrammarConstraint
    from qpack.runtime.sampler import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n)
    constraint = None
    if grammar_text is not None:
        constraint = TimedConstraint(
            GrammarConstraint(loaded.tokenizer, grammar_text, loaded.model.n_vocab)
        )
    req = loaded.engine.submit(prompt, params, constraint)
    loaded.engine.run_until_done(req)
    text = "".join(ev.text for ev in req.poll())
    u = req.usage
    per_token = u.generation_seconds / max(1, u.completion_tokens - 1)
    return per_token, u.completion_tokens, constraint, text


def outlines_run(loaded, schema: dict, tokens: list[int]) -> tuple[float, float, int] | None:
    try:
        import outlines_core
    except ImportError:
        return None
    from qpack.runtime.grammar import WHITESPACE

    tok = loaded.tokenizer
    t0 = time.perf_counter()
    table: dict[bytes, list[int]] = {}
    eos = tok.eos_id
    for i in range(tok.vocab_size):
        if i == eos or tok.is_special(i):
            continue
        piece = tok.token_bytes(i)
        if piece:
            table.setdefault(piece, []).append(i)
    vocab = outlines_core.Vocabulary(eos, table)
    # The same whitespace as qpack's grammar (optional: outlines writes it as mandatory).
    regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(schema), WHITESPACE + "?")
    index = outlines_core.Index(regex, vocab)
    compile_s = time.perf_counter() - t0
    guide = outlines_core.Guide(index)
    mask = np.zeros((tok.vocab_size + 31) // 32, dtype=np.int32)
    t0 = time.perf_counter()
    steps = 0
    for t in tokens:
        guide.write_mask_into(mask.ctypes.data, mask.size, mask.itemsize)
        if guide.is_finished() or t == eos or t in tok.stop_ids:
            break
        try:
            guide.advance(t, return_tokens=False)
        except Exception:
            break  # llguidance's whitespace/escapes may differ from outlines' regex
        steps += 1
    return compile_s, (time.perf_counter() - t0) / max(1, steps), steps


def llama_run(python: str, model: str, schema: dict, prompt_text: str, threads: int, n: int):
    arg = json.dumps({"model": model, "schema": schema, "prompt": prompt_text, "threads": threads,
                      "n": n, "reps": 3})  # fmt: skip
    p = subprocess.run([python, "-c", LLAMA_WORKER, arg], capture_output=True, text=True)
    if p.returncode != 0:
        return None, p.stderr.strip().splitlines()[-1:]
    return json.loads(p.stdout.strip().splitlines()[-1]), None


def main() -> None:
    from qpack.builder import models
    from qpack.runtime import grammar, session, tools
    from qpack.runtime.chat_request import chat_features
    from qpack.runtime.gguf import open_gguf

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", type=int, default=96, help="most tokens generated per run")
    ap.add_argument("--llama-python", default="/opt/refenv/bin/python")
    a = ap.parse_args()
    paths = a.models or [str(models.default_model_path()), str(models.gemma3_path())]
    print(f"load average before: {os.getloadavg()[0]:.2f} (2 cores shared with other work)")
    for path in paths:
        gf = open_gguf(path)
        loaded = session.load(gf, ctx_size=1024, threads=a.threads, log=open(os.devnull, "w"))
        tok = loaded.tokenizer
        t0 = time.perf_counter()
        grammar.vocabulary(tok, loaded.model.n_vocab)
        vocab_s = time.perf_counter() - t0
        print(f"\n{os.path.basename(path)}: vocabulary {tok.vocab_size} tokens, llguidance "
              f"adapter built once in {vocab_s * 1000:.0f} ms")  # fmt: skip
        messages = [{"role": "user", "content": QUESTION}]
        prompt_text = loaded.template.render(messages)
        prompt = loaded.template.encode(messages)
        free_s, free_n, _, _ = qpack_run(loaded, prompt, None, a.n)
        print(f"  qpack unconstrained decode: {free_s * 1000:.1f} ms/token ({1 / free_s:.1f} tok/s,"
              f" {free_n} tokens)")  # fmt: skip
        for name, schema in SCHEMAS.items():
            t0 = time.perf_counter()
            if schema is None:
                f = chat_features({"tools": TOOLS, "tool_choice": "required"}, loaded.template)
                text = f._grammar
                schema = tools.generic_schema(f.tools)
            else:
                text = grammar.json_schema(schema)
            compile_s = time.perf_counter() - t0
            per_tok, n, c, out = qpack_run(loaded, prompt, text, a.n)
            mask_s = c.seconds / max(1, len(c.tokens))
            print(f"  [{name}] qpack+llguidance: compile {compile_s * 1000:.1f} ms; mask+advance "
                  f"{mask_s * 1000:.3f} ms/token = {100 * mask_s / per_tok:.1f} % of the "
                  f"{per_tok * 1000:.1f} ms decode step ({n} tokens, "
                  f"{'valid JSON' if _is_json(out) else 'cut at max tokens'})")  # fmt: skip
            oc = outlines_run(loaded, schema, c.tokens)
            if oc is not None:
                print(f"  [{name}] outlines-core: index compile {oc[0] * 1000:.0f} ms; mask+advance"
                      f" {oc[1] * 1000:.3f} ms/token = {100 * oc[1] / per_tok:.1f} % of qpack's step"
                      f" (over {oc[2]} of the {len(c.tokens)} tokens)")  # fmt: skip
            peer, err = llama_run(a.llama_python, path, schema, prompt_text, a.threads, a.n)
            if peer is None:
                print(f"  [{name}] llama.cpp: not measured ({' '.join(err)})")
                continue
            overhead = 100 * (peer["free"] / peer["grammar"] - 1)
            print(f"  [{name}] llama.cpp: {peer['free']:.1f} tok/s free, {peer['grammar']:.1f} "
                  f"with its grammar (+{overhead:.1f} % per token); qpack constrained "
                  f"{1 / per_tok:.1f} tok/s = {peer['grammar'] * per_tok and (1 / per_tok) / peer['grammar']:.2f}x "
                  "llama.cpp constrained")  # fmt: skip
        loaded.engine.shutdown()


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
