"""`python -m pdmesh.worker.engine "prompt"`: one colocated generation, text in, text out.

A smoke test of a model folder or preset outside the mesh:

    python -m pdmesh.worker.engine "The capital of France is" --model smollm2
    python -m pdmesh.worker.engine "The capital of France is" --model ~/models/Llama-3.2-1B
"""

from __future__ import annotations

import argparse
import sys
import time

from pdmesh.worker.engine.factory import add_engine_arguments, build_engine, spec_from_args
from pdmesh.worker.engine.protocol import SamplingParams
from pdmesh.worker.engine.reference import colocated_generate
from pdmesh.worker.engine.runtime import configure_torch_threads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdmesh.worker.engine",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--ids", action="store_true", help="print the output token ids, not text")
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    configure_torch_threads()
    engine = build_engine(spec_from_args(args))
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    start = time.perf_counter()
    gen = colocated_generate(engine, engine.tokenizer.encode(args.prompt), args.max_new_tokens, sampling)
    elapsed = time.perf_counter() - start
    print(" ".join(map(str, gen.output_ids)) if args.ids else engine.tokenizer.decode(gen.output_ids))
    print(f"{len(gen.prompt_ids)} prompt tokens, {len(gen.output_ids)} new ({gen.finish_reason}) "
          f"in {elapsed:.3f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
