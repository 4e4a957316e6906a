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


def median_ms(fn, runs: int) -> tuple[float, float]:
    """Median wall time and median CPU time of this process, in ms. On a shared machine the
    CPU time is the steadier figure (wall time includes waiting for a core)."""
    wall, cpu = [], []
    for _ in range(runs):
        w, c = time.perf_counter(), time.process_time()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


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
    print(f"{'':34}{'wall ms':>9}{'cpu ms':>9}   (median of {args.runs})")
    print(f"{'qpack open_gguf':34}{ours[0]:9.1f}{ours[1]:9.1f}")
    print(f"{'qpack open_gguf + decode strings':34}{ours_decoded[0]:9.1f}{ours_decoded[1]:9.1f}")
    print(f"{'gguf.GGUFReader':34}{peer[0]:9.1f}{peer[1]:9.1f}")
    print(f"{'ratio GGUFReader / qpack':34}{peer[0] / ours[0]:8.1f}x{peer[1] / ours[1]:8.1f}x")


if __name__ == "__main__":
    main()
