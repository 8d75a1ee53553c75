"""The job spec: what a run computes, from which model and corpus, and where it writes.

Frozen pydantic models that reject unknown keys, with a doc string on every field (they become the
JSON Schema's descriptions: ``codelens schema``). A spec is loaded from YAML or JSON, with
``--set a.b=value`` overrides; any problem is reported as a ``SpecError`` naming the field path, the
bad value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from codelens.engine.errors import SpecError

SCHEMA_VERSION = 1

SectionT = TypeVar("SectionT", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class ModelSpec(_Strict):
    """Which model to read, and how."""

    path: Path
    """Local model directory (config.json, *.safetensors weights and tokenizer files), or a Hugging
    Face repo id OWNER/NAME read from the local hub cache (HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub; fetch it beforehand with `hf download OWNER/NAME --revision REV`).
    An existing directory wins over a repo id of the same spelling. Nothing is downloaded."""
    revision: Annotated[str, Field(min_length=1)] | None = None
    """Branch, tag or full 40-hex commit of the repo id in model.path (unset: 'main'); job.json
    records the commit it resolved to. Only for repo ids: an error with a local directory."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and activations dtype. 'auto': float32 on a CPU, the checkpoint's dtype on a GPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' uses a CUDA GPU when there is one, else the CPU."""
    allow_pickle: bool = False
    """Load pickle checkpoints (pytorch_model.bin). Pickles can run code: off by default."""
    trust_remote_code: bool = False
    """Allow the model directory's own Python code (config auto_map). Off by default."""


class CorpusSpec(_Strict):
    """Where the documents come from."""

    kind: Literal["files", "jsonl", "parquet"] = "files"
    """'files': each path globs source files; 'jsonl'/'parquet': records with a text field."""
    paths: Annotated[list[str], Field(min_length=1)]
    """Globs (recursive '**' allowed), relative to the current directory."""
    text_field: str = "content"
    """JSONL/Parquet field holding the document text."""
    id_field: str = "path"
    """JSONL/Parquet field naming the document (its 'source' in docs.parquet)."""
    language_field: str | None = None
    """Optional JSONL/Parquet field with the programming language; files use their extension."""
    max_doc_bytes: Annotated[int, Field(gt=0)] = 8 << 20
    """Documents larger than this are skipped (listed in docs.parquet as 'too large')."""


class TokensSpec(_Strict):
    """How documents become model inputs."""

    window: Annotated[int, Field(ge=8)] = 1024
    """Most tokens one forward pass sees (including an added BOS)."""
    overlap: Annotated[int, Field(ge=0)] = 128
    """Tokens of preceding context carried into each window after a document's first."""
    add_bos: bool = True
    """Start every window with the tokenizer's BOS token (context only: it is not a row)."""

    @model_validator(mode="after")
    def _overlap_fits(self) -> TokensSpec:
        room = self.window - (1 if self.add_bos else 0)
        if self.overlap >= room:
            raise ValueError(
                f"overlap ({self.overlap}) must be smaller than window minus BOS ({room}), so each "
                "window emits new tokens"
            )
        return self


class LanguageTokenSet(_Strict):
    """A token set made from a programming language's own words, as its Pygments lexer lists them
    (any language Pygments knows: ``python``, ``javascript``, ``c``, ``perl``, ``bash``, ...).

    Each word counts the first token of its encoding after a space and at the start of a line
    (``" def"`` and ``"\\ndef"``), so both the usual spellings of the word in code are in the set.
    """

    keywords: str | None = None
    """Language whose keywords (and keyword constants such as ``True``, ``null``) join the set."""
    builtins: str | None = None
    """Language whose builtin names (``print``, ``len``; ``echo`` for bash) join the set."""
    exclusive: bool = False
    """Drop the ids any other set of the job also has, so that overlapping sets (``in`` is a
    keyword of Python and of JavaScript) do not count the same mass twice."""
    single_token: bool = False
    """Keep a word only where it is one whole token (``" const"``), not where the tokenizer
    splits it: the first piece of a split word (``"c"`` of ``"const"``, ``"_"`` of ``"_Bool"``)
    is a common token of every language and would swamp a detour measure."""

    @model_validator(mode="after")
    def _some_language(self) -> LanguageTokenSet:
        if self.keywords is None and self.builtins is None:
            raise ValueError("a language token set needs keywords: LANG and/or builtins: LANG")
        return self


def _token_set_kind(value: Any) -> str:
    return "[language]" if isinstance(value, dict | LanguageTokenSet) else "[list]"


TokenSetEntries = Annotated[
    Annotated[list[str | int], Tag("[list]")] | Annotated[LanguageTokenSet, Tag("[language]")],
    Discriminator(_token_set_kind),
]
"""A token set: a list of strings and ids, or a ``LanguageTokenSet`` mapping. The tags (in
brackets) keep errors to the form the user wrote; ``_format_error`` leaves them out."""


class LensSpec(_Strict):
    """What to compute per (token, layer)."""

    layers: Literal["all"] | list[Annotated[int, Field(ge=0)]] = "all"
    """'all' (0..L), or layer indices: 0 is the embedding output, l the output of block l."""
    k: Annotated[int, Field(ge=1, le=1024)] = 10
    """Top-k entries stored per row."""
    lookahead: list[Annotated[int, Field(ge=2)]] = [2, 3]
    """Offsets o >= 2: log-prob and rank of the token at i + o under each layer's lens."""
    kl_final: bool = True
    """Store KL(final || layer) in nats."""
    entropy: bool = True
    """Store the entropy of each layer's lens distribution in nats."""
    token_sets: dict[str, TokenSetEntries] = {}
    """Named token sets: log of the probability mass on the set per row (column set_<name>). A
    list: a string counts the first token of its encoding without special tokens, an int is a
    token id. A mapping ``{keywords: LANG}`` and/or ``{builtins: LANG}``: a language's words from
    its Pygments lexer (``LanguageTokenSet``). job.json records every set's ids and the overlaps
    between sets (``resolved.token_set_overlaps``)."""
    impl: Literal["auto", "torch", "triton", "triton-fused", "triton-chunked"] = "auto"
    """'auto': a Triton strategy on a CUDA GPU, the vocab-chunked torch path elsewhere. 'triton':
    the default strategy for the model's width and k; 'triton-fused' (one kernel: GEMM tiles with
    the statistics in their epilogue, k <= 64) or 'triton-chunked' (cuBLAS GEMM per row block and
    vocabulary chunk, then a fold kernel; any k) pick one. job.json records the one that ran."""
    precision: Literal["model", "fp32"] = "model"
    """How rows are multiplied by the unembedding. 'model': as the model's own head does, in the
    model's dtype (bf16/fp16 models: rows rounded to it, ~1e-2 nats from float64; the torch path
    rounds them on a GPU only) and, for fp32 models, through TF32 tensor cores in the Triton
    strategies on a GPU. 'fp32': IEEE fp32 products of unrounded rows in every implementation
    (~1e-5 nats; slower on a GPU). job.json records it with the rest of the spec."""
    sites: list[Literal["block", "attn"]] = ["block"]
    """Where in the residual stream to read: 'block' = the output of each block (layer 0 = the
    embeddings); 'attn' = inside block l right after its attention sublayer (h_{l-1} + attn_l, with
    the block's own post-attention norm / residual multiplier), for the selected layers l >= 1.
    Rows carry a 'site' column. 'attn' is refused for architectures whose attention and MLP run in
    parallel (GPT-NeoX with use_parallel_residual, CodeGen)."""
    router_topk: bool = False
    """Mixture-of-experts models: add a column router_topk with the experts block l's router chose
    for the token (as the router returned them; null on layer 0, on dense blocks and on attn rows),
    so lens statistics can be joined with routing. Refused for a model without routers."""
    decoder_blocks: Annotated[int, Field(ge=0)] = 0
    """n > 0: read each layer l < L - n through the model's last n blocks (run on the whole
    sequence with the model's own mask and positions) before the final norm and unembedding (the
    'last blocks as decoder' lens); layers >= L - n are read plainly. Costs (L - n) * n extra block
    forwards per batch (per selected layer below L - n and site). Must be smaller than L."""

    @field_validator("layers")
    @classmethod
    def _layers_unique(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("layers must name at least one layer, or be 'all'")
            if len(set(v)) != len(v):
                raise ValueError(f"layers must not repeat an index: {v}")
            return sorted(v)
        return v

    @field_validator("sites")
    @classmethod
    def _sites_unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("sites must name at least one site: block and/or attn")
        if len(set(v)) != len(v):
            raise ValueError(f"sites must not repeat: {v}")
        return [s for s in ("block", "attn") if s in v]

    @field_validator("lookahead")
    @classmethod
    def _lookahead_unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"lookahead offsets must not repeat: {v}")
        return v

    @field_validator("token_sets")
    @classmethod
    def _set_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name, entries in v.items():
            if not name.isidentifier():
                raise ValueError(
                    f"token set name {name!r} must be an identifier (letters, digits, '_'), since "
                    f"it becomes the column set_{name}"
                )
            if not entries:
                raise ValueError(f"token set {name!r} is empty")
        return v


class OutputSpec(_Strict):
    """Where and how results are written."""

    dir: Path = Path("runs/job")
    """Run directory (created). Rerunning the same job there resumes; a different job is refused."""
    shard_tokens: Annotated[int, Field(ge=1)] = 65536
    """Tokens per shard: the unit of work, of commit (one Parquet part file) and of resume."""


class ExecutionSpec(_Strict):
    """Where the work runs."""

    backend: Literal["local", "ray"] = "local"
    """'local': in this process, no Ray. 'ray': one actor per GPU on a Ray cluster."""
    workers: Annotated[int, Field(ge=1)] = 1
    """Ray actors to start (with GPUs: one per gpus_per_worker GPUs; this caps it if set)."""
    batch_tokens: Annotated[int, Field(ge=8)] = 8192
    """Most tokens (windows x padded length) in one forward pass."""
    ray_address: str | None = None
    """An existing Ray cluster's address; without it a local cluster starts and stops with the
    job."""
    gpus_per_worker: Annotated[int, Field(ge=1)] = 1
    """GPUs one worker's model is split over, for a model larger than one GPU. The embeddings go
    on the first GPU, the decoder blocks in contiguous ranges balanced by bytes over all N, the
    final norm and LM head on the last (the first when the LM head is the embedding matrix):
    every layer's residual rows are gathered there and the lens runs there. Local backend:
    cuda:0..N-1 of the visible GPUs. Ray: each actor reserves N GPUs of one node, so a node of G
    GPUs runs G // N actors. Needs model.device auto or cuda."""
    weights_memory_fraction: Annotated[float, Field(gt=0, le=1)] = 0.8
    """With gpus_per_worker > 1: the share of each GPU's memory the weights may take when the
    blocks are split; the rest is headroom for the CUDA context, one batch's activations, the
    capture buffer and the lens workspace (on the last GPU). A model that does not fit is refused
    before any weight is read, with its size and the GPUs it needs."""


class JobSpec(_Strict):
    """A logit-lens job (schema_version 1)."""

    schema_version: Literal[1] = 1
    """Version of this schema."""
    name: str = "job"
    """Free-form job name, recorded in job.json."""
    model: ModelSpec
    corpus: CorpusSpec
    tokens: TokensSpec = TokensSpec()
    lens: LensSpec = LensSpec()
    output: OutputSpec = OutputSpec()
    execution: ExecutionSpec = ExecutionSpec()

    @model_validator(mode="after")
    def _split_needs_gpus(self) -> JobSpec:
        if self.execution.gpus_per_worker > 1 and self.model.device == "cpu":
            raise ValueError(
                f"execution.gpus_per_worker ({self.execution.gpus_per_worker}) splits the model "
                "over GPUs, but model.device is 'cpu': set model.device to auto or cuda, or "
                "execution.gpus_per_worker to 1"
            )
        return self

    @model_validator(mode="after")
    def _window_fits_batch(self) -> JobSpec:
        if self.execution.batch_tokens < self.tokens.window:
            raise ValueError(
                f"execution.batch_tokens ({self.execution.batch_tokens}) must be at least "
                f"tokens.window ({self.tokens.window}): one window must fit in a batch"
            )
        return self

    def fingerprint(self) -> str:
        """Hash of everything that determines the rows (not where or how fast they are computed)."""
        relevant = self.model_dump(mode="json", include={"model", "corpus", "tokens", "lens"})
        relevant["model"].pop("device", None)
        if relevant["model"].get("revision") in (None, "main"):
            # Unset means main: the same job either way, and a spec written before model.revision
            # existed keeps its fingerprint (and so resumes its run directory).
            relevant["model"].pop("revision")
        if relevant["lens"].get("precision") == "model":
            relevant["lens"].pop("precision")  # the default: a spec from before it keeps its hash
        relevant["output"] = {"shard_tokens": self.output.shard_tokens}
        text = json.dumps(relevant, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _format_error(err: ValidationError, *, section: str = "", what: str = "job spec") -> str:
    lines = []
    for e in err.errors():
        parts = [str(p) for p in e["loc"] if not str(p).startswith("[")]  # union tags
        loc = ".".join([section] * bool(section) + parts) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `codelens schema` lists the allowed keys)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        value = e.get("input")
        shown = "" if e["type"] == "missing" else f" (got {value!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return f"invalid {what}:\n" + "\n".join(lines)


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """Parse ``a.b=value`` strings; values are YAML (``3``, ``true``, ``[1, 2]``, ``text``)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set lens.k=5")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise SpecError(f"--set {item!r}: the value is not valid YAML: {e}") from None
        parsed.append((key.strip().split("."), value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the raw spec ``data`` with ``--set`` overrides applied."""
    data = json.loads(json.dumps(data, default=str))
    for path, value in parse_overrides(overrides):
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"--set {'.'.join(path)}: {part!r} is not a section of the spec")
            node = child
        node[path[-1]] = value
    return data


def load_spec_data(path: Path) -> dict[str, Any]:
    """Read a YAML or JSON job file into a dict (raises SpecError)."""
    if not path.is_file():
        raise SpecError(
            f"job spec {path} does not exist (write one; `codelens schema` shows the fields)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML is a superset of JSON
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SpecError(f"job spec {path} is not valid YAML/JSON: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"job spec {path} must be a mapping of sections (model:, corpus:, ...)")
    return data


def validate_spec(data: dict[str, Any]) -> JobSpec:
    """Validate raw spec data (raises SpecError with one line per problem)."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_error(e)) from None


def validate_section(
    section: type[SectionT], data: dict[str, Any], name: str, *, what: str
) -> SectionT:
    """Validate one section of a job spec on its own (the notebook API's keyword arguments).

    Args:
        section: the section's model (``LensSpec``, ``TokensSpec``).
        data: its raw fields.
        name: its key in a job spec (``lens``): errors name ``lens.k`` as a job spec would.
        what: what the data came from, for the error's first line.

    Raises:
        SpecError: one line per problem, as :func:`validate_spec` reports them.
    """
    try:
        return section.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format_error(e, section=name, what=what)) from None


def load_spec(path: Path, overrides: list[str] | None = None) -> JobSpec:
    """Load, override and validate a job spec file."""
    return validate_spec(apply_overrides(load_spec_data(path), overrides or []))


def json_schema() -> dict[str, Any]:
    """The JSON Schema of JobSpec."""
    return JobSpec.model_json_schema()
