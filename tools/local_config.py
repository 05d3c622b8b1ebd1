"""Derived configs for tools that start their own server: free loopback ports and a few overrides."""
from __future__ import annotations

import os
import socket

import yaml


def free_ports(count: int) -> list[int]:
    """`count` different TCP ports on 127.0.0.1 that nothing listens on right now (held together while
    chosen, so the system cannot hand the same one out twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def write_local_config(base_path: str, workdir: str, **sections: dict) -> str:
    """Copy `base_path` into `workdir` with free ports, quiet logs and `sections` merged in; return its path."""
    with open(base_path) as f:
        config = yaml.safe_load(f)
    server_port, agent_port = free_ports(2)
    config.setdefault("serving_config", {}).update(server_port=server_port, agent_ports=[agent_port], log_level="WARNING")
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = os.path.join(workdir, "local.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path
