"""Models given as hub ids are read from the local Hugging Face cache, never downloaded, in the layout the
repository has: a VAE repository (config.json at its top, as stabilityai/sd-vae-ft-mse) and a pipeline
repository (vae/config.json) alike; and a missing one says what to fetch for either layout."""

import pytest

REVISION = "0" * 40


def cache_repo(cache, repo, folder_of_files, subfolder=""):
    """Files written into `cache` as huggingface_hub keeps a downloaded repository (refs/main -> a snapshot)."""
    import shutil

    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(REVISION)
    snapshot = root / "snapshots" / REVISION / subfolder
    shutil.copytree(folder_of_files, snapshot, dirs_exist_ok=True)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_vae_repository_and_a_pipelines_vae_both_load_from_the_cache(hub_cache, tmp_path):
    from latentmill.curate.vae import load_vae

    made = tmp_path / "made"
    load_vae("tiny").model.save_pretrained(made)
    cache_repo(hub_cache, "someone/a-vae", made)  # config.json at the top
    cache_repo(hub_cache, "someone/a-pipeline", made, subfolder="vae")  # vae/config.json
    for repo in ("someone/a-vae", "someone/a-pipeline"):
        assert load_vae(repo).latent_channels == 4


def test_a_vae_missing_from_the_cache_names_what_to_fetch_for_either_layout(hub_cache):
    from latentmill.curate.vae import load_vae
    from latentmill.errors import InputError

    with pytest.raises(InputError) as caught:
        load_vae("stabilityai/sd-vae-ft-mse")
    message = str(caught.value)
    assert "`hf download stabilityai/sd-vae-ft-mse` for a VAE repository" in message
    assert "--include 'vae/*'` for a pipeline's VAE" in message


def test_score_at_its_defaults_offline_refuses_in_seconds_with_the_whole_fetch_command(
    hub_cache, tmp_path, run_cli
):
    import time

    from tests.conftest import image_entry, make_shard

    (tmp_path / "images").mkdir()
    make_shard(tmp_path / "images" / "00000.tar", [image_entry("000000000", 64, 64)])
    started = time.monotonic()
    result = run_cli("score", tmp_path / "images", "-o", tmp_path / "scores")  # ViT-L-14, openai weights
    assert result.exit_code == 2, result.output
    assert time.monotonic() - started < 60  # the hub client's retries took about a minute
    assert "`hf download timm/vit_large_patch14_clip_224.openai open_clip_pytorch_model.bin`" in result.output
    assert result.output.rstrip().endswith("--pretrained /path/to/open_clip_pytorch_model.bin.")  # whole
    assert not (tmp_path / "scores").exists() or not any((tmp_path / "scores").glob("*.parquet"))


def test_the_hub_probe_is_bounded_and_answers_for_a_closed_and_an_open_port(monkeypatch):
    import socket
    import time

    from latentmill.filters.clip import hub_reachable

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert hub_reachable()
    finally:
        listener.close()
    started = time.monotonic()
    assert not hub_reachable()  # the port closed: refused at once
    assert time.monotonic() - started < 5
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert not hub_reachable()
