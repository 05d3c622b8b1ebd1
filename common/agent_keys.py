"""CURVE keys that authenticate and encrypt the master <-> agent ZeroMQ channel.

Each side holds a key pair and its peer's public key: the agent (the CURVE
server) lets in only the master's public key, and the master only talks to
the agent holding the agent secret key. `serve` makes fresh pairs at every
start and hands launched agents theirs through an inherited pipe (no secret
on a command line or in a file); agents started by hand, on this host or
another, read the files `llmserve keys DIR` writes.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from typing import Literal

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from llmserve.common.errors import ConfigError

Role = Literal["master", "agent"]
PEER: dict[str, Role] = {"master": "agent", "agent": "master"}


@dataclass(frozen=True)
class ChannelKeys:
    """One side's CURVE key pair and the public key of the side it talks to (Z85 text, 40 bytes each)."""

    public: bytes
    secret: bytes = field(repr=False)
    peer_public: bytes

    def to_json(self) -> bytes:
        return json.dumps({name: getattr(self, name).decode() for name in ("public", "secret", "peer_public")}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "ChannelKeys":
        values = json.loads(data)
        return cls(**{name: values[name].encode() for name in ("public", "secret", "peer_public")})


def new_keys() -> tuple[ChannelKeys, ChannelKeys]:
    """Fresh key pairs for one server start: (the master's keys, the agents' keys)."""
    master_public, master_secret = zmq.curve_keypair()
    agent_public, agent_secret = zmq.curve_keypair()
    return ChannelKeys(master_public, master_secret, agent_public), ChannelKeys(agent_public, agent_secret, master_public)


def write_key_dir(path: str) -> list[str]:
    """Write master.key, master.key_secret, agent.key and agent.key_secret into a new directory (mode 0700)."""
    if os.path.exists(path) and os.listdir(path):
        raise ConfigError(f"{path} is not empty; choose a new directory for the keys")
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)  # the secret files are written before they can be chmodded: nobody else may look in meanwhile
    files = []
    for role in ("master", "agent"):
        public_file, secret_file = zmq.auth.create_certificates(path, role)
        os.chmod(secret_file, 0o600)
        files += [public_file, secret_file]
    return files


def load_keys(path: str, role: Role) -> ChannelKeys:
    """`role`'s keys from a directory made by `write_key_dir`: its own `.key_secret`, its peer's `.key`."""
    secret_file = os.path.join(path, f"{role}.key_secret")
    public_file = os.path.join(path, f"{PEER[role]}.key")
    try:
        mode = os.stat(secret_file).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{secret_file} can be read by other users (mode {mode & 0o777:o}); run chmod 600 on it")
        public, secret = zmq.auth.load_certificate(secret_file)
        peer_public, _ = zmq.auth.load_certificate(public_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"serving_config.agent_keys_dir: cannot read the {role}'s keys in {path}: {exc}") from exc
    if secret is None:
        raise ConfigError(f"{secret_file} holds no secret key")
    return ChannelKeys(public, secret, peer_public)


def keys_pipe(keys: ChannelKeys) -> int:
    """A pipe holding `keys`; the returned read end is handed to a child process (`pass_fds`) and closed here."""
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "wb") as pipe:
        pipe.write(keys.to_json())  # a few hundred bytes: fits the pipe's buffer, so this never blocks
    return read_end


def read_keys_pipe(fd: int) -> ChannelKeys:
    """The keys a parent wrote with `keys_pipe`."""
    with os.fdopen(fd, "rb") as pipe:
        return ChannelKeys.from_json(pipe.read())


def secure_server(context: zmq.Context, socket: zmq.Socket, keys: ChannelKeys) -> ThreadAuthenticator:
    """Make `socket` (not yet bound) a CURVE server that admits only the peer's public key.

    Returns the authenticator thread that checks every connection; stop it before the context.
    """
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve_callback("*", _OnlyKey(keys.peer_public))
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True
    return authenticator


def secure_client(socket: zmq.Socket, keys: ChannelKeys) -> None:
    """Make `socket` (not yet connected) a CURVE client of the server whose public key is the peer's."""
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_serverkey = keys.peer_public


class _OnlyKey:
    """ZAP credentials check: the one public key allowed in."""

    def __init__(self, public: bytes):
        self.public = public

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.public
