"""How much of JSON Schema the constrained decoder covers, on the public JSON-Schema-Test-Suite
(draft 2020-12), which the `jsonschema` package's source distribution ships under json/tests.

    python bench/schema_coverage.py [--suite DIR]

Without --suite, `pip download` fetches the sdist of the installed jsonschema version into a
temporary directory. For every schema of the suite and each engine (llguidance, as qpack uses
it; outlines-core if installed):
  - refused: the engine declines the schema (qpack answers 400 naming the keyword);
  - accepted: then each of the suite's instances, written as json.dumps writes it, is checked
    against the grammar: a valid instance the grammar allows or an invalid one it forbids is
    agreement; an INVALID instance the grammar allows is a false accept (the engine would let
    the model write output that breaks the schema: the failure that matters); a valid one it
    forbids is a false reject (too strict, harmless for generation).
Printed: counts and percentages per engine, and the keywords most often refused.
"""

from __future__ import annotations

import argparse
import collections
import glob
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import tempfile


def suite_dir(given: str | None) -> str:
    if given:
        return given
    version = importlib.metadata.version("jsonschema")
    tmp = tempfile.mkdtemp(prefix="jsonschema-sdist-")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                    ":all:", f"jsonschema=={version}", "-d", tmp], check=True)  # fmt: skip
    [archive] = glob.glob(os.path.join(tmp, "jsonschema-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    return os.path.join(tmp, f"jsonschema-{version}", "json", "tests", "draft2020-12")


class Llguidance:
    name = "llguidance"

    def __init__(self):
        import llguidance
        from qpack.runtime import grammar

        self.llg, self.grammar = llguidance, grammar
        # A byte-level vocabulary: every text is spelled byte by byte, no tokenizer quirks.
        self.tokens = [bytes([b]) for b in range(256)] + [b"\xff<eos>"]
        wrapper = llguidance.TokenizerWrapper(_ByteVocabulary(self.tokens))
        self.vocab = llguidance.LLTokenizer(wrapper, eos_token=256)

    def compile(self, schema):
        try:
            return self.grammar.json_schema(schema)
        except self.grammar.SchemaError as e:
            raise Refused(e.keyword or str(e)[:60]) from None

    def accepts(self, compiled, text: str) -> bool:
        m = self.llg.LLMatcher(self.vocab, compiled, log_level=0)
        data = text.encode()
        return m.consume_tokens(list(data)) and m.is_accepting()


class _ByteVocabulary:
    def __init__(self, tokens):
        self.tokens = tokens
        self.eos_token_id = 256
        self.bos_token_id = None
        self.special_token_ids = [256]

    def __call__(self, text):
        if not isinstance(text, str):
            raise TypeError
        return list(text.encode())


class OutlinesCore:
    name = "outlines-core"

    def __init__(self):
        import outlines_core
        import regex
        from qpack.runtime.grammar import WHITESPACE

        self.oc, self.regex, self.ws = outlines_core, regex, WHITESPACE + "?"  # optional there

    def compile(self, schema):
        try:
            pattern = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), self.ws)
            return self.regex.compile(pattern)
        except Exception as e:
            raise Refused(str(e).split(":")[0][:60]) from None

    def accepts(self, compiled, text: str) -> bool:
        return compiled.fullmatch(text) is not None


class Refused(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", help="JSON-Schema-Test-Suite's tests/draft2020-12 directory")
    a = ap.parse_args()
    directory = suite_dir(a.suite)
    groups = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path) as f:
            groups += json.load(f)
    print(f"JSON-Schema-Test-Suite draft2020-12 (from {directory}): {len(groups)} schemas, "
          f"{sum(len(g['tests']) for g in groups)} instances")  # fmt: skip
    engines = [Llguidance()]
    try:
        engines.append(OutlinesCore())
    except ImportError:
        print("outlines-core not installed: not measured")
    for engine in engines:
        refused: collections.Counter[str] = collections.Counter()
        accepted = agree = false_accept = false_reject = 0
        for g in groups:
            schema = g["schema"]
            if not isinstance(schema, dict):  # boolean schemas: no object to hand the engine
                schema = {} if schema else {"not": {}}
            try:
                compiled = engine.compile(schema)
            except Refused as e:
                refused[str(e)] += 1
                continue
            accepted += 1
            for t in g["tests"]:
                allowed = engine.accepts(compiled, json.dumps(t["data"], ensure_ascii=False))
                if allowed == t["valid"]:
                    agree += 1
                elif allowed:
                    false_accept += 1
                else:
                    false_reject += 1
        n = accepted + sum(refused.values())
        checked = agree + false_accept + false_reject
        print(f"\n{engine.name}: {accepted}/{n} schemas accepted ({100 * accepted / n:.0f} %), "
              f"{sum(refused.values())} refused")  # fmt: skip
        print(f"  instances of accepted schemas: {checked}; agreement {agree} "
              f"({100 * agree / max(1, checked):.1f} %), false accepts {false_accept} "
              f"({100 * false_accept / max(1, checked):.1f} %: invalid output the grammar allows), "
              f"false rejects {false_reject}")  # fmt: skip
        top = ", ".join(f"{k} {v}" for k, v in refused.most_common(12))
        print(f"  most refused: {top}")


if __name__ == "__main__":
    main()
