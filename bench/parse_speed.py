"""How long parsing a GGUF's header, metadata and tensor infos takes: qpack's reader against
llama.cpp's gguf.GGUFReader on the same file (median of several runs, page cache warm).

    python bench/parse_speed.py [MODEL.gguf] [--runs 7]

Default model: SmolLM2-135M-Instruct Q4_1 (33 keys incl. 49152 tokens and 48900 merges, 272
tensors). The second qpack line also decodes every string of every string array, which
GGUFReader does not do either (it keeps them as numpy byte arrays).
"""

from __future__ import annotations

import argparse
import statistics
import time

from qpack.runtime.gguf import StringArray, open_gguf


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def qpack_open(path) -> None:
    open_gguf(path).close()


def qpack_open_and_decode(path) -> None:
    with open_gguf(path) as gf:
        for value in gf.metadata.values():
            if isinstance(value, StringArray):
                value.tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="GGUF file (default: SmolLM2-135M Q4_1)")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    if args.model is None:
        from qpack.builder.models import default_model_path

        args.model = str(default_model_path())
    import gguf  # the peer; imported late so that its import time is not measured

    with open_gguf(args.model) as gf:
        print(f"{args.model}: {len(gf.metadata)} keys, {len(gf.tensors)} tensors, "
              f"header {gf.data_offset} bytes")  # fmt: skip
    ours = median_ms(lambda: qpack_open(args.model), args.runs)
    ours_decoded = median_ms(lambda: qpack_open_and_decode(args.model), args.runs)
    peer = median_ms(lambda: gguf.GGUFReader(args.model), max(3, args.runs // 2))
    print(f"qpack open_gguf                 {ours:9.1f} ms  (median of {args.runs})")
    print(f"qpack open_gguf + decode strings {ours_decoded:8.1f} ms")
    print(f"gguf.GGUFReader                 {peer:9.1f} ms")
    print(f"ratio GGUFReader / qpack        {peer / ours:9.1f} x")


if __name__ == "__main__":
    main()
