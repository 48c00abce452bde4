"""Prefilter: exact funnels on crafted tables, rules that need missing columns, the private-address guard."""

import json

import pyarrow.parquet as pq
import pytest

from latentmill.curate.addresses import is_private_host
from latentmill.curate.prefilter import PrefilterConfig, prefilter
from latentmill.errors import InputError, NothingLeft
from tests.conftest import write_table


def row(url, text="a good caption", w=800, h=600, sim=0.3, wm=0.1, unsafe=0.01, aes=6.0, extra="x"):
    return {
        "URL": url,
        "TEXT": text,
        "WIDTH": w,
        "HEIGHT": h,
        "similarity": sim,
        "pwatermark": wm,
        "punsafe": unsafe,
        "AESTHETIC_SCORE": aes,
        "extra": extra,
    }


CRAFTED = [
    row("https://ok.com/1.jpg", extra="kept-1"),
    row("ftp://files.com/2.jpg"),  # invalid_url
    row("not a url"),  # invalid_url
    row("http://192.168.1.4/3.jpg"),  # private_address
    row("https://ok.com/4.jpg", text="  "),  # short_caption
    row("https://ok.com/5.jpg", w=300, h=900),  # min_side
    row("https://ok.com/6.jpg", w=2000, h=600),  # max_aspect (3.33)
    row("https://ok.com/7.jpg", sim=0.1),  # min_similarity
    row("https://ok.com/8.jpg", wm=0.9),  # max_pwatermark
    row("https://ok.com/9.jpg", wm=None),  # max_pwatermark (unknown fails)
    row("https://ok.com/10.jpg", unsafe=0.8),  # max_punsafe
    row("https://ok.com/11.jpg", aes=4.0),  # min_aesthetic
    row("https://ok.com/1.jpg", extra="dup"),  # duplicate_url
    row("https://ok.com/12.jpg", extra="kept-2"),
    row("HTTPS://ok.com/13.jpg", extra="kept-3"),
]
THRESHOLDS = dict(
    min_side=512, max_aspect=2.0, min_similarity=0.28, max_pwatermark=0.5, max_punsafe=0.5, min_aesthetic=5.0
)


def test_funnel_counts_are_exact_and_in_order(tmp_path):
    table = write_table(tmp_path / "urls.parquet", CRAFTED)
    funnel = prefilter(table, tmp_path / "kept.parquet", PrefilterConfig(**THRESHOLDS))
    assert [(s["rule"], s["dropped"]) for s in funnel["steps"]] == [
        ("invalid_url", 2),
        ("private_address", 1),
        ("short_caption", 1),
        ("min_side", 1),
        ("max_aspect", 1),
        ("min_similarity", 1),
        ("max_pwatermark", 2),
        ("max_punsafe", 1),
        ("min_aesthetic", 1),
        ("duplicate_url", 1),
    ]
    assert funnel["input_rows"] == 15 and funnel["kept_rows"] == 3
    kept = pq.read_table(tmp_path / "kept.parquet")
    assert kept.column_names == list(CRAFTED[0])  # every column carried
    assert kept.column("extra").to_pylist() == ["kept-1", "kept-2", "kept-3"]
    assert json.loads((tmp_path / "kept.funnel.json").read_text()) == json.loads(json.dumps(funnel))


def test_dropped_rows_keep_their_reason(tmp_path):
    table = write_table(tmp_path / "urls.parquet", CRAFTED)
    prefilter(table, tmp_path / "kept.parquet", PrefilterConfig(**THRESHOLDS))
    dropped = pq.read_table(tmp_path / "kept.dropped.parquet").to_pylist()
    reasons = {r["URL"]: r["reason"] for r in dropped if r["extra"] != "dup"}
    assert reasons["http://192.168.1.4/3.jpg"] == "private_address"
    assert reasons["https://ok.com/9.jpg"] == "max_pwatermark"
    assert [r["reason"] for r in dropped if r["extra"] == "dup"] == ["duplicate_url"]
    assert len(dropped) == 12


def test_duplicates_are_found_across_batches(tmp_path):
    rows = [row(f"https://ok.com/{i % 7}.jpg") for i in range(100)]
    table = write_table(tmp_path / "urls.parquet", rows)
    funnel = prefilter(table, tmp_path / "kept.parquet", PrefilterConfig(batch_rows=9))
    assert funnel["kept_rows"] == 7 and funnel["steps"][-1] == {
        "rule": "duplicate_url",
        "dropped": 93,
        "remaining": 7,
    }


def test_a_rule_whose_column_is_missing_is_an_error_listing_the_columns(tmp_path, run_cli):
    table = write_table(tmp_path / "urls.parquet", [{"URL": "https://a.b/c.jpg", "TEXT": "hello there"}])
    with pytest.raises(InputError, match="Columns found: URL, TEXT"):
        prefilter(table, tmp_path / "kept.parquet", PrefilterConfig(min_aesthetic=5))
    result = run_cli("urls", "prefilter", table, "-o", tmp_path / "k.parquet", "--max-pwatermark", "0.5")
    assert result.exit_code == 2 and "--max-pwatermark needs the pwatermark column" in result.output
    assert not (tmp_path / "k.parquet").exists()


def test_column_options_rename_roles(tmp_path, run_cli):
    table = write_table(
        tmp_path / "urls.parquet",
        [
            {"link": "https://a.b/c.jpg", "alt": "x", "score": 7.0},
            {"link": "https://a.b/d.jpg", "alt": "a caption", "score": 3.0},
        ],
    )
    result = run_cli(
        "urls",
        "prefilter",
        table,
        "-o",
        tmp_path / "k.parquet",
        "--url-col",
        "link",
        "--caption-col",
        "alt",
        "--aesthetic-col",
        "score",
        "--min-aesthetic",
        "5",
        "--min-caption-chars",
        "1",
    )
    assert result.exit_code == 0, result.output
    assert "min_aesthetic" in result.output
    assert pq.read_table(tmp_path / "k.parquet").column("link").to_pylist() == ["https://a.b/c.jpg"]


PRIVATE = [
    "127.0.0.1",
    "127.8.9.10",
    "10.1.2.3",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.0.1",
    "169.254.169.254",
    "[::1]",
    "[fc00::1]",
    "[fd12:3456::1]",
    "[fe80::1]",
    "localhost",
    "LOCALHOST.",
    "metadata.google.internal",
    "0.0.0.0",
    "2130706433",
    "0x7f.0.0.1",
    "0177.0.0.1",
    "127.1",
    "[::ffff:127.0.0.1]",
    "app.localhost",
    "localhost.localdomain",
    "224.0.0.1",
    "[2002:7f00:1::]",
    "127.0.0.1 ",
    "１２７.０.０.１",
    "①②⑦.0.0.1",
    "[ff02::1]",
    "240.0.0.1",
]
PUBLIC = [
    "8.8.8.8",
    "172.32.0.1",
    "192.169.0.1",
    "example.com",
    "10.example.com",
    "[2001:4860:4860::8888]",
    "metadata.example.com",
    "deadbeef.com",
    "1e100.net",
]


@pytest.mark.parametrize("host", PRIVATE)
def test_private_hosts_are_recognised(host):
    assert is_private_host(host)


@pytest.mark.parametrize("host", PUBLIC)
def test_public_hosts_pass(host):
    assert not is_private_host(host)


def test_prefilter_drops_private_addresses_unless_allowed(tmp_path):
    urls = [f"http://{h}/a.jpg" for h in PRIVATE] + [f"https://{h}:8080/b.png" for h in PUBLIC]
    table = write_table(tmp_path / "urls.parquet", [{"URL": u} for u in urls])
    funnel = prefilter(table, tmp_path / "kept.parquet", PrefilterConfig())
    assert funnel["steps"][1] == {
        "rule": "private_address",
        "dropped": len(PRIVATE),
        "remaining": len(PUBLIC),
    }
    allowed = prefilter(
        table, tmp_path / "all.parquet", PrefilterConfig(allow_hosts=("127.0.0.1:80", "localhost:80"))
    )
    kept = set(pq.read_table(tmp_path / "all.parquet").column("URL").to_pylist())
    # exactly the two allowed host:port pairs, however spelled (urllib connects to them alike), nothing else
    same = ["127.0.0.1", "localhost", "LOCALHOST.", "127.0.0.1 ", "１２７.０.０.１", "①②⑦.0.0.1"]
    assert kept == {f"http://{h}/a.jpg" for h in same} | {f"https://{h}:8080/b.png" for h in PUBLIC}
    assert allowed["kept_rows"] == len(same) + len(PUBLIC)


def test_sizes_that_are_nan_infinite_or_huge_fail_the_size_rules(tmp_path):
    rows = [
        {"URL": f"http://example.com/{i}.jpg", "TEXT": "a cat photo", "WIDTH": w, "HEIGHT": h}
        for i, (w, h) in enumerate(
            [(float("nan"), 100.0), (float("inf"), 600.0), (9.2e18, 1.0), (800.0, 600.0)]
        )
    ]
    table = write_table(tmp_path / "urls.parquet", rows)
    funnel = prefilter(table, tmp_path / "kept.parquet", PrefilterConfig(max_aspect=2.0))
    assert (
        funnel["kept_rows"] == 1
        and dict((s["rule"], s["dropped"]) for s in funnel["steps"])["max_aspect"] == 3
    )
    huge = write_table(
        tmp_path / "huge.parquet",
        [{"URL": "http://example.com/h.jpg", "TEXT": "a cat photo", "WIDTH": 2**63 - 1, "HEIGHT": 1}],
    )
    with pytest.raises(NothingLeft, match="none of 1 left: min_side 1"):
        prefilter(huge, tmp_path / "kept2.parquet", PrefilterConfig(max_aspect=2.0, min_side=10))
    funnel = json.loads((tmp_path / "kept2.funnel.json").read_text())  # the funnel is written all the same
    assert funnel["kept_rows"] == 0 and funnel["input_rows"] == 1


def test_the_spilled_dedup_keeps_exactly_the_rows_the_in_memory_set_keeps(tmp_path, monkeypatch):
    """Bounded memory changes nothing: on a table with repeats across files and batches, the kept rows (in
    order), the dropped rows and the funnel equal those of the in-memory set, with spills and row ranges
    made tiny so every partition and range path runs."""
    import numpy as np
    import pyarrow as pa

    from latentmill.curate import urldedup
    from latentmill.curate.urlhash import SeenUrls, hash_urls

    monkeypatch.setattr(urldedup, "SPILL_PAIRS", 500)
    monkeypatch.setattr(urldedup.SpilledDedup.__init__, "__defaults__", (500, 700))
    rng = np.random.default_rng(0)
    parts = tmp_path / "parts"
    parts.mkdir()
    urls = [f"https://ok.com/{n}.jpg" for n in rng.integers(0, 3000, 6000)]
    urls[::97] = ["not a url"] * len(urls[::97])
    for p in range(3):  # three parquet parts, read as one table through a glob
        write_table(
            parts / f"part-{p}.parquet", [row(u, text=f"caption {i}") for i, u in enumerate(urls[p::3])]
        )
    funnel = prefilter(
        str(parts / "part-*.parquet"), tmp_path / "kept.parquet", PrefilterConfig(batch_rows=333)
    )
    ordered = [u for p in range(3) for u in urls[p::3]]  # the stream: file by file
    valid = [u for u in ordered if u.startswith("https://")]
    seen, expected = SeenUrls(), []
    for start in range(0, len(valid), 333):
        chunk = np.array(valid[start : start + 333], dtype=object)
        first = seen.first_seen(hash_urls(pa.array(chunk)))
        expected += list(chunk[first])
    kept = pq.read_table(tmp_path / "kept.parquet").column("URL").to_pylist()
    assert kept == expected and funnel["kept_rows"] == len(expected) == len(set(valid))
    dropped = pq.read_table(tmp_path / "kept.dropped.parquet")
    assert sorted(dropped.column("reason").to_pylist()) == sorted(
        ["invalid_url"] * (len(ordered) - len(valid)) + ["duplicate_url"] * (len(valid) - len(expected))
    )
    assert funnel["steps"][-1] == {
        "rule": "duplicate_url",
        "dropped": len(valid) - len(expected),
        "remaining": len(expected),
    }
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the spill folder is gone
