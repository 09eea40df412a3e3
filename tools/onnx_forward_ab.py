#!/usr/bin/env python
"""ONNX Runtime forward time of two exported graphs, interleaved, and whether their outputs agree.

Both graphs get the same random input at each batch size; after a warm-up, `--repeats` rounds alternate between
the two (each round `--calls` calls), so that both see the same machine load. Prints the median ms per call of
each, their ratio and the largest absolute difference of their outputs.

    python tools/onnx_forward_ab.py OLD_RUN/export/model.onnx NEW_RUN/export/model.onnx --batch_sizes 1 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graph_a")
    parser.add_argument("graph_b")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args(argv)
    sessions = [ort.InferenceSession(p, providers=["CPUExecutionProvider"]) for p in (args.graph_a, args.graph_b)]
    name = sessions[0].get_inputs()[0].name
    _, _, height, width = sessions[0].get_inputs()[0].shape
    print("| batch | A ms | B ms | B / A | max abs. difference (score, map) |")
    print("|---|---|---|---|---|")
    for batch in args.batch_sizes:
        x = np.random.default_rng(0).random((batch, 3, int(height), int(width)), dtype=np.float32)
        for session in sessions:
            for _ in range(3):
                session.run(None, {name: x})
        times: list[list[float]] = [[], []]
        for _ in range(args.repeats):
            for i, session in enumerate(sessions):
                start = time.perf_counter()
                for _ in range(args.calls):
                    session.run(None, {name: x})
                times[i].append((time.perf_counter() - start) / args.calls * 1000.0)
        a, b = (statistics.median(t) for t in times)
        outs = [session.run(None, {name: x}) for session in sessions]
        diffs = [float(np.abs(p - q).max()) for p, q in zip(*outs)]
        print(f"| {batch} | {a:.2f} | {b:.2f} | {b / a:.3f} | {diffs[0]:.3g}, {diffs[1]:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
