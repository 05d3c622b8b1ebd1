"""llmserve: an LLM serving system (an asynchronous master, per-device agents, a paged KV cache).

Installed, everything lives in this package: `llmserve.master`, `llmserve.agent`, `llmserve.common`,
`llmserve.tools` and the configs in `llmserve.configs`. In the repository those sit beside this
directory (master/, agent/, common/, tools/, configs/), and this package's path reaches them there.
"""
from __future__ import annotations

import os

_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(os.path.dirname(__file__), "master")) and os.path.isfile(
    os.path.join(_SOURCE_ROOT, "setup.cfg")
):
    __path__.append(_SOURCE_ROOT)  # the repository: llmserve.master is ./master
