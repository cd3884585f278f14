"""The advisor's benchmark runs end to end on a tiny generated pair and measures both contenders."""

import json

import pytest
from _bench_scripts import load_bench

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _bench():
    return load_bench("advise")


def test_generated_pair_has_the_llama_layout_and_planted_changes(tmp_path):
    bench = _bench()
    size = bench.parse_size("64x2")
    bench.write_pair(tmp_path, size, shard_bytes=1 << 16)
    from verification.rank_report import advise_stream

    index = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    report = advise_stream(tmp_path / "base", tmp_path / "tuned", progress=False)
    assert report.architecture == "LlamaForCausalLM"
    assert len(report.layers) == 2 + 7 * size["layers"]
    assert bench.parameters(size) == sum(a.shape[0] * a.shape[1] for a in report.layers) + sum(
        v["shape"][0] for v in report.vectors
    )
    assert all(a.rank_above_floor == 8 for a in report.layers)  # rank 8 planted everywhere


@pytest.mark.slow
def test_bench_measures_both_contenders(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "bench.json"
    assert bench.main(["--sizes", "64x1", "--no-project", "--workdir", str(tmp_path), "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["pairs"]
    for kind in ("advisor", "loop"):
        assert row[kind]["matrices"] == 9 and row[kind]["seconds"] > 0 and row[kind]["peak_rss_mib"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("bench-advise-")]  # pairs deleted
