"""The advisor's benchmark runs end to end on a tiny generated pair and measures every contender."""

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
def test_bench_measures_every_contender(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "bench.json"
    assert bench.main(["--sizes", "64x1", "--no-project", "--workdir", str(tmp_path), "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["pairs"]
    for kind in ("advisor", "loop", "partial"):
        assert row[kind]["matrices"] == 9 and row[kind]["seconds"] > 0 and row[kind]["peak_rss_mib"] > 0
    for kind in ("advisor", "partial"):  # every layer settled at the planted rank, each layer timed
        assert row[kind]["ranks_ok"] and len(row[kind]["layers"]) == 9
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("bench-advise-")]  # pairs deleted


def test_the_7b_projection_scales_the_decoder_layers_by_layer_count():
    bench = _bench()
    size = bench.parse_size("4096x2")
    assert (size["inter"], size["vocab"]) == (11008, 32000)  # Llama-2-7B's shapes
    layers = [{"name": "model.embed_tokens", "seconds": 30.0}]
    layers += [{"name": f"model.layers.{i}.mlp.up_proj", "seconds": 10.0} for i in range(2)]
    layers += [{"name": "lm_head", "seconds": 30.0}]
    proj = bench.project_run({"seconds": 100.0, "layers": layers}, size)  # 20 s setup and vectors
    assert proj["per_layer_s"] == 10.0 and proj["outside_s"] == 80.0
    assert proj["total_s"] == 80.0 + 32 * 10.0
    assert bench.project_run({"seconds": 100.0, "layers": layers}, bench.parse_size("1024x2")) is None


def test_a_one_matrix_pair_is_read_as_a_linear_layer_at_the_planted_rank(tmp_path):
    bench = _bench()
    bench.write_matrix_pair(tmp_path, bench.parse_matrix("300x40"))
    from verification.rank_report import advise_stream

    assert not (tmp_path / "base" / "config.json").exists()
    (layer,) = advise_stream(tmp_path / "base", tmp_path / "tuned", progress=False, spectrum="partial").layers
    assert layer.shape == (300, 40) and layer.storage_dtype == "bfloat16"
    assert layer.settled and layer.rank_above_floor == bench.PLANTED_RANK
    with pytest.raises(SystemExit):
        bench.main(["--matrix", "0x4", "--no-project"])


@pytest.mark.slow
def test_bench_measures_a_one_matrix_pair(tmp_path):
    bench = _bench()
    out = tmp_path / "bench.json"
    args = ["--matrix", "300x40", "--contenders", "partial,loop", "--no-project", "--workdir", str(tmp_path)]
    assert bench.main([*args, "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["pairs"]  # --matrix alone: no Llama pairs
    assert row["matrix"] == [300, 40] and row["parameters"] == 12000
    assert row["partial"]["matrices"] == row["loop"]["matrices"] == 1 and row["partial"]["ranks_ok"]
    assert row["partial"]["peak_rss_mib"] > 0
