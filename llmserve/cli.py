"""Command line: `llmserve serve` (master plus its agents) and `llmserve agent` (one agent)."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional


API_KEY_ENV = "LLMSERVE_API_KEY"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmserve", description="Serve Llama-family models.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the master and launch its agents")
    serve.add_argument("--config", help="YAML config file (default: the embedded default model's, configs/default.yaml)")
    serve.add_argument("--host", help="override serving_config.server_ip")
    serve.add_argument("--port", type=int, help="override serving_config.server_port")
    serve.add_argument(
        "--api-key", default=os.environ.get(API_KEY_ENV),
        help=f"require `Authorization: Bearer KEY` on every route but /health (default: ${API_KEY_ENV})",
    )
    serve.add_argument("--chat-template", metavar="FILE", help="jinja chat template overriding the checkpoint's")
    agent = commands.add_parser("agent", help="start one agent (rank R) by hand")
    agent.add_argument("--config", required=True, help="YAML config file (the same one the master uses)")
    agent.add_argument("--rank", type=int, default=0, help="which agent_ports entry to listen on")
    agent.add_argument("--master-addr", help="override serving_config.dist_ip: rank 0's host, where the ranks meet")
    agent.add_argument("--bind", help="address to listen on (default: this rank's agent host); 0.0.0.0 on another host")
    agent.add_argument("--device-id", type=int, help="CUDA device on this host (default: start_device_id + rank)")
    agent.add_argument("--keys-dir", help="directory from `llmserve keys` (default: serving_config.agent_keys_dir)")
    agent.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    agent.add_argument("--keys-fd", type=int, help=argparse.SUPPRESS)  # a pipe holding the keys of a launched agent
    keys = commands.add_parser("keys", help="write the CURVE keys of the master <-> agent channel into a new directory")
    keys.add_argument("dir", help="directory to create (mode 0700)")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    args = _parser().parse_args(argv)
    from llmserve.common.config import load_config, packaged_config
    from llmserve.common.errors import ConfigError
    from llmserve.common.log import setup_logging

    if args.command == "keys":
        sys.exit(_write_keys(args.dir))
    overrides = {}
    if args.command == "agent":
        agent = (("dist_ip", args.master_addr), ("agent_keys_dir", args.keys_dir))
        overrides = {"serving_config": {k: v for k, v in agent if v is not None}}
    if args.command == "serve":
        serving = {"server_ip": args.host, "server_port": args.port, "api_key": args.api_key}
        overrides = {"serving_config": {k: v for k, v in serving.items() if v is not None}}
        if args.chat_template:
            overrides["model_config"] = {"chat_template": args.chat_template}
    try:
        config = load_config(args.config or packaged_config(), overrides)
    except ConfigError as exc:
        print(f"llmserve: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.command == "serve":
        setup_logging("master", config.serving_config.log_level)
        from llmserve.master.launcher import serve

        sys.exit(serve(config))
    setup_logging(f"agent {args.rank}", config.serving_config.log_level)
    if not 0 <= args.rank < len(config.serving_config.agent_ports):
        print(f"llmserve: --rank {args.rank} has no entry in serving_config.agent_ports", file=sys.stderr)
        sys.exit(2)
    try:
        keys = _agent_keys(config, args.keys_fd)
    except ConfigError as exc:
        print(f"llmserve: {exc}", file=sys.stderr)
        sys.exit(2)
    from llmserve.agent.worker import main as agent_main

    agent_main(config, args.rank, keys, args.parent_pid, args.bind, args.device_id)


def _agent_keys(config, keys_fd: Optional[int]):
    """A launched agent's keys come through a pipe; one started by hand reads agent_keys_dir."""
    from llmserve.common.agent_keys import load_keys, read_keys_pipe
    from llmserve.common.errors import ConfigError

    if keys_fd is not None:
        return read_keys_pipe(keys_fd)
    keys_dir = config.serving_config.agent_keys_dir
    if keys_dir is None:
        raise ConfigError("an agent started by hand needs the channel's keys: `llmserve keys DIR` on the master's host, "
                          "then --keys-dir DIR or serving_config.agent_keys_dir (see README, Security)")
    return load_keys(keys_dir, "agent")


def _write_keys(path: str) -> int:
    from llmserve.common.agent_keys import write_key_dir
    from llmserve.common.errors import ConfigError

    try:
        write_key_dir(path)
    except (ConfigError, OSError) as exc:
        print(f"llmserve: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the channel's keys to {path}:\n"
          f"  master host: {path}/master.key_secret and {path}/agent.key\n"
          f"  every agent host: {path}/agent.key_secret and {path}/master.key\n"
          f"then set serving_config.agent_keys_dir: {path} (or llmserve agent --keys-dir {path}).")
    return 0


if __name__ == "__main__":
    main()
