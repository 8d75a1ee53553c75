"""Models by repo id from the local Hugging Face cache: resolution, errors, and a job that uses one.

Every test builds its own cache layout under ``tmp_path`` (``models--OWNER--NAME/refs/<name>``
holding a commit, ``snapshots/<commit>/`` holding the files as symlinks into ``blobs/``, as
huggingface_hub writes them) and points the cache variables at it: nothing is downloaded and the
machine's own cache is never read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from codelens.engine.errors import ModelLoadError
from codelens.engine.model.loading import (
    hub_cache_dir,
    is_hub_repo_id,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from codelens.workers.job import run_job

REPO = "codelens-test/tiny-llama"
MAIN = "0123456789abcdef0123456789abcdef01234567"
TAGGED = "fedcba9876543210fedcba9876543210fedcba98"
CACHE_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


def cache_repo(cache: Path, model_dir: Path, refs: dict[str, str], repo: str = REPO) -> Path:
    """Put ``model_dir``'s files into ``cache`` as huggingface_hub lays out a download of ``repo``:
    one snapshot per distinct commit of ``refs`` (name -> commit), files linked to ``blobs/``."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    for name, commit in refs.items():
        ref = repo_dir / "refs" / name
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)  # huggingface_hub writes the hash without a newline
        snapshot = repo_dir / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for file in model_dir.iterdir():
            blob = blobs / f"{commit[:8]}-{file.name}"
            shutil.copyfile(file, blob)
            (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    return repo_dir


@pytest.fixture
def no_cache_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """Every cache variable unset and HOME in ``tmp_path``: the default cache is a temp dir."""
    for name in CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


@pytest.fixture
def hub_cache(no_cache_env: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir) -> Path:
    """A hub cache holding REPO (tiny llama) at refs main -> MAIN and v1 -> TAGGED, set as
    HF_HUB_CACHE."""
    cache = tmp_path / "hub"
    cache_repo(cache, tiny_model_dir("llama"), {"main": MAIN, "v1": TAGGED})
    no_cache_env.setenv("HF_HUB_CACHE", str(cache))
    return cache


# --- resolution ----------------------------------------------------------------------------------


def test_repo_id_resolves_to_the_snapshot_of_main(hub_cache: Path) -> None:
    source = resolve_model_source(REPO)
    snapshot = hub_cache / "models--codelens-test--tiny-llama" / "snapshots" / MAIN
    assert source.path == snapshot and source.commit == MAIN
    assert source.record() == {
        "repo_id": REPO,
        "revision": "main",
        "commit": MAIN,
        "path": str(snapshot),
    }
    assert resolve_model_source(Path(REPO), "main") == source  # the spec's model.path is a Path


def test_repo_id_resolves_a_tag_and_a_commit(hub_cache: Path) -> None:
    tagged = resolve_model_source(REPO, "v1")
    assert tagged.commit == TAGGED and tagged.path.name == TAGGED and tagged.revision == "v1"
    by_commit = resolve_model_source(REPO, MAIN)
    assert by_commit.commit == MAIN and by_commit.revision == MAIN


def test_load_model_and_tokenizer_by_repo_id(hub_cache: Path) -> None:
    loaded = load_model(REPO, revision="v1", device="cpu")
    assert loaded.family == "llama" and loaded.source is not None
    assert loaded.source.commit == TAGGED and loaded.path == loaded.source.path
    assert loaded.path.parent.name == "snapshots"
    tokenizer = load_tokenizer(REPO)
    assert tokenizer("def f(): pass")["input_ids"] == loaded.tokenizer("def f(): pass")["input_ids"]


def test_cache_dir_precedence(no_cache_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert hub_cache_dir()[0] == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    no_cache_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache_dir()[0] == tmp_path / "xdg" / "huggingface" / "hub"
    no_cache_env.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert hub_cache_dir() == (tmp_path / "hf-home" / "hub", "from HF_HOME, HF_HUB_CACHE unset")
    no_cache_env.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert hub_cache_dir()[0] == tmp_path / "legacy"
    no_cache_env.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hub_cache_dir() == (tmp_path / "hub", "from HF_HUB_CACHE")


def test_repo_id_found_through_hf_home(
    no_cache_env: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir
) -> None:
    cache_repo(tmp_path / "hf-home" / "hub", tiny_model_dir("llama"), {"main": MAIN})
    no_cache_env.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert resolve_model_source(REPO).path == (
        tmp_path / "hf-home" / "hub" / "models--codelens-test--tiny-llama" / "snapshots" / MAIN
    )


def test_a_local_directory_wins_over_a_repo_id_of_the_same_spelling(
    hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir
) -> None:
    work = tmp_path / "work"
    shutil.copytree(tiny_model_dir("llama"), work / REPO)
    monkeypatch.chdir(work)
    assert not is_hub_repo_id(REPO)
    source = resolve_model_source(REPO)
    assert source.repo_id is None and source.record() == {"path": REPO}
    assert load_model(REPO, device="cpu", self_check=False).path == work / REPO


def test_what_is_spelled_like_a_repo_id(no_cache_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    no_cache_env.chdir(tmp_path)  # where none of these names exists
    for repo_id in (REPO, "Qwen/Qwen2.5-Coder-7B", "bigcode/starcoder2_3b", "a/b"):
        assert is_hub_repo_id(repo_id), repo_id
    for other in ("./a/b", "/a/b", "~/a/b", "../a/b", "a/b/c", "name", "a--b/c", "a/b.", "a/-b"):
        assert not is_hub_repo_id(other), other


# --- errors ---------------------------------------------------------------------------------------


def test_a_repo_that_is_not_cached(hub_cache: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model("Qwen/Qwen2.5-Coder-7B", device="cpu")
    message = str(info.value)
    assert "'Qwen/Qwen2.5-Coder-7B' does not exist as a local directory" in message
    assert f"{hub_cache} (from HF_HUB_CACHE)" in message
    assert "no models--Qwen--Qwen2.5-Coder-7B folder there (it holds codelens-test/tiny-llama)" in (
        message
    )
    assert "`hf download Qwen/Qwen2.5-Coder-7B --revision main`" in message
    assert "HF_HUB_CACHE" in message and "never downloaded" in message


def test_no_cache_at_all_names_the_default_cache(no_cache_env, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_tokenizer(REPO, revision="v2")
    message = str(info.value)
    default = tmp_path / "home" / ".cache" / "huggingface" / "hub"
    assert f"{default} (the default: HF_HUB_CACHE and HF_HOME unset)" in message
    assert "found that the directory does not exist" in message
    assert f"`hf download {REPO} --revision v2`" in message


def test_a_cached_repo_without_that_revision_lists_what_is_there(hub_cache: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        resolve_model_source(REPO, "v2")
    message = str(info.value)
    assert (
        f"{REPO} is in the hub cache {hub_cache} (from HF_HUB_CACHE)" in message
        and "not at revision 'v2'" in message
    )
    assert f"its refs are main -> {MAIN}, v1 -> {TAGGED}" in message
    assert f"its snapshots are {MAIN}, {TAGGED}" in message
    assert f"`hf download {REPO} --revision v2`" in message
    missing_commit = "9" * 40
    with pytest.raises(ModelLoadError, match=f"not at revision '{missing_commit}'"):
        resolve_model_source(REPO, missing_commit)
    with pytest.raises(ModelLoadError, match="full 40-hex hash"):
        resolve_model_source(REPO, MAIN[:7])  # a short hash names no snapshot


def test_a_ref_to_a_missing_snapshot(hub_cache: Path) -> None:
    shutil.rmtree(hub_cache / "models--codelens-test--tiny-llama" / "snapshots" / TAGGED)
    with pytest.raises(ModelLoadError) as info:
        resolve_model_source(REPO, "v1")
    assert f"not at revision 'v1' (commit {TAGGED})" in str(info.value)
    assert f"its snapshots are {MAIN}." in str(info.value)


def test_a_partial_snapshot_names_the_repo_and_the_fetch(hub_cache: Path) -> None:
    snapshot = hub_cache / "models--codelens-test--tiny-llama" / "snapshots" / MAIN
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as info:
        load_model(REPO, device="cpu")
    message = str(info.value)
    assert message.startswith(f"{REPO} at revision 'main' (cached snapshot {MAIN}):")
    assert "no weights" in message and f"`hf download {REPO} --revision main`" in message


def test_a_revision_with_a_local_directory(tiny_model_dir) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(tiny_model_dir("llama"), revision="main", device="cpu")
    message = str(info.value)
    assert "model.revision is 'main'" in message and "is a local path" in message
    assert "Remove model.revision, or set model.path to the repo id" in message


def test_a_revision_that_would_leave_the_refs_folder(hub_cache: Path) -> None:
    for bad in ("../../etc", "/main", "", "  "):
        with pytest.raises(ModelLoadError, match="is not a branch, tag or commit name"):
            resolve_model_source(REPO, bad)


# --- jobs -----------------------------------------------------------------------------------------


def test_a_job_by_repo_id_records_the_commit(
    hub_cache: Path, tmp_path: Path, write_corpus, job_spec, read_rows
) -> None:
    corpus = write_corpus(tmp_path / "corpus", {"a.py": "def add(a, b):\n    return a + b\n"})
    job = {"tokens": {"window": 64, "overlap": 8}, "execution": {"batch_tokens": 128}}
    spec = job_spec(REPO, corpus, tmp_path / "run", job, model={"revision": "v1"})
    assert spec.model.path == Path(REPO) and spec.model.revision == "v1"
    outcome = run_job(spec, show_progress=False)
    assert outcome.state == "done" and outcome.tokens_run > 0
    recorded = json.loads((tmp_path / "run" / "job.json").read_text())
    snapshot = hub_cache / "models--codelens-test--tiny-llama" / "snapshots" / TAGGED
    assert recorded["resolved"]["model_source"] == {
        "repo_id": REPO,
        "revision": "v1",
        "commit": TAGGED,
        "path": str(snapshot),
    }
    assert recorded["spec"]["model"]["path"] == REPO  # the spec keeps what the user wrote
    assert len(read_rows(tmp_path / "run")["layer"]) > 0


def test_a_job_by_local_directory_records_its_path(
    tmp_path: Path, tiny_model_dir, write_corpus, job_spec
) -> None:
    corpus = write_corpus(tmp_path / "corpus", {"a.py": "x = 1\n"})
    job = {"tokens": {"window": 64, "overlap": 8}, "execution": {"batch_tokens": 128}}
    run_job(job_spec(tiny_model_dir("gpt2"), corpus, tmp_path / "run", job), show_progress=False)
    recorded = json.loads((tmp_path / "run" / "job.json").read_text())
    assert recorded["resolved"]["model_source"] == {"path": str(tiny_model_dir("gpt2"))}


def test_fingerprint_depends_on_the_revision_not_on_spelling_main(job_spec, tmp_path) -> None:
    def fingerprint(**model: str) -> str:
        return job_spec(REPO, tmp_path, tmp_path / "run", model=model).fingerprint()

    assert fingerprint() == fingerprint(revision="main") != fingerprint(revision="v1")
    assert fingerprint(revision="v1") != fingerprint(revision=MAIN)


def test_ray_workers_get_the_repo_id_and_revision_not_a_driver_path(
    job_spec, tmp_path, monkeypatch, tiny_model_dir
) -> None:
    pytest.importorskip("ray")
    from codelens.workers.ray_backend import RayExecutor

    monkeypatch.chdir(tmp_path)
    spec = job_spec(REPO, tmp_path, "run", model={"revision": "v1"}, execution={"backend": "ray"})
    sent = json.loads(RayExecutor(spec)._spec_json)["model"]
    assert sent["path"] == REPO and sent["revision"] == "v1"
    shutil.copytree(tiny_model_dir("llama"), tmp_path / "models" / "m")
    local = job_spec("models/m", tmp_path, "run", execution={"backend": "ray"})
    assert json.loads(RayExecutor(local)._spec_json)["model"]["path"] == str(tmp_path / "models/m")


def test_ray_workers_that_resolved_different_commits_are_inconsistent(job_spec, tmp_path) -> None:
    pytest.importorskip("ray")
    from codelens.workers.ray_backend import RayExecutor

    executor = RayExecutor(job_spec(REPO, tmp_path, tmp_path / "run"))
    executor._reference = {"device": "cpu", "model_source": {"commit": MAIN, "path": "/a"}}
    same_commit_elsewhere = {"device": "cpu", "model_source": {"commit": MAIN, "path": "/b"}}
    assert executor._inconsistency(same_commit_elsewhere) == ""
    problem = executor._inconsistency({"device": "cpu", "model_source": {"commit": TAGGED}})
    assert f"model commit='{TAGGED}', worker 0 has '{MAIN}'" in problem
    assert "model.revision" in problem


def test_the_plot_command_and_the_notebook_load_a_repo_id_at_a_revision(hub_cache, tmp_path):
    """Every entry point resolves a repo id the same way: `codelens plot --revision` and
    `Lens.load(revision=)` read the tagged snapshot, and an unknown revision is named."""
    from typer.testing import CliRunner

    from codelens.engine.analysis.notebook import Lens
    from codelens.workers.cli import app

    out = tmp_path / "grid.html"
    args = ["plot", "--model", REPO, "--revision", "v1", "--text", "def f(x):\n", "--out", str(out)]
    shown = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert shown.exit_code == 0, shown.output
    assert out.exists()
    lens = Lens.load(REPO, revision="v1", device="cpu")
    assert lens.loaded.source.commit == TAGGED
    missing = CliRunner().invoke(app, [*args[:4], "v9", *args[5:], "--device", "cpu"])
    assert missing.exit_code != 0 and "v9" in missing.output
