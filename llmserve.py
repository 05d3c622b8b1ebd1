"""Command line: `llmserve serve` (master plus its agents) and `llmserve agent` (one agent)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmserve", description="Serve Llama-family models.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the master and launch its agents")
    serve.add_argument("--config", default="configs/default.yaml", help="YAML config file")
    serve.add_argument("--host", help="override serving_config.server_ip")
    serve.add_argument("--port", type=int, help="override serving_config.server_port")
    agent = commands.add_parser("agent", help="start one agent (rank R) by hand")
    agent.add_argument("--config", required=True, help="YAML config file (the same one the master uses)")
    agent.add_argument("--rank", type=int, default=0, help="which agent_ports entry to listen on")
    agent.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    args = _parser().parse_args(argv)
    from common.config import load_config
    from common.errors import ConfigError
    from common.log import setup_logging

    overrides = {}
    if args.command == "serve":
        overrides = {"serving_config": {k: v for k, v in (("server_ip", args.host), ("server_port", args.port)) if v is not None}}
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"llmserve: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.command == "serve":
        setup_logging("master", config.serving_config.log_level)
        from master.launcher import serve

        sys.exit(serve(config))
    setup_logging(f"agent {args.rank}", config.serving_config.log_level)
    if not 0 <= args.rank < len(config.serving_config.agent_ports):
        print(f"llmserve: --rank {args.rank} has no entry in serving_config.agent_ports", file=sys.stderr)
        sys.exit(2)
    from agent.worker import main as agent_main

    agent_main(config, args.rank, args.parent_pid)


if __name__ == "__main__":
    main()
