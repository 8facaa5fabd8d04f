"""common/hub.py: model references checked from the value alone, and a failed load's cause in one line."""

from __future__ import annotations

import pytest

from diffmem.common.errors import ConfigError
from diffmem.common.hub import check_model_reference, failure_cause, in_hub_cache, is_hub_id
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
