"""The ``sgl-ray`` command line.

Examples::

    sgl-ray serve                                 # OpenAI API on http://127.0.0.1:8000/v1 (default SmolLM2)
    sgl-ray serve --address HEAD:6379 --app-name mine --route-prefix /mine   # beside others' apps; Ctrl-C removes mine
    sgl-ray chat                                  # chat with the default SmolLM2 model in this terminal
    sgl-ray generate --prompt "Once upon a time" --max-new-tokens 32
    sgl-ray bench offline --num-prompts 32 --output-len 64
    sgl-ray bench serving --base-url http://127.0.0.1:8000 --dataset shared-prefix --num-prompts 64
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from sgl_ray.configs.engine_args import EngineArgs
from sgl_ray.envs import get_env


def _engine(ns: argparse.Namespace):
    from sgl_ray.entrypoints.engine import Engine

    args = EngineArgs.from_cli_args(ns)
    return Engine(**{k: v for k, v in vars(args).items()})


def _chat(ns: argparse.Namespace) -> int:
    engine = _engine(ns)
    tok = engine.tokenizer
    messages: list[dict[str, str]] = [{"role": "system", "content": ns.system}] if ns.system else []
    params = {"max_new_tokens": ns.max_new_tokens, "temperature": ns.temperature, "top_p": ns.top_p}
    interactive = sys.stdin.isatty()
    print(f"sgl-ray chat · model {engine.model_path} · Ctrl-D to quit", file=sys.stderr)
    try:
        while True:
            if interactive:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.rstrip("\n")})
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            reply = ""
            for chunk in engine.generate(input_ids=list(ids), sampling_params=params, stream=True):
                reply += chunk["text"]
                print(chunk["text"], end="", flush=True)
            print(flush=True)
            messages.append({"role": "assistant", "content": reply})
    except KeyboardInterrupt:
        print(file=sys.stderr)
    finally:
        engine.shutdown()
    return 0


def _generate(ns: argparse.Namespace) -> int:
    engine = _engine(ns)
    try:
        params = {"max_new_tokens": ns.max_new_tokens, "temperature": ns.temperature, "top_p": ns.top_p}
        out = engine.generate(ns.prompt, params)
        print(json.dumps(out, indent=2) if ns.json else out["text"])
    finally:
        engine.shutdown()
    return 0


def _serve(ns: argparse.Namespace) -> int:
    return importlib.import_module("sgl_ray.deployments.serve_cli").run_serve(ns)


def _bench(ns: argparse.Namespace) -> int:
    from sgl_ray.bench.cli import run_bench

    return run_bench(ns)


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgl-ray", description="High-performance LLM serving on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="OpenAI-compatible server on Ray Serve")
    importlib.import_module("sgl_ray.deployments.serve_cli").add_serve_args(serve)
    serve.set_defaults(func=_serve)

    chat = sub.add_parser("chat", help="interactive chat with the in-process engine")
    EngineArgs.add_cli_args(chat)
    _add_sampling(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.set_defaults(func=_chat)

    gen = sub.add_parser("generate", help="complete one prompt and print the text")
    EngineArgs.add_cli_args(gen)
    _add_sampling(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--json", action="store_true", help="print the whole result as JSON")
    gen.set_defaults(func=_generate)

    bench = sub.add_parser("bench", help="benchmarks")
    from sgl_ray.bench.cli import add_bench_args

    add_bench_args(bench)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=get_env().log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
