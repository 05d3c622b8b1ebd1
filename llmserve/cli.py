"""The `llmserve` command: one verb per job, each with its own --help.

  serve, agent, keys     the server: a master with its agents, one agent by hand, the agents' channel keys
  chat, complete         interactive streaming clients of a running server
  bench serve, bench offline, profile, check-precision, plot
                         the tools of llmserve.tools: each parses its own arguments and is imported only
                         when its verb runs (matplotlib and tqdm come with the `tools` extra)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import sys
import tempfile
from typing import Iterator, Optional

from llmserve.common.config import DTYPES, Config
from llmserve.common.errors import ConfigError

API_KEY_ENV = "LLMSERVE_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8835"
TOOLS_EXTRA = "pip install 'llmserve[tools]'"
TOOLS_EXTRA_MODULES = {"matplotlib", "tqdm"}

# The verbs that are tools: their words -> (their module in llmserve.tools, one line of help).
TOOL_VERBS = {
    ("bench", "serve"): ("bench_serving", "load-test a running server with streaming requests"),
    ("bench", "offline"): ("bench_offline", "offline throughput against transformers generate, same weights"),
    ("profile",): ("profile_steps", "where each step's time goes, from a server's step trace"),
    ("check-precision",): ("acc_allclose", "compare two directories of dumped logits with np.allclose"),
    ("plot",): ("plot_logs", "plot load-test runs (their requests.jsonl) against each other"),
}

# serve's flags (their argparse names) -> the config key each sets.
SERVE_KEYS = {
    "host": ("serving_config", "server_ip"),
    "port": ("serving_config", "server_port"),
    "agent_port": ("serving_config", "agent_ports"),  # one port: the ranks listen on it and the ones after it
    "tensor_parallel_size": ("serving_config", "tensor_parallel_size"),
    "api_key": ("serving_config", "api_key"),
    "served_model_name": ("model_config", "model_name"),
    "dtype": ("model_config", "model_dtype"),
    "quantization": ("model_config", "quantization"),
    "max_model_len": ("model_config", "max_seq_len"),
    "tokenizer": ("model_config", "tokenizer_path"),
    "chat_template": ("model_config", "chat_template"),
    "seed": ("model_config", "seed"),
    "block_size": ("pa_config", "block_size"),
    "num_blocks": ("pa_config", "num_blocks"),
    "kv_cache_memory": ("pa_config", "kv_cache_memory"),
    "memory_utilization": ("pa_config", "memory_utilization"),
    "kv_cache_dtype": ("pa_config", "kv_cache_dtype"),
    "max_num_seqs": ("scheduler_config", "decode_batch_size"),
    "overlap_scheduling": ("scheduler_config", "overlap_scheduling"),
    "speculative_method": ("speculative_config", "method"),
    "num_speculative_tokens": ("speculative_config", "num_speculative_tokens"),
    "draft_model": ("speculative_config", "draft_model_path"),
}
KV_CACHE_SIZES = {"num_blocks": "auto", "kv_cache_memory": None, "memory_utilization": None}  # each key when unused


def main(argv: Optional[list[str]] = None) -> int:
    """Run the verb `argv` names; its exit status."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and getattr(args, "tool", None) is None:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.tool_argv = rest  # a tool's arguments, for its own parser
    try:
        return args.run(args) or 0
    except ConfigError as exc:
        print(f"llmserve: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmserve", description="Serve Llama-family models; talk to, load-test "
                                     "and measure a server. `llmserve VERB --help` tells each verb's flags.")
    verbs = parser.add_subparsers(dest="command", required=True, metavar="VERB")
    _add_serve(verbs)
    _add_agent(verbs)
    _add_keys(verbs)
    _add_build_kernels(verbs)
    _add_clients(verbs)
    _add_tools(verbs)
    return parser


# ---------------------------------------------------------------- serve

def _add_serve(verbs) -> None:
    serve = verbs.add_parser(
        "serve", help="start the master and launch its agents",
        description="Serve MODEL_DIR, or the model of --config, or (with neither) the embedded default model. "
                    "Each flag overrides one config key, named in its help.")
    serve.add_argument("model_dir", nargs="?", metavar="MODEL_DIR",
                       help="Hugging Face checkpoint directory: model_config.model_path, load_format auto; without "
                            "--config the other keys keep their defaults")
    serve.add_argument("--config", help="YAML config file (default: configs/default.yaml, the embedded default model, "
                                        "unless MODEL_DIR is given)")
    serve.add_argument("--host", help="serving_config.server_ip: the HTTP address")
    serve.add_argument("--port", type=int, help="serving_config.server_port: the HTTP port")
    serve.add_argument("--agent-port", type=int, metavar="PORT",
                       help="serving_config.agent_ports: rank r of --tensor-parallel-size listens on PORT + r")
    serve.add_argument("--tensor-parallel-size", type=int, metavar="W", help="serving_config.tensor_parallel_size")
    serve.add_argument("--served-model-name", metavar="NAME",
                       help="model_config.model_name: the {name} of /models/{name}/generate and the OpenAI model")
    serve.add_argument("--dtype", choices=DTYPES, help="model_config.model_dtype")
    serve.add_argument("--quantization", choices=("none", "int8", "int4"),
                       help="model_config.quantization: int8 weights and activations (W8A8), or int4 weights, for the decoder's linear layers")
    serve.add_argument("--max-model-len", type=int, metavar="TOKENS", help="model_config.max_seq_len")
    serve.add_argument("--tokenizer", metavar="PATH", help="model_config.tokenizer_path (default: the checkpoint's)")
    serve.add_argument("--chat-template", metavar="FILE",
                       help="model_config.chat_template: a jinja template overriding the checkpoint's")
    serve.add_argument("--seed", type=int, help="model_config.seed: of the sampler, and of load_format dummy's weights")
    serve.add_argument("--block-size", type=int, metavar="TOKENS", help="pa_config.block_size")
    serve.add_argument("--kv-cache-dtype", choices=("auto", "int8"),
                       help="pa_config.kv_cache_dtype: int8 keeps K and V in 8 bits (about twice the tokens of 16-bit)")
    serve.add_argument("--num-blocks", type=_num_blocks, metavar="N|auto", help="pa_config.num_blocks, per agent")
    serve.add_argument("--kv-cache-memory", metavar="SIZE",
                       help="pa_config.kv_cache_memory: the KV cache's bytes per agent, or a size such as 4GiB")
    serve.add_argument("--memory-utilization", type=float, metavar="FRACTION",
                       help="pa_config.memory_utilization: the share of the memory left after the weights")
    serve.add_argument("--max-num-seqs", type=int, metavar="N",
                       help="scheduler_config.decode_batch_size: sequences decoded in one step at most")
    serve.add_argument("--overlap-scheduling", action=argparse.BooleanOptionalAction, default=None,
                       help="scheduler_config.overlap_scheduling: plan and send the next step while the agent runs "
                            "this one (on by default)")
    serve.add_argument("--speculative-method", choices=("none", "ngram", "draft"),
                       help="speculative_config.method: ngram proposes continuations of earlier matches of each "
                            "sequence's own tokens, draft a small model's greedy tokens; each step verifies them "
                            "(same output, fewer steps)")
    serve.add_argument("--draft-model", metavar="DIR",
                       help="speculative_config.draft_model_path: the draft checkpoint (the model's tokenizer)")
    serve.add_argument("--num-speculative-tokens", type=int, metavar="K",
                       help="speculative_config.num_speculative_tokens: the most tokens proposed per sequence and step")
    serve.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                       help=f"serving_config.api_key: require `Authorization: Bearer KEY` on every route but "
                            f"/health (default: ${API_KEY_ENV})")
    serve.set_defaults(run=_serve)


def _num_blocks(text: str):
    return "auto" if text == "auto" else int(text)


def serve_overrides(args: argparse.Namespace) -> dict:
    """The config keys serve's flags and MODEL_DIR set, as {section: {key: value}}."""
    overrides: dict[str, dict] = {}
    for name, (section, key) in SERVE_KEYS.items():
        if getattr(args, name) is not None:
            overrides.setdefault(section, {})[key] = getattr(args, name)
    if args.draft_model is not None:
        overrides["speculative_config"]["draft_model_path"] = os.path.abspath(args.draft_model)
    if args.model_dir is not None:
        checkpoint = {"model_path": os.path.abspath(args.model_dir), "load_format": "auto", "dummy_config": None}
        overrides.setdefault("model_config", {}).update(checkpoint)
    sizes = overrides.get("pa_config", {})
    if set(sizes) & set(KV_CACHE_SIZES):  # a size given here replaces the file's, whichever key that one used
        overrides["pa_config"] = {**KV_CACHE_SIZES, **sizes}
    return overrides


def serve_config(args: argparse.Namespace) -> Config:
    """What `serve` serves: --config (else, with MODEL_DIR, the defaults; else the embedded default model's)
    with the flags' keys merged in."""
    from llmserve.common.config import config_from_dict, load_config, packaged_config

    overrides = serve_overrides(args)
    if args.config is None and args.model_dir is not None:
        return config_from_dict(overrides, source="the command line")
    return load_config(args.config or packaged_config(), overrides)


def _serve(args: argparse.Namespace) -> int:
    from llmserve.common.log import setup_logging
    from llmserve.master.launcher import serve

    config = serve_config(args)
    setup_logging("master", config.serving_config.log_level)
    with readable_by_agents(config, is_the_file=not serve_overrides(args)) as config:
        return serve(config)


@contextlib.contextmanager
def readable_by_agents(config: Config, is_the_file: bool) -> Iterator[Config]:
    """`config` with a `path` its launched agents read it from: its file when that holds all of it, else a private
    copy (flags included, the API key left out: agents never need it) that lasts as long as the server."""
    if is_the_file:
        yield config
        return
    import yaml

    data = config.to_dict()
    data["serving_config"].pop("api_key", None)
    with tempfile.TemporaryDirectory(prefix="llmserve-config-") as folder:
        path = os.path.join(folder, "config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(data, f, sort_keys=False)
        yield dataclasses.replace(config, path=path)


# ---------------------------------------------------------------- agent, keys

def _add_agent(verbs) -> None:
    agent = verbs.add_parser("agent", help="start one agent (rank R) by hand")
    agent.add_argument("--config", required=True, help="YAML config file (the same one the master uses)")
    agent.add_argument("--rank", type=int, default=0, help="which agent_ports entry to listen on")
    agent.add_argument("--master-addr", help="override serving_config.dist_ip: rank 0's host, where the ranks meet")
    agent.add_argument("--bind", help="address to listen on (default: this rank's agent host); 0.0.0.0 on another host")
    agent.add_argument("--device-id", type=int, help="CUDA device on this host (default: start_device_id + rank)")
    agent.add_argument("--keys-dir", help="directory from `llmserve keys` (default: serving_config.agent_keys_dir)")
    agent.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    agent.add_argument("--keys-fd", type=int, help=argparse.SUPPRESS)  # a pipe holding the keys of a launched agent
    agent.add_argument("--cpus", type=_cpu_list, help=argparse.SUPPRESS)  # the cores the master gives a launched agent
    agent.set_defaults(run=_agent)


def _cpu_list(text: str) -> list[int]:
    return [int(cpu) for cpu in text.split(",")]


def _agent(args: argparse.Namespace) -> int:
    from llmserve.agent.worker import main as agent_main
    from llmserve.common.config import load_config
    from llmserve.common.log import setup_logging

    given = (("dist_ip", args.master_addr), ("agent_keys_dir", args.keys_dir))
    config = load_config(args.config, {"serving_config": {k: v for k, v in given if v is not None}})
    setup_logging(f"agent {args.rank}", config.serving_config.log_level)
    if not 0 <= args.rank < len(config.serving_config.agent_ports):
        raise ConfigError(f"--rank {args.rank} has no entry in serving_config.agent_ports")
    keys = _agent_keys(config, args.keys_fd)
    agent_main(config, args.rank, keys, args.parent_pid, args.bind, args.device_id, args.cpus)
    return 0


def _agent_keys(config: Config, keys_fd: Optional[int]):
    """A launched agent's keys come through a pipe; one started by hand reads agent_keys_dir."""
    from llmserve.common.agent_keys import load_keys, read_keys_pipe

    if keys_fd is not None:
        return read_keys_pipe(keys_fd)
    keys_dir = config.serving_config.agent_keys_dir
    if keys_dir is None:
        raise ConfigError("an agent started by hand needs the channel's keys: `llmserve keys DIR` on the master's host, "
                          "then --keys-dir DIR or serving_config.agent_keys_dir (see README, Security)")
    return load_keys(keys_dir, "agent")


def _add_keys(verbs) -> None:
    keys = verbs.add_parser("keys", help="write the CURVE keys of the master <-> agent channel into a new directory")
    keys.add_argument("dir", help="directory to create (mode 0700)")
    keys.set_defaults(run=_keys)


def _keys(args: argparse.Namespace) -> int:
    from llmserve.common.agent_keys import write_key_dir

    path = args.dir
    try:
        write_key_dir(path)
    except OSError as exc:
        print(f"llmserve: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the channel's keys to {path}:\n"
          f"  master host: {path}/master.key_secret and {path}/agent.key\n"
          f"  every agent host: {path}/agent.key_secret and {path}/master.key\n"
          f"then set serving_config.agent_keys_dir: {path} (or llmserve agent --keys-dir {path}).")
    return 0


def _add_build_kernels(verbs) -> None:
    build = verbs.add_parser(
        "build-kernels", help="compile llmserve's CPU kernels for this torch (`make install` runs it)",
        description="Compile the C++ kernels (GEMV, paged decode attention) for AVX2 and AVX-512 into "
                    "$XDG_CACHE_HOME/llmserve/kernels. Agents load the build for their CPU and fall back to "
                    "oneDNN / torch without one; they never compile.")
    build.set_defaults(run=_build_kernels)


def _build_kernels(args: argparse.Namespace) -> int:
    from llmserve.agent import kernels

    results = kernels.build()
    for variant, outcome in results.items():
        print(f"{variant}: {outcome}")
    here = kernels.variant_for_this_cpu()
    if here is not None and results[here].startswith("failed"):
        print(f"llmserve: the {here} build this CPU needs failed; agents will use oneDNN / torch", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- chat, complete

def _add_clients(verbs) -> None:
    chat = verbs.add_parser(
        "chat", help="talk with a running server (streamed /v1/chat/completions)",
        description="Each line of input is your next message; the whole conversation goes to /v1/chat/completions "
                    "and the reply streams back. EOF (Ctrl-D) or /exit ends.")
    _add_client_arguments(chat)
    chat.add_argument("--system", metavar="TEXT", help="a system message opening the conversation")
    chat.set_defaults(run=_chat)
    complete = verbs.add_parser(
        "complete", help="complete prompts on a running server (streamed /v1/completions)",
        description="Each line of input is a raw prompt whose completion streams back from /v1/completions "
                    "(or --prompt TEXT, once). EOF (Ctrl-D) or /exit ends.")
    _add_client_arguments(complete)
    complete.add_argument("--prompt", metavar="TEXT", help="complete this one prompt and exit")
    complete.set_defaults(run=_complete)


def _add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the server's base URL (default {DEFAULT_URL})")
    parser.add_argument("--model", help="the model to ask for (default: the one the server serves)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"sent as `Authorization: Bearer KEY` (default: ${API_KEY_ENV})")
    parser.add_argument("--max-tokens", type=int, metavar="N", help="tokens per answer at most (default: the server's)")
    parser.add_argument("--temperature", type=float, metavar="T", help="0 is greedy (default: the server's, 1)")
    parser.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                        help="seconds to wait for the server at each step of an answer (default 300)")


def _chat(args: argparse.Namespace) -> int:
    from llmserve.tools.chat_client import chat, open_client

    with open_client(args.url, args.api_key, args.timeout) as client, _interruptible():
        return chat(client, _sampling(args), args.system, sys.stdin, sys.stdout, sys.stderr)
    return 130


def _complete(args: argparse.Namespace) -> int:
    from llmserve.tools.chat_client import complete, open_client, read_turns

    prompts = [args.prompt] if args.prompt is not None else read_turns(sys.stdin, sys.stdout)
    with open_client(args.url, args.api_key, args.timeout) as client, _interruptible():
        return complete(client, _sampling(args), prompts, sys.stdout, sys.stderr)
    return 130


def _sampling(args: argparse.Namespace):
    from llmserve.tools.chat_client import Sampling

    return Sampling(model=args.model, max_tokens=args.max_tokens, temperature=args.temperature)


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """Ctrl-C ends a client quietly (the caller returns 130, as a shell does), not with a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print(file=sys.stderr)


# ---------------------------------------------------------------- tools

def _add_tools(verbs) -> None:
    bench = verbs.add_parser("bench", help="benchmarks: `bench serve` (a load test), `bench offline`")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for words, (module, text) in TOOL_VERBS.items():
        group = benchmarks if words[0] == "bench" else verbs
        tool = group.add_parser(words[-1], help=text, add_help=False)  # the tool's own parser answers --help
        tool.set_defaults(run=_run_tool, tool=module, prog=" ".join(("llmserve",) + words))


def _run_tool(args: argparse.Namespace) -> int:
    """Hand the arguments to the tool's own `main`; a missing package of the tools extra is said, not raised."""
    try:
        tool = importlib.import_module(f"llmserve.tools.{args.tool}")
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in TOOLS_EXTRA_MODULES:
            raise
        print(f"{args.prog} needs {exc.name}, which comes with the tools extra: {TOOLS_EXTRA}", file=sys.stderr)
        return 1
    return tool.main(args.tool_argv, prog=args.prog)


if __name__ == "__main__":
    sys.exit(main())
