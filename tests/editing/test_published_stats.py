"""C0 from the official code bases' `.npz` files and AlphaEdit's `null_space_project.pt`."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from helpers import tiny_llama, tiny_tokenizer
from sphere_pl.editing import Editor
from sphere_pl.editing.methods.alphaedit import nullspace_projector
from sphere_pl.editing.stats import KeyStatistics, StatisticsFileError, read_published_moment, second_moments, write_mom2_file
from sphere_pl.models import resolve_templates

MODULE = "model.layers.1.mlp.down_proj"


def test_official_format_file_gives_the_sum_over_the_count_in_float64(tmp_path):
    keys = torch.randn(300, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    path = write_mom2_file(str(tmp_path / "Llama3-8B" / "wikipedia_stats"), MODULE, keys.T @ keys, 300, "float32", 100000)
    assert path.endswith(f"{MODULE}_float32_mom2_100000.npz")
    with np.load(path, allow_pickle=False) as data:  # the official key names, readable without pickle
        assert set(data.files) == {"mom2.constructor", "mom2.count", "mom2.mom2"}
    moment = read_published_moment(str(tmp_path), MODULE, 64, num_samples=100000)  # a directory, searched recursively
    expected = (keys.T @ keys) / 300
    assert moment.dtype == torch.float32
    assert float((moment.double() - expected).abs().max() / expected.abs().max()) < 1e-6
    assert torch.equal(read_published_moment(path, MODULE, 64, num_samples=1), moment)  # a file named directly


def _write(tmp_path, name, **fields):
    path = tmp_path / name
    np.savez(path, **fields)
    return str(path)


GOOD = {"mom2.count": np.array(100), "mom2.mom2": np.eye(64, dtype=np.float32)}


@pytest.mark.parametrize(
    "fields, message",
    [
        ({**GOOD, "mom2.mom2": np.eye(32, dtype=np.float32)}, r"field 'mom2.mom2' has shape \(32, 32\), but model.layers.1.mlp.down_proj takes 64 inputs"),
        ({"mom2.mom2": GOOD["mom2.mom2"]}, r"field 'mom2.count' is missing"),
        ({**GOOD, "mom2.count": np.array(0)}, r"field 'mom2.count' is array\(0\); expected a positive integer"),
        ({**GOOD, "mom2.mom2": np.eye(64, dtype=np.int64)}, r"field 'mom2.mom2' has dtype int64"),
        ({**GOOD, "mom2.mom2": np.triu(np.ones((64, 64), dtype=np.float32))}, r"field 'mom2.mom2' is not symmetric"),
        ({**GOOD, "mom2.mom2": np.full((64, 64), np.nan, dtype=np.float32)}, r"field 'mom2.mom2' holds non-finite values"),
    ],
    ids=["shape", "no-count", "zero-count", "dtype", "asymmetric", "nan"],
)
def test_files_that_do_not_fit_the_layer_are_refused_naming_file_and_field(tmp_path, fields, message):
    path = _write(tmp_path, f"{MODULE}_float32_mom2_100.npz", **fields)
    with pytest.raises(StatisticsFileError, match=message) as error:
        read_published_moment(path, MODULE, 64, num_samples=100)
    assert path in str(error.value)


def test_wrong_module_missing_files_and_ambiguous_counts_are_named(tmp_path):
    other = _write(tmp_path, "model.layers.7.mlp.down_proj_float32_mom2_100.npz", **GOOD)
    with pytest.raises(StatisticsFileError, match=r"holds statistics of module 'model.layers.7.mlp.down_proj', but 'model.layers.1.mlp.down_proj' is edited"):
        read_published_moment(other, MODULE, 64, num_samples=100)
    with pytest.raises(StatisticsFileError, match=r"has no file for module 'model.layers.1.mlp.down_proj' \(expected a name like model.layers.1.mlp.down_proj_float32_mom2_100.npz\)"):
        read_published_moment(str(tmp_path), MODULE, 64, num_samples=100)
    with pytest.raises(StatisticsFileError, match="does not exist"):
        read_published_moment(str(tmp_path / "nowhere"), MODULE, 64, num_samples=100)
    _write(tmp_path, f"{MODULE}_float32_mom2_100.npz", **GOOD)
    _write(tmp_path, f"{MODULE}_float32_mom2_500.npz", **{**GOOD, "mom2.count": np.array(500)})
    assert float(read_published_moment(str(tmp_path), MODULE, 64, num_samples=500)[0, 0]) == pytest.approx(1 / 500)
    with pytest.raises(StatisticsFileError, match=r"several files .* set stats.num_samples"):
        read_published_moment(str(tmp_path), MODULE, 64, num_samples=7)
    torn = tmp_path / "torn" / f"{MODULE}_float32_mom2_100.npz"
    torn.parent.mkdir()
    torn.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(StatisticsFileError, match="is not a readable .npz statistics file"):
        read_published_moment(str(torn), MODULE, 64, num_samples=100)


def test_alphaedit_from_published_files_equals_computed_statistics(tmp_path, tiny_model_dir, method_factory, stats_cache):
    """Computed C0 written in the official format, then read back: the same projectors and edits."""
    model, tok = tiny_llama(seed=0), tiny_tokenizer()
    templates = resolve_templates(model)
    computed_method = method_factory("alphaedit")
    moments = second_moments(model, tok, templates, computed_method.layers, computed_method.stats, "tiny")
    count = 20 * 64  # num_samples x seq_len keys
    for layer, moment in moments.items():
        write_mom2_file(str(tmp_path / "stats"), templates.down_proj_at(layer), moment.double() * count, count, "float64", 20)

    from_files = method_factory("alphaedit", stats=dataclasses.replace(computed_method.stats, from_file=str(tmp_path / "stats"), cache_dir=str(tmp_path / "unused")))
    computed, published = Editor(tiny_llama(seed=0), tok, computed_method), Editor(tiny_llama(seed=0), tok, from_files)
    computed.prepare(), published.prepare()
    assert not (tmp_path / "unused").exists()  # nothing computed or cached
    assert torch.allclose(published.method.projectors, computed.method.projectors, atol=1e-5)

    # the official null_space_project.pt (a plain tensor) gives the same projectors too
    torch.save(computed.method.projectors.clone(), tmp_path / "null_space_project.pt")
    with_file = Editor(tiny_llama(seed=0), tok, method_factory("alphaedit", projectors_file=str(tmp_path / "null_space_project.pt")))
    with_file.prepare()
    assert torch.equal(with_file.method.projectors, computed.method.projectors)
    expected = nullspace_projector(moments[1], computed_method.nullspace_threshold)
    assert torch.equal(computed.method.projectors[0], expected)

    # a projector file for other layers or another model is named with the shape it needs
    torch.save(computed.method.projectors[:1].clone(), tmp_path / "one_layer.pt")
    with pytest.raises(ValueError, match=r"has shape \(1, 64, 64\), but 2 edited layer\(s\) with 64 inputs need \(2, 64, 64\)"):
        Editor(tiny_llama(seed=0), tok, method_factory("alphaedit", projectors_file=str(tmp_path / "one_layer.pt"))).prepare()


def test_accumulate_dtype_is_checked_and_float64_agrees_with_float32(tmp_path, method_factory):
    with pytest.raises(ValueError, match=r"accumulate_dtype must be one of \['float32', 'float64'\]"):
        KeyStatistics(accumulate_dtype="bfloat16")
    model, tok = tiny_llama(seed=0), tiny_tokenizer()
    templates = resolve_templates(model)
    base = dataclasses.replace(method_factory("alphaedit").stats, cache_dir=str(tmp_path))
    single = second_moments(model, tok, templates, [1], base, "tiny")[1]
    double = second_moments(model, tok, templates, [1], dataclasses.replace(base, accumulate_dtype="float64"), "tiny")[1]
    assert double.dtype == single.dtype == torch.float32
    assert float((double - single).abs().max() / double.abs().max()) < 1e-5
