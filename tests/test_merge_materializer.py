"""The materializer: load_into a live module, trim summaries computed once, bf16 sources and destinations,
in-memory sources."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.merge import Materializer, passes
from evomerge.recipe import Recipe


def _ties(wa: float, da: float, seed: int = 0, method: str = "ties") -> Recipe:
    return Recipe.from_dict({"merge_method": method, "base_model": "base", "seed": seed, "models": [
        {"model": "a", "parameters": {"weight": [wa, 1 - wa], "density": da}},
        {"model": "b", "parameters": {"weight": 0.5, "density": [0.9, 0.2]}}]})


def test_load_into_writes_the_merged_weights_in_place(tiny_models):
    mat = Materializer(tiny_models, base="base")
    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"])
    params_before = {n: p.data_ptr() for n, p in model.named_parameters()}
    for recipe in (_ties(0.3, 0.4), _ties(0.8, 0.7, method="dare_ties", seed=3)):
        mat.load_into(recipe, model)
        expected = mat.materialize(recipe)
        state = model.state_dict()
        assert all(torch.equal(state[n], t) for n, t in expected.items())
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params_before  # same storage, no new module
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits).all()


def test_trim_summaries_are_computed_once_and_compact(tiny_models):
    """Trims keep one small summary per (model, tensor), reused by every candidate: no full-size statistics."""
    mat = Materializer(tiny_models, base="base")
    first = mat.materialize(_ties(0.3, 0.4))
    kept = dict(mat.summaries)
    name = "model.layers.1.mlp.up_proj.weight"
    assert ("a", name, "base", name) in kept
    second = mat.materialize(_ties(0.3, 0.9))
    assert all(mat.summaries[k] is v for k, v in kept.items())  # the same objects: not recomputed
    assert not torch.equal(first[name], second[name])
    numel = {n: t.numel() for n, t in first.items()}
    from evomerge.merge.vectors import REFINED_ENTRIES

    for k, s in mat.summaries.items():  # 28 B a populated bin, 12 B a remembered distinct magnitude
        assert s.nbytes <= 28 * min(numel[k[1]], 1 << 15) + 12 * min(numel[k[1]], REFINED_ENTRIES)


def test_bfloat16_sources_and_destinations(tmp_path, tiny_models):
    """bf16 sources are merged as stored (no float32 copy is kept) and bf16 destinations are written by the
    kernel itself, rounding once: the same bits as merging in float32 and rounding the result."""
    from safetensors.torch import save_file

    from tests.merge_fixtures import load_checkpoint

    paths = {}
    for k, v in tiny_models.items():
        sd = {n: t.to(torch.bfloat16) for n, t in load_checkpoint(v).items()}
        (tmp_path / k).mkdir()
        save_file(sd, str(tmp_path / k / "model.safetensors"))
        (tmp_path / k / "config.json").write_bytes((v / "config.json").read_bytes())
        paths[k] = tmp_path / k
    mat = Materializer(paths, base="base")
    as_f32 = {k: {n: t.float() for n, t in load_checkpoint(v).items()} for k, v in paths.items()}
    ref = Materializer(as_f32, base="base")
    for recipe in (_ties(0.3, 0.4), _ties(0.8, 0.7, method="dare_ties", seed=3), _ties(0.5, 0.5, method="breadcrumbs_ties")):
        got = mat.materialize(recipe, dtype=torch.bfloat16)
        want = ref.materialize(recipe)
        for n, t in got.items():
            assert t.dtype == torch.bfloat16
            assert torch.equal(t, want[n].to(torch.bfloat16)), (recipe.merge_method, n)
    assert mat.sources["base"].get("model.norm.weight").dtype == torch.bfloat16  # still the mapped file


def test_state_dict_sources_and_other_reference(tiny_models):
    """Sources may be in-memory state dicts, and the resident reference need not be the recipe's base."""
    from tests.merge_fixtures import load_checkpoint

    sds = {k: load_checkpoint(v) for k, v in tiny_models.items()}
    by_path = Materializer(tiny_models, base="base").materialize(_ties(0.6, 0.5))
    from_a = Materializer(sds, base="a").materialize(_ties(0.6, 0.5))
    assert all(torch.allclose(by_path[n], from_a[n], rtol=0, atol=1e-6) for n in by_path)


@pytest.mark.parametrize("threads", [1, 3])
def test_fused_kernel_and_torch_path_agree(tiny_models, threads, monkeypatch):
    """The numba kernel (CPU) and the torch path (GPU and other dtypes; EVOMERGE_KERNELS=torch on CPU) apply the
    same trims and draws, whatever the number of merge threads."""
    mat = Materializer(tiny_models, base="base", threads=threads)
    for method in ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs_ties", "della", "della_linear"):
        r = _ties(0.4, 0.35, seed=9, method=method)
        if method.startswith("della"):
            r.parameters["epsilon"] = 0.05
        monkeypatch.delenv(passes.KERNELS, raising=False)
        fused = mat.materialize(r)
        monkeypatch.setenv(passes.KERNELS, "torch")
        plain = mat.materialize(r)
        for n, t in fused.items():
            if not torch.allclose(t, plain[n], rtol=1e-5, atol=1e-7):
                pytest.fail(f"{method}: {n} differs by {(t - plain[n]).abs().max():.3g}")


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_by_pieces_of_rows_equals_della_whole(tiny_models, method):
    """DELLA's row ranks are computed per piece of whole rows (no full-size rank array): any piece size
    keeps the same entries, and the rescale's L1 sums differ only in float32 rounding."""
    from evomerge.merge import methods

    r = _ties(0.4, 0.35, seed=9, method=method)
    r.parameters["epsilon"] = 0.05
    mat = Materializer(tiny_models, base="base")
    whole = mat.materialize(r)
    try:
        methods.DELLA_PIECE = 1  # one row a piece
        pieces = mat.materialize(r)
    finally:
        methods.DELLA_PIECE = 1 << 22
    assert all(torch.allclose(whole[n], pieces[n], rtol=1e-6, atol=1e-7) for n in whole)
    assert all(torch.equal(whole[n] == mat.sources["base"].get(n), pieces[n] == mat.sources["base"].get(n)) for n in whole)


@pytest.mark.parametrize("tie_order", ["index", "mergekit"])
def test_fused_paths_agree_with_torch_on_quantized_deltas_across_blocks(tie_order, monkeypatch):
    """Tensors of many kernel blocks whose deltas are quantized (bf16-like: runs of equal magnitudes, so the
    tied entries a trim keeps start and stop inside blocks): every fused path (one loop for two or three
    random or band trims, the general one otherwise) writes what the torch path writes."""
    g = torch.Generator().manual_seed(5)
    name = "model.layers.0.mlp.up_proj.weight"
    base = torch.randn(96, 1000, generator=g)
    experts = {f"m{i}": {name: base + torch.randint(-6, 7, base.shape, generator=g).float() / 64} for i in range(3)}
    sources = {"base": {name: base}} | experts
    for method in ("ties", "breadcrumbs_ties", "breadcrumbs", "dare_ties", "dare_linear", "task_arithmetic", "della"):
        for count in (2, 3):
            models = [{"model": f"m{i}", "parameters": {"weight": 0.3 + 0.2 * i, "density": 0.35 + 0.15 * i}} for i in range(count)]
            r = Recipe.from_dict({"merge_method": method, "base_model": "base", "models": models, "seed": 4})
            mat = Materializer({k: sources[k] for k in ["base", *[f"m{i}" for i in range(count)]]}, base="base",
                               tie_order=tie_order)
            monkeypatch.delenv(passes.KERNELS, raising=False)
            fused = mat.materialize(r)[name]
            monkeypatch.setenv(passes.KERNELS, "torch")
            plain = mat.materialize(r)[name]
            assert torch.allclose(fused, plain, rtol=1e-6, atol=1e-7), (method, count)


def test_traffic_counts_every_pass(tiny_models):
    """The kernels' byte counter (benchmarks relate time to it): a DARE-TIES merge reads each tensor's base
    and experts once to merge and once more per expert for the rescale, and writes the output once."""
    mat = Materializer(tiny_models, base="base")
    recipe = _ties(0.8, 0.7, method="dare_ties", seed=3)
    expected_out = sum(t.numel() * 4 for t in mat.materialize(recipe).values())
    base_bytes = sum(mat.sources["base"].get(n).numel() * 4 for n in mat.names)  # float32 checkpoints
    read, written = passes.traffic.read, passes.traffic.written
    mat.materialize(recipe)
    assert passes.traffic.written - written == expected_out
    assert passes.traffic.read - read == 3 * base_bytes + 2 * 2 * base_bytes


def _bf16_expert(base: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (base.float() + noise * torch.randn(base.shape, generator=g)).to(torch.bfloat16)


@pytest.mark.parametrize("fused", [True, False])
def test_thresholds_learned_by_sample_and_count_are_exact(monkeypatch, fused):
    """A large tensor's trims bracket the threshold with a sample and count the bracket exactly: every cut
    (value, entries larger, entries equal) equals a full sort's, whether the sample brackets it (fine bf16
    deltas: a few bins hold most entries), brackets too many bins (coarse deltas: the full histogram), or
    misleads (the sampled entries unlike the rest: the count shows it, then the full histogram)."""
    from evomerge.merge import vectors

    monkeypatch.setenv(passes.KERNELS, "numba" if fused else "torch")
    g = torch.Generator().manual_seed(0)
    base = (0.02 * torch.randn(2048, 512, generator=g)).to(torch.bfloat16)
    misleading = base.clone().reshape(-1)
    sampled = torch.zeros(base.numel(), dtype=torch.bool)
    for s in passes.sample_starts(base.numel(), vectors.SAMPLE_WINDOW, vectors.SAMPLE_WIDTH):
        sampled[s : s + vectors.SAMPLE_WIDTH] = True
    misleading[~sampled] += 0.01  # only unsampled entries move
    cases = {"fine": (_bf16_expert(base, 1e-4, 1), False), "coarse": (_bf16_expert(base, 3e-3, 2), True),
             "misleading": (misleading.reshape(base.shape), True)}
    for name, (model, complete) in cases.items():
        vec = vectors.TaskVector(base, model)
        order = (model.float() - base.float()).abs().reshape(-1).sort(descending=True).values
        for rank in (int(d * base.numel()) for d in (0.2, 0.3, 0.55, 0.9)):
            value = order[rank].item()
            cut = vec.cut(rank)
            assert (cut.value, cut.larger, cut.equal) == (value, int((order > value).sum()), int((order == value).sum())), (name, rank)
        s = vec.summary()
        assert s.complete == complete and (complete or s.passes >= 1), (name, s.complete, s.passes)


def test_ties_through_counted_thresholds_equals_full_histograms(monkeypatch):
    """A TIES merge of large bf16 tensors whose thresholds come from counting passes writes what it writes
    when every summary is a full histogram."""
    from evomerge.merge import vectors

    g = torch.Generator().manual_seed(1)
    name = "model.layers.0.mlp.up_proj.weight"
    base = (0.02 * torch.randn(2048, 512, generator=g)).to(torch.bfloat16)
    sources = {"base": {name: base}, "a": {name: _bf16_expert(base, 1e-4, 3)}, "b": {name: _bf16_expert(base, 2e-4, 4)}}
    recipe = Recipe.from_dict({"merge_method": "ties", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 0.7, "density": 0.3}}, {"model": "b", "parameters": {"weight": 0.5, "density": 0.55}}]})
    mat = Materializer(sources, base="base")
    counted = mat.materialize(recipe)[name]
    assert not any(s.complete for s in mat.summaries.values())
    monkeypatch.setattr(vectors, "SAMPLE_WINDOW", base.numel())  # every tensor "small": full histograms
    full = Materializer(sources, base="base")
    assert torch.equal(full.materialize(recipe)[name], counted)
    assert all(s.complete for s in full.summaries.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_small_tensors_sorted_summary_equals_its_histogram(dtype):
    """Tensors up to vectors.SMALL entries are summarized by sorting their bins: the same bins, counts, entries
    above and mixed counts as the histogram kernel's."""
    import numpy as np

    from evomerge.merge import vectors

    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 1024, vectors.SMALL):
        base = (0.02 * torch.randn(n, generator=g)).to(dtype)
        model = (base.float() + 1e-3 * torch.randn(n, generator=g)).to(dtype)
        small = vectors.TaskVector(base, model).summary()
        full = vectors.Summary(n, *vectors._compact(*vectors.TaskVector(base, model).histogram()), complete=True)
        for field in ("bins", "counts", "above", "mixed"):
            assert np.array_equal(getattr(small, field), getattr(full, field)), (n, field)


def _resident_bytes(m) -> int:
    """How much of memory map `m` is mapped into this process (its Rss in /proc/self/smaps)."""
    import numpy as np

    start = f"{np.frombuffer(m, np.uint8).ctypes.data:x}-"
    lines = open("/proc/self/smaps").read().splitlines()
    at = next(i for i, line in enumerate(lines) if line.lstrip("0").startswith(start))
    return next(int(line.split()[1]) * 1024 for line in lines[at + 1 :] if line.startswith("Rss:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps") or tuple(map(int, os.uname().release.split(".")[:2])) < (5, 14),
                    reason="MADV_POPULATE_READ: Linux >= 5.14")
def test_sources_pages_are_mapped_in_the_background_when_they_fit(tiny_models, monkeypatch):
    """Opening sources for merging maps every page of their files into the process in a background thread
    (the first candidate then takes no page faults); nothing is mapped ahead when the sources would not fit
    in half the memory available."""
    mat = Materializer(tiny_models, base="base")
    maps = [m for s in mat.sources.values() for m in s.maps()]
    assert mat.mapping is not None and len(maps) == 3
    mat.mapping.join(60)
    assert all(_resident_bytes(m) >= len(m) for m in maps)
    monkeypatch.setenv("EVOMERGE_MEMORY_LIMIT", str(2 * sum(len(m) for m in maps) - 1))
    tight = Materializer(tiny_models, base="base")
    assert tight.mapping is None
    assert all(_resident_bytes(m) == 0 for s in tight.sources.values() for m in s.maps())
