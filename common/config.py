"""Server configuration: frozen dataclasses loaded from one YAML file.

Every key is checked once at start-up; an unknown key or a value of the wrong
type raises ConfigError naming the key and the file.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Union

import yaml

from llmserve.common.errors import ConfigError
from llmserve.common.sampling import SamplingLimits

DTYPES = ("float32", "bfloat16", "float16")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class ModelConfig:
    """What model to serve and how to load it."""

    model_name: str = "llama"
    model_path: Optional[str] = None
    load_format: Literal["auto", "safetensors", "dummy"] = "auto"
    dummy_config: Optional[dict] = None
    tokenizer_path: Optional[str] = None
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_seq_len: Optional[int] = None
    end_token_id: Optional[list] = None
    pad_token_id: Optional[int] = None
    seed: int = 0
    chat_template: Optional[str] = None
    # how chat replies with tool_choice auto are searched for tool calls (master/tool_calls.py); auto: by the template
    tool_call_parser: Literal["auto", "none", "hermes", "llama3_json", "mistral"] = "auto"
    attention_backend: Literal["auto", "cpu", "torch"] = "auto"  # see agent/layers/attention
    linear_kernel: Literal["auto", "cpu", "torch"] = "auto"  # see agent/layers/linear
    quantization: Literal["none", "int8", "int4"] = "none"  # see agent/layers/quantization
    quantization_group_size: int = 128  # int4: weights per scale and min along the inputs (a multiple of 64)
    quantize_lm_head: bool = False  # with quantization: the LM head too (else it keeps the model dtype)

    def validate(self) -> None:
        if self.model_path is None and self.dummy_config is None:
            raise ValueError("model_path: set a checkpoint directory, or dummy_config with load_format: dummy")
        if self.model_path is None and self.load_format != "dummy":
            raise ValueError("load_format: must be 'dummy' when model_path is not set")
        if self.model_path is not None and self.dummy_config is not None:
            raise ValueError(
                "dummy_config: the checkpoint in model_path brings its own config.json; drop dummy_config "
                "(and load_format: dummy, unless you want random weights of the checkpoint's shape)"
            )
        if self.max_seq_len is not None and self.max_seq_len <= 0:
            raise ValueError("max_seq_len: must be positive")
        for token_id in self.end_token_id or []:
            if not _is_int(token_id) or token_id < 0:
                raise ValueError(f"end_token_id: {token_id!r} is not a token id (an integer >= 0)")
        if self.quantization != "none" and self.model_dtype == "float16":
            raise ValueError(f"quantization: {self.quantization} takes a float32 or bfloat16 model, not float16")
        if self.quantization_group_size <= 0 or self.quantization_group_size % 64:
            raise ValueError(f"quantization_group_size: {self.quantization_group_size} is not a positive multiple of 64 "
                             "(the int4 kernel's unit)")


@dataclass(frozen=True)
class ServingConfig:
    """Where the master listens and where its agents run."""

    server_ip: str = "127.0.0.1"
    server_port: int = 8835
    agent_ip: str = "127.0.0.1"
    agent_ports: list = field(default_factory=lambda: [8836])
    agent_hosts: Optional[list] = None  # one host per rank when the agents are on several machines
    tensor_parallel_size: Optional[int] = None
    dist_ip: str = "127.0.0.1"
    dist_port: int = 29500  # torch.distributed's usual port, away from the agents' consecutive ones
    transport: Literal["shm", "inline"] = "shm"
    start_device_id: int = 0
    device: Literal["cpu", "cuda"] = "cpu"
    num_threads: Optional[int] = None
    agent_start_timeout: float = 300.0
    step_timeout: float = 600.0
    launch_agents: bool = True
    step_trace_path: Optional[str] = None
    logits_dump_dir: Optional[str] = None
    log_level: str = "INFO"
    stats_log_interval: float = 10.0  # seconds between the periodic stats lines while serving; 0: none
    max_logprobs: int = 20
    max_num_beams: int = 8
    max_n: int = 16
    api_key: Optional[str] = field(default=None, repr=False)
    agent_keys_dir: Optional[str] = None  # CURVE keys from `llmserve keys DIR`; launched agents get fresh ones without it
    agent_restart_limit: int = 5  # restarts of dead agents allowed within agent_restart_window; 0: never restart
    agent_restart_window: float = 600.0
    agent_restart_backoff: float = 1.0  # seconds before a restart, doubled for each earlier one in the window
    max_request_body_bytes: int = 4 * 1024 * 1024
    cpu_affinity: Literal["auto", "none"] = "auto"  # auto: a core for the master, the rest shared by the agents

    def __post_init__(self) -> None:
        # tensor_parallel_size W with one port: the W agents listen on W consecutive ports from it
        size, ports = self.tensor_parallel_size, self.agent_ports
        if size is not None and size > 1 and isinstance(ports, list) and len(ports) == 1 and _is_int(ports[0]):
            object.__setattr__(self, "agent_ports", [ports[0] + i for i in range(size)])

    def agent_host(self, rank: int) -> str:
        """Where rank `rank` listens: its agent_hosts entry, else agent_ip."""
        return self.agent_hosts[rank] if self.agent_hosts else self.agent_ip

    @property
    def world_size(self) -> int:
        """Agents (tensor-parallel ranks)."""
        return len(self.agent_ports)

    @property
    def sampling_limits(self) -> SamplingLimits:
        return SamplingLimits(max_logprobs=self.max_logprobs, max_num_beams=self.max_num_beams, max_n=self.max_n)

    def validate(self) -> None:
        self._validate_ports()
        for name in ("max_num_beams", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")
        if self.max_logprobs < 0:
            raise ValueError("max_logprobs: must be >= 0")
        for name in ("agent_start_timeout", "step_timeout", "num_threads", "agent_restart_window", "max_request_body_bytes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: must be positive, got {value!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level: must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.logits_dump_dir == "":
            raise ValueError("logits_dump_dir: must be a directory path, or left out")
        for name in ("agent_restart_limit", "agent_restart_backoff", "stats_log_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must not be negative, got {getattr(self, name)!r}")
        if self.api_key == "":
            raise ValueError("api_key: must not be empty; leave it out to serve without a key")

    def _validate_ports(self) -> None:
        if not self.agent_ports:
            raise ValueError("agent_ports: list at least one port")
        if self.tensor_parallel_size is not None and self.tensor_parallel_size != len(self.agent_ports):
            raise ValueError(
                f"tensor_parallel_size: {self.tensor_parallel_size} ranks but {len(self.agent_ports)} agent_ports; "
                "list one port per rank, or a single first port"
            )
        ports = [("server_port", self.server_port), ("dist_port", self.dist_port), *(("agent_ports", p) for p in self.agent_ports)]
        for name, port in ports:
            if not _is_int(port) or not 0 <= port < 65536:
                raise ValueError(f"{name}: {port!r} is not a TCP port")
        if self.agent_hosts is not None and len(self.agent_hosts) != len(self.agent_ports):
            raise ValueError(f"agent_hosts: {len(self.agent_hosts)} hosts for {len(self.agent_ports)} agent_ports; list one per rank")
        hosts_ports = [(self.agent_host(r), p) for r, p in enumerate(self.agent_ports)]
        if self.agent_hosts is not None and not all(isinstance(h, str) and h for h in self.agent_hosts):
            raise ValueError(f"agent_hosts: {self.agent_hosts} must list host names or addresses")
        if self.agent_hosts is not None and len(set(self.agent_hosts)) > 1 and (self.transport != "inline" or self.launch_agents):
            raise ValueError(
                "agent_hosts: agents on several hosts need transport: inline and launch_agents: false "
                "(start each rank on its host with `llmserve agent`)"
            )
        if len(set(hosts_ports)) != len(hosts_ports):
            raise ValueError(f"agent_ports: {self.agent_ports} lists a port twice")
        if self.server_port in self.agent_ports:
            raise ValueError(f"server_port: {self.server_port} is also in agent_ports; the HTTP server needs its own port")
        if self.world_size > 1 and self.dist_port in (self.server_port, *self.agent_ports):
            raise ValueError(f"dist_port: {self.dist_port} is also the server's or an agent's port")


@dataclass(frozen=True)
class PagedAttentionConfig:
    """Size of the paged KV cache: a block count, or a memory budget each agent turns into one."""

    num_blocks: Union[int, Literal["auto"]] = "auto"
    block_size: int = 16
    kv_cache_memory: Union[int, str, None] = None  # bytes per agent, or "4GiB"
    memory_utilization: Optional[float] = None  # share of the memory available after the weights
    kv_cache_dtype: Literal["auto", "int8"] = "auto"  # int8: K and V per token and head, about half of 16-bit's memory

    DEFAULT_MEMORY_UTILIZATION: ClassVar[float] = 0.5

    def validate(self) -> None:
        if self.num_blocks != "auto" and self.num_blocks < 1:
            raise ValueError("num_blocks: must be at least 1, or auto")
        if self.block_size < 1:
            raise ValueError("block_size: must be at least 1")
        budgets = [name for name in ("kv_cache_memory", "memory_utilization") if getattr(self, name) is not None]
        if len(budgets) > 1 or (budgets and self.num_blocks != "auto"):
            given = ["num_blocks"] * (self.num_blocks != "auto") + budgets
            raise ValueError(f"{given[0]}: set one of num_blocks, kv_cache_memory and memory_utilization, not {' and '.join(given)}")
        if self.kv_cache_memory is not None:
            parse_bytes(self.kv_cache_memory, "kv_cache_memory")
        if self.memory_utilization is not None and not 0.0 < self.memory_utilization <= 1.0:
            raise ValueError(f"memory_utilization: must be in (0, 1], got {self.memory_utilization!r}")

    @property
    def kv_cache_bytes(self) -> Optional[int]:
        return None if self.kv_cache_memory is None else parse_bytes(self.kv_cache_memory, "kv_cache_memory")


BYTE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
              "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
BYTES = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*")


def parse_bytes(value: Union[int, str], key: str) -> int:
    """Bytes from an int or a string such as "4GiB", "512 MiB", "2GB" or "1e9"; ValueError naming `key`."""
    if isinstance(value, int):
        number, unit = value, ""
    else:
        match = BYTES.fullmatch(value)
        if match is None or match.group(2).lower() not in BYTE_UNITS:
            raise ValueError(f"{key}: {value!r} is not a size; write bytes or a number with KiB, MiB, GiB, KB, MB or GB")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * BYTE_UNITS[unit])
    if size < 1:
        raise ValueError(f"{key}: must be at least one byte, got {value!r}")
    return size


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching policy of the master's scheduler."""

    batching_strategy: Literal["continuous", "static"] = "continuous"
    prefill_batch_size: int = 16
    decode_batch_size: int = 64
    max_num_batched_tokens: int = 2048
    batch_waiting_time: float = 0.0
    decode_batch_waiting_time: float = 0.0
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes computed before (master/block_manager)
    # admission keeps KV room for each running sequence's next reserve_new_tokens tokens (up to its
    # max_new_tokens); 0 admits whenever a prompt fits; preempted sequences resume with their whole rest reserved
    reserve_new_tokens: int = 16
    max_queue_size: int = 1024
    # plan and send step N+1 while the agent runs step N (its sampled tokens become N+1's inputs on the agent);
    # not while a sequence in flight speculates, beams or forks n samples, nor with ranks on other hosts
    overlap_scheduling: bool = True

    def validate(self) -> None:
        for name in ("prefill_batch_size", "decode_batch_size", "max_num_batched_tokens", "max_queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")
        for name in ("batch_waiting_time", "decode_batch_waiting_time", "reserve_new_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must not be negative")
        if self.max_num_batched_tokens < self.decode_batch_size:
            raise ValueError(
                f"max_num_batched_tokens: {self.max_num_batched_tokens} is below decode_batch_size "
                f"({self.decode_batch_size}), so running sequences could starve for decode tokens"
            )


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (master/speculative.py): each decode step also verifies up to
    num_speculative_tokens proposed tokens; the output is the one decoding without it gives."""

    method: Literal["none", "ngram", "draft"] = "none"  # ngram: continue the latest earlier match of the
    # sequence's own tokens; draft: a small model on the agent proposes (draft_model_path or draft_num_layers)
    num_speculative_tokens: int = 4  # the most proposed tokens verified per sequence and step (k)
    prompt_lookup_min: int = 1  # ngram: the shortest suffix of the tokens that may match
    prompt_lookup_max: int = 4  # ngram: the longest suffix tried first
    adaptive: bool = True  # each sequence's k follows its acceptance rate; proposing pauses while it does not pay
    draft_token_cost: float = 0.1  # adaptive: a verified token's cost relative to a step, per running sequence
    disable_by_batch_size: int = 0  # no proposals while this many sequences or more run (0: any batch)
    draft_model_path: Optional[str] = None  # draft: a checkpoint with the target's vocabulary (default: the target)
    draft_num_layers: Optional[int] = None  # draft: keep only its first this-many decoder layers (a slice)
    draft_model_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None  # default: model_dtype

    def validate(self) -> None:
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens: must be between 1 and {MAX_SPECULATIVE_TOKENS}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min: must be between 1 and prompt_lookup_max ({self.prompt_lookup_max})")
        if not 0 <= self.draft_token_cost <= 1:
            raise ValueError("draft_token_cost: must be between 0 and 1 (a share of a decode step's time)")
        if self.method == "draft" and self.draft_model_path is None and self.draft_num_layers is None:
            raise ValueError("method: draft needs draft_model_path (a small checkpoint with the same vocabulary) "
                             "or draft_num_layers (a slice of the target)")
        if self.draft_num_layers is not None and self.draft_num_layers < 1:
            raise ValueError("draft_num_layers: must be at least 1")
        if self.disable_by_batch_size < 0:
            raise ValueError("disable_by_batch_size: must not be negative (0: speculate at any batch size)")
        if self.prompt_lookup_max > MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"prompt_lookup_max: must be at most {MAX_SPECULATIVE_TOKENS}")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def rows_per_seq(self) -> int:
        """Sampled rows a decoding sequence may take in one step: one per position verified."""
        return 1 + self.num_speculative_tokens if self.enabled else 1


MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class Config:
    """The whole server configuration; `path` is the file it came from."""

    model_config: ModelConfig = field(default_factory=ModelConfig)
    serving_config: ServingConfig = field(default_factory=ServingConfig)
    pa_config: PagedAttentionConfig = field(default_factory=PagedAttentionConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative_config: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    path: str = "<defaults>"

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("path")
        return data


SECTIONS = {
    "model_config": ModelConfig,
    "serving_config": ServingConfig,
    "pa_config": PagedAttentionConfig,
    "scheduler_config": SchedulerConfig,
    "speculative_config": SpeculativeConfig,
}


def packaged_config(name: str = "default.yaml") -> str:
    """The path of a config shipped with llmserve (configs/ of the repository; llmserve/configs installed)."""
    return str(importlib.resources.files("llmserve.configs").joinpath(name))


def load_config(path: str, overrides: Optional[dict] = None) -> Config:
    """Read and validate a YAML config; `overrides` is merged section by section."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for section, values in (overrides or {}).items():
        data.setdefault(section, {})
        data[section] = {**(data[section] or {}), **values}
    return config_from_dict(data, source=os.path.abspath(path))


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    """Build a Config from plain data, naming `source` in every error."""
    sections = {}
    for name, values in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"{source}: unknown section '{name}' (known: {', '.join(SECTIONS)})")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{name}' must be a mapping")
        sections[name] = _build_section(SECTIONS[name], values, name, source)
    config = Config(**sections, path=source)
    _check_paths(config, source)
    if config.speculative_config.method == "draft" and config.serving_config.world_size > 1:
        raise ConfigError(f"{source}: speculative_config.method: draft runs with one agent, not tensor_parallel_size "
                          f"{config.serving_config.world_size} (use ngram)")
    if config.model_config.quantization != "none" and config.serving_config.device != "cpu":
        raise ConfigError(f"{source}: model_config.quantization: {config.model_config.quantization} runs on the CPU, "
                          f"not serving_config.device {config.serving_config.device}")
    return config


def _build_section(cls: type, values: dict, section: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    checked = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{section}.{key}' (known: {', '.join(sorted(known))})")
        value = _wrap_single_value(value, hints[key])
        problem = _type_problem(value, hints[key])
        if problem:
            raise ConfigError(f"{source}: key '{section}.{key}' {problem}")
        checked[key] = value
    instance = cls(**checked)
    try:
        instance.validate()
    except ValueError as exc:
        raise ConfigError(f"{source}: {section}.{exc}") from exc
    return instance


def _wrap_single_value(value: Any, hint: Any) -> Any:
    """`[value]` for a single value given where a list is expected (`agent_ports: 8836`), else `value`."""
    takes_list = hint is list or list in typing.get_args(hint)
    if takes_list and value is not None and not isinstance(value, (list, dict)):
        return [value]
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_problem(value: Any, hint: Any) -> Optional[str]:
    """Why `value` does not fit the annotation `hint`, or None when it does."""
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        problems = [_type_problem(value, h) for h in options if h is not type(None)]
        if any(p is None for p in problems):
            return None
        wanted = [p.removeprefix("must be ").split(", got ")[0] for p in problems]
        return f"must be {' or '.join(wanted)}, got {value!r}"
    if origin is Literal:
        allowed = typing.get_args(hint)
        return None if value in allowed else f"must be one of {', '.join(map(repr, allowed))}, got {value!r}"
    if hint in (list, dict):
        return None if isinstance(value, hint) else f"must be a {hint.__name__}, got {value!r}"
    if hint is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if hint is int:
        return None if _is_int(value) else f"must be an integer, got {value!r}"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"must be a number, got {value!r}"
    if hint is str:
        return None if isinstance(value, str) else f"must be a string, got {value!r}"
    return None


def _check_paths(config: Config, source: str) -> None:
    path = config.model_config.model_path
    if path is not None and not os.path.isdir(path):
        raise ConfigError(f"{source}: key 'model_config.model_path': {path} is not a directory")
    keys_dir = config.serving_config.agent_keys_dir
    if keys_dir is not None and not os.path.isdir(keys_dir):
        raise ConfigError(f"{source}: key 'serving_config.agent_keys_dir': {keys_dir} is not a directory")
    draft = config.speculative_config.draft_model_path
    if draft is not None and not os.path.isdir(draft):
        raise ConfigError(f"{source}: key 'speculative_config.draft_model_path': {draft} is not a directory")
    template = config.model_config.chat_template
    if template is not None and not os.path.isfile(template):
        raise ConfigError(f"{source}: key 'model_config.chat_template': {template} is not a file")
