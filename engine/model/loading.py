"""Load a local model directory safely and check that the lens reproduces its logits.

``load_model(path)`` is the only way the engine gets a model:

0. **Source** (:func:`resolve_model_source`): ``path`` is a local directory, or a Hugging Face repo
   id (``OWNER/NAME``, with ``revision``) that names a snapshot in the *local* hub cache. The
   tokenizer-only load of the driver (:func:`load_tokenizer`) resolves through the same function.
1. **Pre-flight** (:func:`check_model_dir`), before anything is imported or executed: the path is an
   existing local directory with ``config.json``, safetensors weights (pickle checkpoints only
   with ``allow_pickle``), tokenizer files, and no ``auto_map`` (remote code) unless
   ``trust_remote_code``. Each problem is a :class:`ModelLoadError` naming the fix in job-spec
   terms.
2. **Offline load**: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` are set and every
   ``from_pretrained`` call passes ``local_files_only=True``, so nothing reaches the network.
   Checkpoint keys the model expects but the files lack are an error (transformers would otherwise
   initialise them randomly and only log it).
3. **Surgery**: :func:`codelens.engine.model.surgery.model_parts` finds the blocks and the ``Head``.
4. **Self-check** (:func:`run_self_check`): on a small right-padded batch of code, the lens at
   layer L (``head.logits`` of the last block's output, captured by ``ResidualCapture``) must equal
   the model's own logits to within the dtype's tolerance, else :class:`SelfCheckError`.

Attention: ``sdpa`` where the model class supports it, else ``eager`` (CodeGen, Gemma-2). Both give
the same logits at the real positions of a right-padded batch as an unpadded run (checked in
``tests/engine/model/test_loading.py``); with right padding no real position can attend to a pad
anyway.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from codelens.engine.errors import ModelLoadError, SelfCheckError
from codelens.engine.model.capture import ResidualCapture
from codelens.engine.model.placement import (
    NO_COMPUTE,
    DeviceBudget,
    Placement,
    check_placement,
    plan_placement,
    require_accelerate,
)
from codelens.engine.model.surgery import ModelParts, model_parts

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Accepted ``model.dtype`` values besides ``"auto"``."""

SELF_CHECK_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-4,
    torch.bfloat16: 2e-2,
    torch.float16: 5e-3,
}
"""Allowed ``max|lens_L - logits| / max(1, max|logits|)`` per model dtype.

Why these values: the lens computes the norm and the matmul in fp32 from the captured residual,
the model in its own dtype. In fp32 only the summation order differs (measured <= 3e-7 relative on
every tiny family; ~1e-6 expected at d = 4096), so 1e-4 leaves two orders of margin while a wrong
eps, bias, weight offset, soft-cap or scale shows up as >= 1e-2. In bf16 the model rounds the
normalised activations and the logits to 8 mantissa bits (unit roundoff 2^-9 ~ 2e-3): measured
2.2e-3 to 5.7e-3 across the 13 tiny families (CPU), so 2e-2 is a 3.5x margin. fp16 has 3 more
mantissa bits: measured 3.4e-4 to 6.6e-4, and 5e-3 keeps a similar margin.
"""

PROBE_TEXTS: tuple[str, ...] = (
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n",
    "import os\nprint(os.getcwd())\n",
)
"""Code the self-check runs through the model: two snippets, cut to different lengths."""

PROBE_LENGTHS: tuple[int, ...] = (24, 16)
"""Probe sequence ``b`` is cut to ``PROBE_LENGTHS[b]`` tokens (BOS included, if the tokenizer has
one). Different caps guarantee a padded batch: the first snippet is longer than 16 tokens in any
tokenizer."""

_TOKENIZER_FILE_SETS: tuple[tuple[str, ...], ...] = (
    ("tokenizer.json",),
    ("tokenizer.model",),
    ("vocab.json", "merges.txt"),
    ("vocab.txt",),
)
"""Any one complete set lets transformers build a tokenizer (fast, sentencepiece, GPT-2 BPE,
WordPiece)."""

_PICKLE_GLOBS: tuple[str, ...] = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
"""Weight files that are Python pickles (``torch.load``): can execute code when unpickled."""


@dataclass
class LoadedModel:
    """A model ready for the lens runner.

    Attributes:
        model: the HF causal LM, in eval mode, gradients off, on ``device`` in ``dtype`` (split
            over ``placement.devices`` when it has a placement).
        tokenizer: its tokenizer, loaded from the same directory.
        parts: decoder blocks and lens head (``codelens.engine.model.surgery``).
        family: ``parts.family``.
        dtype: the dtype the weights were loaded in.
        device: where the lens runs: the device of the final norm and LM head, where the captured
            residual rows are gathered (on one device: where the whole model lives).
        path: the resolved model directory.
        self_check_max_abs_err: ``max|lens_L - logits|`` the load-time self-check measured (NaN if
            the self-check was switched off).
        attn_implementation: the attention backend transformers was asked for (``sdpa``/``eager``).
        source: where the files came from (a local directory, or a repo's snapshot in the hub
            cache): what job.json records as ``resolved.model_source``.
        placement: how the model is split over several devices (``load_model(devices=...)``);
            None when it lives on one device.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    parts: ModelParts
    family: str
    dtype: torch.dtype
    device: torch.device
    path: Path
    self_check_max_abs_err: float
    attn_implementation: str | None = None
    source: ModelSource | None = None
    placement: Placement | None = None

    @property
    def input_device(self) -> torch.device:
        """Where the token ids go: the embeddings' device (``device`` unless the model is split)."""
        return self.device if self.placement is None else torch.device(self.placement.input_device)


@dataclass(frozen=True)
class ModelDirInfo:
    """What the pre-flight check found in a model directory.

    Attributes:
        path: the resolved directory.
        config: the parsed ``config.json``.
        use_safetensors: True when safetensors weights exist; False when only pickle
            checkpoints exist (and ``allow_pickle`` permitted them).
        weight_files: names of the weight files that will be read.
    """

    path: Path
    config: dict[str, Any]
    use_safetensors: bool
    weight_files: tuple[str, ...] = field(default_factory=tuple)


def _matching(directory: Path, patterns: tuple[str, ...]) -> list[str]:
    return sorted({p.name for pattern in patterns for p in directory.glob(pattern) if p.is_file()})


def check_model_dir(
    path: str | os.PathLike[str], *, allow_pickle: bool = False, trust_remote_code: bool = False
) -> ModelDirInfo:
    """Validate a model directory without importing or executing anything from it.

    Args:
        path: the model directory (``model.path`` of the job spec).
        allow_pickle: accept ``pytorch_model*.bin`` / ``*.pt`` checkpoints when no safetensors
            exist.
        trust_remote_code: accept a config or tokenizer config with an ``auto_map`` (custom code).

    Returns:
        The parsed config and the weight format to load.

    Raises:
        ModelLoadError: the first problem found, with what to do about it.
    """
    directory = Path(path).expanduser()
    if not directory.exists():
        raise ModelLoadError(
            f"model directory {str(directory)!r} does not exist. model.path must be a local "
            "directory with config.json, *.safetensors and tokenizer files, or a Hugging Face repo "
            "id OWNER/NAME in the local cache; models are never downloaded (fetch one first, e.g. "
            "`hf download OWNER/NAME`, or `hf download OWNER/NAME --local-dir DIR`)."
        )
    if not directory.is_dir():
        raise ModelLoadError(f"model.path {str(directory)!r} is a file, not a model directory.")
    directory = directory.resolve()

    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"{directory} has no config.json: it is not a HuggingFace model directory "
            "(expected config.json, *.safetensors and tokenizer files)."
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {config_file}: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file} does not hold a JSON object.")

    if not trust_remote_code:
        for name in ("config.json", "tokenizer_config.json"):
            remote = _read_json_or_empty(directory / name).get("auto_map")
            if remote:
                raise ModelLoadError(
                    f"{directory / name} declares custom code (auto_map: {remote}); loading it "
                    "would run Python files from the model directory. Set "
                    "`model.trust_remote_code: true` in the job spec if you trust them."
                )

    safetensors = _matching(directory, ("*.safetensors",))
    pickles = _matching(directory, _PICKLE_GLOBS)
    if safetensors:
        use_safetensors, weights = True, safetensors
    elif pickles and allow_pickle:
        use_safetensors, weights = False, pickles
    elif pickles:
        raise ModelLoadError(
            f"{directory} has only pickle weights ({', '.join(pickles)}), which can run arbitrary "
            "code when loaded. Convert them to safetensors, or set `model.allow_pickle: true` in "
            "the job spec to load them."
        )
    else:
        raise ModelLoadError(
            f"{directory} has config.json but no weights: expected model.safetensors or sharded "
            "model-*.safetensors (with model.safetensors.index.json)."
        )

    if not any(all((directory / f).is_file() for f in files) for files in _TOKENIZER_FILE_SETS):
        expected = " or ".join("+".join(files) for files in _TOKENIZER_FILE_SETS)
        present = _matching(
            directory, ("tokenizer*", "*vocab*", "merges.txt", "special_tokens_map.json")
        )
        raise ModelLoadError(
            f"{directory} has no tokenizer: expected {expected} (with tokenizer_config.json); "
            f"found {', '.join(present) if present else 'no tokenizer files'}."
        )
    return ModelDirInfo(directory, config, use_safetensors, tuple(weights))


def _read_json_or_empty(file: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


# --- where the model files are: a local directory or the local Hugging Face cache -----------------

DEFAULT_REVISION = "main"
"""The revision of a repo id when ``model.revision`` is not set (the hub's default branch)."""

_REPO_ID = re.compile(r"[\w](?:[\w.-]{0,94}[\w])?/[\w](?:[\w.-]{0,94}[\w])?", re.ASCII)
"""``OWNER/NAME`` as the hub allows them: ASCII letters, digits, ``_ . -``, neither end ``.``/``-``
(``huggingface_hub.utils.validate_repo_id``; ``--`` and ``..`` are refused separately)."""

_COMMIT = re.compile(r"[0-9a-f]{40}")
"""A full commit hash: the name of a snapshot directory in the hub cache."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are, and how ``model.path`` (and ``model.revision``) led there.

    Attributes:
        path: the directory to load: the local directory, or the repo's snapshot directory in the
            hub cache (its files are symlinks into the cache's ``blobs/``).
        repo_id: ``OWNER/NAME`` when ``model.path`` named a hub repo; None for a local directory.
        revision: the branch, tag or commit asked for (repo ids only).
        commit: the 40-hex commit of the snapshot (repo ids only): what pins the weights.
    """

    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    def record(self) -> dict[str, str]:
        """What job.json records under ``resolved.model_source``."""
        if self.repo_id is None:
            return {"path": str(self.path)}
        return {
            "repo_id": self.repo_id,
            "revision": str(self.revision),
            "commit": str(self.commit),
            "path": str(self.path),
        }


def hub_fetch_command(repo_id: str, revision: str) -> str:
    """The command that puts ``repo_id`` at ``revision`` into the hub cache of a machine with
    internet (huggingface_hub's ``hf`` CLI), for errors about a model that is not cached."""
    return f"hf download {repo_id} --revision {revision}"


def is_hub_repo_id(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a Hugging Face repo rather than a local directory.

    True when it is spelled ``OWNER/NAME`` with the characters the hub allows (so it does not
    start with ``.``, ``/`` or ``~``) and nothing exists at that path: an existing local
    directory always wins over a repo id of the same spelling. (A ``pathlib.Path``, such as the
    spec's ``model.path``, has already dropped a leading ``./``: a missing ``./a/b`` is read as the
    repo id ``a/b``, and its error says both that no such directory exists and what the cache
    holds.)
    """
    text = os.fspath(path)
    if not _REPO_ID.fullmatch(text) or "--" in text or ".." in text:
        return False
    return not Path(text).exists()


def hub_cache_dir() -> tuple[Path, str]:
    """The local hub cache directory and what chose it, read from the environment now.

    The precedence of ``huggingface_hub.constants`` (which reads it once, at import):
    ``HF_HUB_CACHE``, then the legacy ``HUGGINGFACE_HUB_CACHE``, then ``$HF_HOME/hub``, then
    ``$XDG_CACHE_HOME/huggingface/hub``, then ``~/.cache/huggingface/hub``. A variable set to the
    empty string counts as unset.

    Returns:
        The directory (``~`` and ``$VARS`` expanded) and a phrase saying which variable set it.
    """

    def expand(value: str) -> Path:
        return Path(os.path.expandvars(os.path.expanduser(value)))

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return expand(os.environ[name]), f"from {name}"
    for name, below in (("HF_HOME", "hub"), ("XDG_CACHE_HOME", "huggingface/hub")):
        if os.environ.get(name):
            return expand(os.environ[name]) / below, f"from {name}, HF_HUB_CACHE unset"
    return expand("~/.cache/huggingface/hub"), "the default: HF_HUB_CACHE and HF_HOME unset"


def resolve_model_source(path: str | os.PathLike[str], revision: str | None = None) -> ModelSource:
    """Find the directory ``model.path`` (and ``model.revision``) means, without any download.

    A local directory (or anything that is not spelled like a repo id) is returned as it is, for
    :func:`check_model_dir` to check. A repo id ``OWNER/NAME`` is looked up in the local hub cache
    (:func:`hub_cache_dir`): ``models--OWNER--NAME/refs/<revision>`` holds the commit of a branch
    or tag, and ``snapshots/<commit>/`` holds the files; a 40-hex revision names the snapshot
    directly. Only the file system is read: nothing reaches the network.

    Args:
        path: ``model.path``: a local directory or a repo id.
        revision: ``model.revision``: a branch, tag or full commit hash of a repo id (None:
            ``main``); an error with a local directory.

    Raises:
        ModelLoadError: a revision given with a local directory, or the repo (at that revision)
            is not in the local cache: the message says where it looked, what it found there and
            how to fetch the model beforehand.
    """
    if not is_hub_repo_id(path):
        if revision is not None:
            raise ModelLoadError(
                f"model.revision is {revision!r} but model.path {os.fspath(path)!r} is a local "
                "path, not a Hugging Face repo id (OWNER/NAME): a revision only selects a "
                "snapshot of a repo in the hub cache. Remove model.revision, or set model.path "
                "to the repo id."
            )
        return ModelSource(Path(path))
    repo_id = os.fspath(path)
    revision = DEFAULT_REVISION if revision is None else revision
    if not revision.strip() or revision.startswith("/") or ".." in revision or "\\" in revision:
        raise ModelLoadError(
            f"model.revision {revision!r} is not a branch, tag or commit name (it must not be "
            "empty or contain '..', a leading '/' or a backslash)."
        )
    cache, chosen_by = hub_cache_dir()
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    fetch = (
        "Models are never downloaded: fetch it beforehand on a machine with internet, "
        f"`{hub_fetch_command(repo_id, revision)}` (it fills that machine's cache; copy the "
        f"{repo_dir.name} folder into {cache}, or point HF_HUB_CACHE at a copied hub cache), or "
        "set model.path to a local model directory."
    )
    if not repo_dir.is_dir():
        found = _cached_repos(cache, repo_dir.name)
        raise ModelLoadError(
            f"model.path {repo_id!r} does not exist as a local directory, and as a Hugging Face "
            f"repo id it is not in the local cache: looked in the hub cache {cache} ({chosen_by}), "
            f"found {found}. {fetch}"
        )
    commit = revision if _COMMIT.fullmatch(revision) else _read_ref(repo_dir / "refs" / revision)
    snapshot = repo_dir / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        asked = f"revision {revision!r}" + (f" (commit {commit})" if commit else "")
        raise ModelLoadError(
            f"the Hugging Face repo {repo_id} is in the hub cache {cache} ({chosen_by}) but not "
            f"at {asked}: {_cached_revisions(repo_dir)}. A commit must be given as its full "
            f"40-hex hash. {fetch}"
        )
    return ModelSource(snapshot, repo_id, revision, commit)


def _read_ref(ref_file: Path) -> str | None:
    """The commit a ``refs/<name>`` file of the hub cache holds, or None without a valid one."""
    try:
        commit = ref_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return commit if _COMMIT.fullmatch(commit) else None


def _cached_revisions(repo_dir: Path) -> str:
    """What a cached repo holds: its refs (name -> commit) and its snapshot commits."""
    refs_dir = repo_dir / "refs"
    refs = sorted(
        f"{ref.relative_to(refs_dir).as_posix()} -> {_read_ref(ref) or 'no valid commit'}"
        for ref in (refs_dir.rglob("*") if refs_dir.is_dir() else ())
        if ref.is_file()
    )
    snapshots_dir = repo_dir / "snapshots"
    snapshots = sorted(
        p.name for p in (snapshots_dir.iterdir() if snapshots_dir.is_dir() else ()) if p.is_dir()
    )
    return (
        f"its refs are {', '.join(refs) if refs else 'none'}; "
        f"its snapshots are {', '.join(snapshots) if snapshots else 'none'}"
    )


def _cached_repos(cache: Path, missing: str, most: int = 8) -> str:
    """What a hub cache holds, for an error about the repo folder ``missing`` it lacks: the
    models it does hold (which shows a misspelled repo id)."""
    if not cache.is_dir():
        return "that the directory does not exist"
    repos = sorted(
        p.name.removeprefix("models--").replace("--", "/")
        for p in cache.iterdir()
        if p.name.startswith("models--") and p.is_dir()
    )
    if not repos:
        return f"no {missing} folder and no cached models there"
    shown = ", ".join(repos[:most]) + (
        f" and {len(repos) - most} more" if len(repos) > most else ""
    )
    return f"no {missing} folder there (it holds {shown})"


def _check_source(
    source: ModelSource, *, allow_pickle: bool, trust_remote_code: bool
) -> ModelDirInfo:
    """:func:`check_model_dir` on the source's directory; a snapshot's problem names its repo."""
    try:
        return check_model_dir(
            source.path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
        )
    except ModelLoadError as exc:
        if source.repo_id is None:
            raise
        raise ModelLoadError(
            f"{source.repo_id} at revision {source.revision!r} (cached snapshot {source.commit}): "
            f"{exc} If files are missing, the download was partial: "
            f"`{hub_fetch_command(source.repo_id, str(source.revision))}` fetches the rest."
        ) from exc


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; ``"cpu"``; ``"cuda"`` / ``"cuda:N"`` (must exist).

    Raises:
        ModelLoadError: CUDA requested but not available, or an unknown device string.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"model.device {device!r} is not one of auto, cpu, cuda") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"model.device is {device!r} but no CUDA device is visible; use `model.device: auto` "
            "or `cpu`."
        )
    if resolved.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"model.device {device!r} is not one of auto, cpu, cuda")
    return resolved


def resolve_dtype(
    dtype: str | torch.dtype, config: dict[str, Any], device: torch.device
) -> torch.dtype:
    """Pick the dtype to load the weights in.

    ``"auto"`` on a CPU is float32: CPU half-precision matmuls are slow, and the point of a CPU run
    is usually a small, exact check. On CUDA it is the config's ``dtype`` (``torch_dtype`` in older
    configs) when that is a float type, else bfloat16; bfloat16 becomes float16 on GPUs without
    bf16 support.

    Args:
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``.
        config: the parsed ``config.json``.
        device: the resolved device.

    Raises:
        ModelLoadError: an unknown dtype name.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in SELF_CHECK_TOLERANCE:
            raise ModelLoadError(f"model.dtype {dtype} is not one of auto, {', '.join(DTYPES)}")
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ModelLoadError(f"model.dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    declared = config.get("dtype") or config.get("torch_dtype")
    chosen = DTYPES.get(str(declared).removeprefix("torch."), torch.bfloat16)
    if chosen is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        chosen = torch.float16
    return chosen


TRANSFORMERS_SUPPORTED = ">=5.0"
"""transformers releases we load models with (pyproject.toml's floor): ``from_pretrained(dtype=)``
and the bundled tokenizer's ``TokenizersBackend`` class need 5.x."""


def require_transformers() -> None:
    """Raise ModelLoadError if the installed transformers is outside ``TRANSFORMERS_SUPPORTED``."""
    import transformers
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    installed = transformers.__version__
    if not SpecifierSet(TRANSFORMERS_SUPPORTED).contains(Version(installed), prereleases=True):
        wanted = f"transformers{TRANSFORMERS_SUPPORTED}"
        raise ModelLoadError(
            f"transformers {installed} is installed, but code-llm-lens needs {wanted}: "
            f"pip install '{wanted}' (or run ./install.sh, which installs the tested versions)"
        )


def _go_offline() -> None:
    """Make every hub call in this process (and its children) fail instead of downloading."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; update the cached flag too.
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True


def _attn_implementation(config_obj: Any, raw_config: dict[str, Any]) -> str | None:
    """``sdpa`` if the model class supports it, else ``eager``; None (transformers decides) for
    custom-code classes, whose support the auto mapping cannot tell."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if "AutoModelForCausalLM" in (raw_config.get("auto_map") or {}):
        return None
    if getattr(config_obj, "attn_logit_softcapping", None):
        # SDPA cannot soft-cap attention scores (Gemma-2), and some transformers releases (5.0)
        # still pick it for such a model: eager computes the model as it was trained.
        return "eager"
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config_obj)]
    except KeyError:
        return None
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def _load_tokenizer(path: Path, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {exc}") from exc


def load_tokenizer(
    path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """Load only the tokenizer of a model, after the same resolution and pre-flight checks.

    Planning a job (tokenizing the corpus into shards) needs the tokenizer but not the weights, so
    a finished job's rerun, or a plan, never pays for loading the model.

    Args:
        path: a local model directory or a repo id in the local hub cache (as for
            :func:`load_model`).
        revision: the repo id's branch, tag or commit (see :func:`resolve_model_source`).

    Raises:
        ModelLoadError: the model cannot be found (see ``resolve_model_source``) or is not a
            loadable model directory (see ``check_model_dir``).
    """
    source = resolve_model_source(path, revision)
    info = _check_source(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    require_transformers()
    _go_offline()
    return _load_tokenizer(info.path, trust_remote_code)


def auto_model_class(config: Any) -> Any:
    """The transformers auto class that builds ``config``'s model: ``AutoModelForCausalLM``, or
    for a multimodal checkpoint whose model type has no causal-LM class (Mistral 3)
    ``AutoModelForImageTextToText``, whose text tower the lens reads (the model then runs on text
    only). A config neither maps falls to ``AutoModelForCausalLM``, which names the problem."""
    import transformers
    from transformers.models.auto import modeling_auto

    causal = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    image_text = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    model_type = getattr(config, "model_type", None)
    if model_type not in causal and model_type in image_text:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def load_model(
    path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    self_check: bool = True,
    devices: Sequence[DeviceBudget] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Load model and tokenizer from local files, build the lens parts, run the self-check.

    The weights are read straight onto their device in ``dtype`` (``from_pretrained`` with a
    ``device_map``): no full copy on the CPU first. On a CPU nothing changes (no device map).

    Args:
        path: a local model directory, or a Hugging Face repo id (``OWNER/NAME``) whose snapshot is
            in the local hub cache (:func:`resolve_model_source`; nothing is downloaded).
        revision: the repo id's branch, tag or 40-hex commit (None: ``main``); only for repo ids.
        dtype: ``"auto"`` (see :func:`resolve_dtype`), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``. With ``devices``, ``"auto"`` or the kind of
            device the model is split over.
        allow_pickle: permit ``pytorch_model*.bin`` / ``*.pt`` weights when no safetensors exist.
        trust_remote_code: permit the directory's custom modeling / tokenizer code (``auto_map``).
        self_check: run :func:`run_self_check` (keep on: it is what guarantees the lens at layer L
            equals the model's logits).
        devices: split the model over these devices, in forward order, each with its weight
            budget (``placement.gpu_budgets(n)`` for ``execution.gpus_per_worker: n``): the
            embeddings on the first, contiguous block ranges, the lens head on the last
            (``placement.plan_device_map``). A device may also be accelerate's ``"disk"``, whose
            weights are kept in ``offload_folder`` and read in for each forward pass.
        offload_folder: where ``"disk"`` devices keep their weights.

    Returns:
        The loaded model, tokenizer, parts and what the self-check measured.

    Raises:
        ModelLoadError: the model is not found (a repo id not in the local cache), the directory
            cannot be loaded safely, the installed transformers (or, off the CPU, accelerate) is
            outside its supported range, transformers fails to load it, or it does not fit
            ``devices``.
        UnsupportedArchitectureError: the model class has no model-surgery entry.
        SelfCheckError: the lens at layer L does not reproduce the model's logits.
    """
    source = resolve_model_source(path, revision)
    info = _check_source(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    require_transformers()
    resolved_device = resolve_device(device if devices is None else _split_device(device, devices))
    resolved_dtype = resolve_dtype(dtype, info.config, resolved_device)
    _go_offline()

    # Imported here, after going offline, so that a first import of the auto classes also sees it.
    from transformers import AutoConfig

    common = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    try:
        config_obj = AutoConfig.from_pretrained(info.path, **common)
    except Exception as exc:  # transformers raises ValueError/KeyError/OSError for unknown types
        raise ModelLoadError(
            f"transformers cannot read {info.path / 'config.json'} "
            f"(model_type {info.config.get('model_type')!r}): {exc}"
        ) from exc
    tokenizer = _load_tokenizer(info.path, trust_remote_code)

    attn = _attn_implementation(config_obj, info.config)
    placement = None
    if devices is not None:
        placement = plan_placement(
            config_obj,
            devices,
            dtype=resolved_dtype,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn,
        )
        resolved_device = torch.device(placement.head_device)
    where = _device_map_kwargs(resolved_device, placement, offload_folder)
    try:
        model, loading_info = auto_model_class(config_obj).from_pretrained(
            info.path,
            config=config_obj,
            dtype=resolved_dtype,
            use_safetensors=info.use_safetensors,
            attn_implementation=attn,
            output_loading_info=True,
            **where,
            **common,
        )
    except Exception as exc:
        hint = ""
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            hint = (
                " (out of GPU memory: split the model over several GPUs with "
                "execution.gpus_per_worker, or load a smaller model.dtype)"
            )
        raise ModelLoadError(
            f"cannot load the model weights from {info.path}: {exc}{hint}"
        ) from exc
    problems = {
        "missing": sorted(loading_info.get("missing_keys") or ()),
        "shape-mismatched": sorted(str(k) for k in loading_info.get("mismatched_keys") or ()),
    }
    if any(problems.values()):
        # transformers would run with these randomly initialised; a lens over them is meaningless.
        detail = "; ".join(f"{k}: {', '.join(v[:8])}" for k, v in problems.items() if v)
        raise ModelLoadError(f"the checkpoint in {info.path} does not fit its config ({detail}).")

    model.eval()
    model.requires_grad_(False)  # inference only; also keeps autograd out of Head tensors
    parts = model_parts(model)
    if placement is not None:
        check_placement(model, parts, placement)

    err = math.nan
    if self_check:
        input_device = resolved_device if placement is None else placement.input_device
        input_ids, attention_mask = probe_batch(tokenizer, parts.head.vocab_size, input_device)
        err = run_self_check(model, parts, input_ids, attention_mask)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        parts=parts,
        family=parts.family,
        dtype=resolved_dtype,
        device=resolved_device,
        path=info.path,
        self_check_max_abs_err=err,
        attn_implementation=attn,
        source=dataclasses.replace(source, path=info.path),
        placement=placement,
    )


def _split_device(device: str | torch.device, devices: Sequence[DeviceBudget]) -> torch.device:
    """The kind of device a split model computes on (for the dtype choice), checked against
    ``model.device``.

    Raises:
        ModelLoadError: no device that computes, or ``device`` names another kind.
    """
    compute = [torch.device(b.device) for b in devices if b.device not in NO_COMPUTE]
    if not compute:
        raise ModelLoadError(
            f"devices {[b.device for b in devices]} hold weights but none computes: add a GPU"
        )
    kinds = {d.type for d in compute}
    if str(device) != "auto" and torch.device(device).type not in kinds:
        raise ModelLoadError(
            f"model.device is {str(device)!r}, but the model is to be split over "
            f"{', '.join(b.device for b in devices)}: set model.device: auto (or cuda), or "
            "execution.gpus_per_worker: 1"
        )
    return compute[-1]


def _device_map_kwargs(
    device: torch.device,
    placement: Placement | None,
    offload_folder: str | os.PathLike[str] | None,
) -> dict[str, Any]:
    """``from_pretrained`` arguments that read the weights straight onto their device(s).

    A split gets its placement's device map; one GPU gets ``{"": device}`` (each weight read
    onto it in the target dtype, never assembled on the CPU first); the CPU gets nothing, as
    before (transformers' default is the CPU).

    Raises:
        ModelLoadError: accelerate (which transformers needs for a device map) is missing or too
            old, or a ``"disk"`` device has no ``offload_folder``.
    """
    if placement is not None:
        require_accelerate()
        if "disk" in placement.devices and offload_folder is None:
            raise ModelLoadError("a placement with a 'disk' device needs an offload_folder")
        extra = {} if offload_folder is None else {"offload_folder": str(offload_folder)}
        return {"device_map": dict(placement.device_map), **extra}
    if device.type == "cpu":
        return {}
    require_accelerate()
    return {"device_map": {"": device}}


def probe_batch(
    tokenizer: PreTrainedTokenizerBase,
    vocab_size: int,
    device: torch.device | str = "cpu",
    texts: tuple[str, ...] = PROBE_TEXTS,
    lengths: tuple[int, ...] = PROBE_LENGTHS,
) -> tuple[Tensor, Tensor]:
    """Tokenize ``texts`` into a right-padded batch.

    Sequence ``b`` is ``[BOS] + tokens(texts[b])`` (BOS if the tokenizer has one) cut to
    ``lengths[b]`` tokens.

    Args:
        tokenizer: the model's tokenizer.
        vocab_size: unembedding rows V; every probe id must be below it.
        device: where to put the tensors.
        texts: the probe texts (batch size B = ``len(texts)``).
        lengths: per-sequence length caps (same length as ``texts``).

    Returns:
        ``input_ids [B, S]`` (pads filled with the pad, else EOS, else 0 id) and
        ``attention_mask [B, S]`` (1 = real token).

    Raises:
        ModelLoadError: the tokenizer produces ids the model has no embedding for.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    seqs = [
        (bos + tokenizer(text, add_special_tokens=False)["input_ids"])[:cap]
        for text, cap in zip(texts, lengths, strict=True)
    ]
    too_big = sorted({i for seq in seqs for i in seq if i >= vocab_size})
    if too_big:
        raise ModelLoadError(
            f"the tokenizer produces ids {too_big[:5]} but the model has only {vocab_size} "
            "vocabulary rows: the tokenizer does not belong to this model."
        )
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    seq_len = max(len(seq) for seq in seqs)
    input_ids = torch.full((len(seqs), seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), seq_len), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids.to(device), attention_mask.to(device)


def self_check_tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance of :func:`run_self_check` for a model in ``dtype``."""
    return SELF_CHECK_TOLERANCE.get(dtype, SELF_CHECK_TOLERANCE[torch.bfloat16])


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def run_self_check(
    model: nn.Module,
    parts: ModelParts,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    tolerance: float | None = None,
) -> float:
    """Check that the lens at layer L reproduces the model's own logits.

    Runs one forward pass with ``ResidualCapture`` on layer ``L`` (the last block's output, before
    the final norm) and compares ``parts.head.logits(h_L)`` with ``model(...).logits`` in float32,
    at the real (unmasked) positions.

    Args:
        model: the HF causal LM ``parts`` was built from.
        parts: its ``ModelParts``.
        input_ids: ``[B, S]`` token ids.
        attention_mask: ``[B, S]``, 1 for real tokens (right padding); None = all real.
        tolerance: allowed ``max|diff| / max(1, max|logits|)``; default by the model's dtype
            (``SELF_CHECK_TOLERANCE``).

    Returns:
        ``max|lens_L - logits|`` over real positions and all V vocabulary rows.

    Raises:
        SelfCheckError: the difference exceeds the tolerance, or either side is not finite.
    """
    dtype = _model_dtype(model)
    tol = self_check_tolerance(dtype) if tolerance is None else tolerance
    batch, seq_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    n_layers = parts.n_layers
    capture = ResidualCapture(parts.blocks, [n_layers])
    # The lens runs where the head is (the last device of a split model; the inputs' otherwise).
    lens_device = parts.head.unembed.device
    with torch.inference_mode():
        # The buffer is fp32: the copy from bf16/fp16 is exact, and the head normalises in fp32.
        with capture.recording(
            batch, seq_len, parts.head.d_model, torch.float32, lens_device
        ) as buffer:
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits
        h_last = buffer[0].view(batch, seq_len, parts.head.d_model)  # [B, S, d]
        lens = parts.head.logits(h_last)  # [B, S, V]
    real = attention_mask.bool().to(lens_device)
    model_logits = logits.float().to(lens_device)[real]  # [n_real, V]
    lens_logits = lens[real]
    if model_logits.shape != lens_logits.shape:
        raise SelfCheckError(
            f"{_describe(model, parts)}: the model returns logits of shape {tuple(logits.shape)} "
            f"but the head has V = {parts.head.vocab_size}; {_hint(model, parts)}"
        )
    err = (lens_logits - model_logits).abs().max().item()
    scale = model_logits.abs().max().item()
    bound = tol * max(1.0, scale)
    if not err <= bound:  # also true for NaN
        raise SelfCheckError(
            f"{_describe(model, parts)} in {dtype}: the lens at the last layer differs from the "
            f"model's logits by up to {err:.3g} (max |logit| {scale:.3g}; allowed {bound:.3g} = "
            f"{tol:g} x max(1, max |logit|)). {_hint(model, parts)}"
        )
    return err


def _describe(model: nn.Module, parts: ModelParts) -> str:
    return f"{type(model).__name__} (family {parts.family!r})"


def _hint(model: nn.Module, parts: ModelParts) -> str:
    head = parts.head
    where = (
        f"The model-surgery entry for {type(model).__name__} in engine/model/surgery.py does not "
        "match this model"
        if parts.head_source == "table"
        else f"{type(model).__name__} has no model-surgery entry, and what the general rule found "
        "(engine/model/surgery.py discover_family) does not reproduce its logits, so it is "
        "refused rather than guessed; add an entry to SUPPORTED for it"
    )
    return (
        f"{where}: check the final norm ({head.norm.kind.value}, eps {head.norm.eps:g}, "
        f"weight offset {head.norm.weight_offset:g}, bias {head.norm.bias is not None}), the "
        f"unembedding bias ({head.unembed_bias is not None}), the soft-cap ({head.softcap}) and "
        f"the logit scale ({head.logit_scale:g}) against {type(model).__name__}.forward."
    )
