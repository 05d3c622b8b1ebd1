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
    serve.add_argument("--config", default="configs/default.yaml", help="YAML config file")
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
    agent.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    args = _parser().parse_args(argv)
    from common.config import load_config
    from common.errors import ConfigError
    from common.log import setup_logging

    overrides = {}
    if args.command == "agent":
        overrides = {"serving_config": {k: v for k, v in (("dist_ip", args.master_addr),) if v is not None}}
    if args.command == "serve":
        serving = {"server_ip": args.host, "server_port": args.port, "api_key": args.api_key}
        overrides = {"serving_config": {k: v for k, v in serving.items() if v is not None}}
        if args.chat_template:
            overrides["model_config"] = {"chat_template": args.chat_template}
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

    agent_main(config, args.rank, args.parent_pid, args.bind, args.device_id)


if __name__ == "__main__":
    main()
