"""Lineage records: fingerprints by content, never by path; differences named; RUNTIME fields left out."""

import dataclasses

import pytest

from latentmill.curate.lineage import (
    claim,
    content_fingerprint,
    differences,
    make_record,
    read_record,
    settings_of,
)
from latentmill.errors import InputError
from latentmill.stages import LISTS, SECTIONS


def test_a_file_keeps_its_fingerprint_when_moved_and_loses_it_when_changed(tmp_path):
    a = tmp_path / "a" / "head.safetensors"
    a.parent.mkdir()
    a.write_bytes(b"weights")
    before = content_fingerprint(a)
    moved = tmp_path / "elsewhere" / "renamed.safetensors"
    moved.parent.mkdir()
    a.rename(moved)
    assert content_fingerprint(moved) == before
    moved.write_bytes(b"weightz")
    assert content_fingerprint(moved) != before


def test_records_take_files_by_content_and_name_what_changed(tmp_path):
    from latentmill.filters.score import ScoreConfig

    head = tmp_path / "probe.safetensors"
    head.write_bytes(b"1")
    images = tmp_path / "images"
    images.mkdir()
    (images / "00000.tar").write_bytes(b"tar")
    plain = make_record("score", ScoreConfig(), inputs={"images": images})
    with_head = make_record("score", ScoreConfig(heads=[str(head)]), inputs={"images": images})
    other_workers = make_record("score", ScoreConfig(workers=7, batch_size=3), inputs={"images": images})
    assert other_workers["fingerprint"] == plain["fingerprint"]  # RUNTIME fields are not lineage
    assert differences(plain, with_head) == [f'settings.heads: changed (["{head}"])']
    assert str(tmp_path) not in str({k: v for k, v in with_head.items() if k != "labels"})

    out = tmp_path / "scores"
    out.mkdir()
    cleared = []
    claim(out, plain, overwrite=False, clear=lambda: cleared.append(1))
    with pytest.raises(InputError, match=r"settings.heads: changed .*--overwrite"):
        claim(out, with_head, overwrite=False, clear=lambda: cleared.append(1))
    assert not cleared and read_record(out)["fingerprint"] == plain["fingerprint"]
    assert claim(out, with_head, overwrite=True, clear=lambda: cleared.append(1)) and cleared == [1]
    assert read_record(out)["fingerprint"] == with_head["fingerprint"]


def test_every_runtime_name_is_a_field_of_its_config():
    for name, load in SECTIONS.items():
        cls = load()
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(cls.RUNTIME) <= fields, (name, set(cls.RUNTIME) - fields)
    for cls in LISTS.values():
        assert set(getattr(cls, "RUNTIME", ())) <= {f.name for f in dataclasses.fields(cls)}
    assert "steps" not in settings_of(SECTIONS["train"]()(shards=["x"], output="y"))


def test_options_added_later_leave_older_records_unchanged_at_their_default():
    """An option declared with `since` stays out of the record at its default, so an output made before the
    option existed is not redone after an upgrade; set to anything else, it is recorded like any other."""
    from latentmill.curate.encode import EncodeConfig
    from latentmill.curate.lineage import differences, make_record, settings_of
    from latentmill.train.config import TrainConfig

    newer = {"alpha_mask", "mask_variants", "mask_mix"}
    assert not newer & set(settings_of(EncodeConfig()))
    assert "masked_loss" not in settings_of(TrainConfig(output="r", model="tiny"))
    assert {"resolution", "flip", "std"} <= set(settings_of(EncodeConfig()))  # older options: always
    before = make_record("encode", EncodeConfig())
    after = make_record("encode", EncodeConfig(alpha_mask=True))
    assert after["settings"]["alpha_mask"] is True and before["fingerprint"] != after["fingerprint"]
    assert differences(before, after) == ["settings.alpha_mask: (none) -> true"]


def test_a_setting_is_read_as_a_file_only_where_its_option_is_a_path(tmp_path, monkeypatch):
    from latentmill.curate.download import DownloadConfig
    from latentmill.curate.encode import EncodeConfig

    records = []
    for where in ("empty", "crowded"):
        folder = tmp_path / where
        folder.mkdir()
        if where == "crowded":  # files named like setting values: a token, a VAE name, a choice
            (folder / "latentmill").mkdir()
            (folder / "latentmill" / "a.txt").write_text("x")
            (folder / "center").write_text("a file named like encode's --crop value")
        monkeypatch.chdir(folder)
        records.append(
            (
                make_record("download", DownloadConfig(user_agent_token="latentmill")),
                make_record("encode", EncodeConfig(vae="tiny", crop="center")),
            )
        )
    assert records[0] == records[1]
    assert records[1][0]["settings"]["user_agent_token"] == "latentmill"

    # a model option still names its folder by content, wherever it is given from
    vae = tmp_path / "crowded" / "myvae"
    vae.mkdir()
    (vae / "config.json").write_text("{}")
    record = make_record("encode", EncodeConfig(vae=str(vae)))
    assert record["settings"]["vae"].startswith("content:")

    # a changed setting's line shows its old and new value, also against a record that took it for a file
    old = make_record("download", DownloadConfig(user_agent_token="latentmill"))
    old["settings"]["user_agent_token"] = "content:0123456789abcdef"
    new = make_record("download", DownloadConfig(user_agent_token="mybot"))
    assert differences(old, new) == ['settings.user_agent_token: a file or folder (0123456789ab…) -> "mybot"']
