"""Request bodies of the HTTP API, validated by pydantic (strict types, unknown fields rejected)."""
from __future__ import annotations

from typing import Optional

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

from common.sampling import SamplingParams


class GenerateParameters(BaseModel):
    """The `parameters` object of a generate request."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_new_tokens: int = Field(16, ge=1, description="Tokens to generate at most.")
    do_sample: bool = Field(False, description="Sample instead of taking the most likely token.")
    temperature: float = Field(1.0, ge=0.0, description="Softmax temperature when sampling; 0 means greedy.")
    top_k: int = Field(0, ge=0, description="Sample among the k most likely tokens; 0 means all.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Sample among the smallest set with this much probability.")
    seed: Optional[int] = Field(None, ge=0, description="Same seed and parameters give the same output.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")
    return_full_text: bool = Field(False, description="Prepend the prompt to generated_text.")

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )


class GenerateRequest(BaseModel):
    """Body of POST /models/{name}/generate."""

    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: str = Field(description="The prompt.")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = Field(False, description="Stream tokens as server-sent events.")


def validation_message(exc: RequestValidationError) -> str:
    """One readable sentence per problem, naming the field."""
    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"] if part != "body")
        if error["type"] == "json_invalid":
            problems.append(f"the body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}")
        elif error["type"] == "extra_forbidden":
            problems.append(f"{location}: unknown parameter")
        else:
            problems.append(f"{location or 'body'}: {error['msg']}")
    return "; ".join(problems)
