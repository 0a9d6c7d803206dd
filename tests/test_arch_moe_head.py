"""Qwen2-MoE's final norm and output head, where evomerge and mergekit 0.1.5 differ, against a plain-torch
reference computation over the safetensors.

mergekit 0.1.5 ships no architecture definition for Qwen2MoeForCausalLM (its _data/architectures has
qwen3_moe, not qwen2_moe), so it infers one from the tensor names: every tensor outside the layers becomes a
"pre" weight and none declares `tied_names`. On the families it defines (Llama, Qwen2, Mixtral, Qwen3-MoE)
`model.norm` and `lm_head` are "post" weights, taken from the last slice, and `lm_head` is tied to
`embed_tokens`: a source that stores no head (tie_word_embeddings) merges its embedding, which is the head
it computes with. On Qwen2-MoE mergekit instead takes the norm and head of passthrough slices from the
first slice's model (a head and norm that never followed the layers they now follow), and leaves a tied
source out of the head's merge (a tied base stops it: "Base input is not present"). evomerge applies the
rule mergekit states for the families it defines, on Qwen2-MoE too; these tests pin it to the reference
and record mergekit's difference.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.merge.writer import write_checkpoint
from evomerge.recipe import Recipe
from tests.arch_fixtures import flip_tying
from tests.merge_fixtures import load_checkpoint, mergekit_merge

pytest.importorskip("mergekit")

HEAD, EMBED, NORM = "lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"
DENSITY, WEIGHTS = 0.6, {"a": 0.6, "b": 0.4}
TIES = {"merge_method": "ties", "base_model": "base", "parameters": {"density": DENSITY},
        "models": [{"model": m, "parameters": {"weight": w}} for m, w in WEIGHTS.items()]}
SLICES = {"merge_method": "passthrough", "slices": [
    {"sources": [{"model": "a", "layer_range": [0, 2]}]}, {"sources": [{"model": "b", "layer_range": [1, 4]}]}]}


def ties(base: torch.Tensor, experts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES (Yadav et al. 2023) as mergekit documents it, in float64: keep each delta's DENSITY largest
    magnitudes, elect each entry's sign by the weighted sum, average the agreeing deltas by their weights."""
    deltas = []
    for e in experts:
        d = (e - base).double()
        keep = d.abs().flatten().topk(int(DENSITY * d.numel())).indices
        deltas.append(torch.zeros(d.numel(), dtype=d.dtype).index_copy_(0, keep, d.flatten()[keep]).view_as(d))
    w = torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * base.dim())
    weighted = torch.stack(deltas) * w
    agree = weighted.sign() == torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    divisor = (w * agree).sum(0)
    return base.double() + (weighted * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)


def head(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head a checkpoint computes with: its stored lm_head, else (tied) its embedding."""
    return sd.get(HEAD, sd[EMBED])


def loaded(path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def close(x: torch.Tensor, ref: torch.Tensor) -> bool:
    return ((x.double() - ref).abs().max() / ref.abs().max()).item() < 1e-6


@pytest.mark.parametrize("family", ["qwen2_moe", "llama"])
@pytest.mark.parametrize("tied", ["a", "base"])
def test_ties_merges_a_tied_sources_embedding_as_its_head(family, tied, family_models, tmp_path):
    paths = dict(family_models(family))
    paths[tied] = flip_tying(paths[tied], tmp_path / f"{tied}_tied", family)
    sd = {k: load_checkpoint(p) for k, p in paths.items()}
    assert HEAD not in sd[tied] and HEAD in sd["b"]
    assert torch.equal(loaded(paths[tied])[HEAD], sd[tied][EMBED])  # the head the tied source computes with
    reference = ties(head(sd["base"]), [head(sd["a"]), head(sd["b"])], list(WEIGHTS.values()))
    ours = loaded(write_checkpoint(Recipe.from_dict(TIES), {k: str(p) for k, p in paths.items()}, tmp_path / "ours"))
    assert close(ours[HEAD], reference)
    if family == "llama":  # mergekit's own rule, where its architecture definition declares the tie
        assert close(head(mergekit_merge(TIES, paths, tmp_path / "mk")), reference)
    elif tied == "base":
        with pytest.raises(ValueError, match="Base input is not present in merge inputs for lm_head.weight"):
            mergekit_merge(TIES, paths, tmp_path / "mk")
    else:  # mergekit 0.1.5's Qwen2-MoE: the tied expert left out of the head's merge
        theirs = mergekit_merge(TIES, paths, tmp_path / "mk")[HEAD]
        assert close(theirs, ties(sd["base"][HEAD], [sd["b"][HEAD]], [WEIGHTS["b"]])) and not close(theirs, reference)


@pytest.mark.parametrize("family", ["qwen2_moe", "llama"])
def test_passthrough_slices_end_with_the_last_slices_norm_and_head(family, family_models, tmp_path):
    paths = family_models(family)
    sd = {k: load_checkpoint(paths[k]) for k in ("a", "b")}
    ours = loaded(write_checkpoint(Recipe.from_dict(SLICES), {k: str(p) for k, p in paths.items()}, tmp_path / "ours"))
    theirs = mergekit_merge(SLICES, paths, tmp_path / "mk")  # as stored (without Qwen2-MoE's experts: test_arch_matrix.py)
    assert torch.equal(ours[EMBED], sd["a"][EMBED]) and torch.equal(theirs[EMBED], sd["a"][EMBED])
    for name in (NORM, HEAD):
        assert torch.equal(ours[name], sd["b"][name]), name
        # mergekit 0.1.5 agrees on Llama; on Qwen2-MoE its inferred "pre" weights come from the first slice
        assert torch.equal(theirs[name], sd["b" if family == "llama" else "a"][name]), name


def test_passthrough_ending_in_a_tied_model_ends_with_its_embedding_as_the_head(family_models, tmp_path):
    paths = dict(family_models("qwen2_moe"))
    paths["b"] = flip_tying(paths["b"], tmp_path / "b_tied", "qwen2_moe")
    ours = loaded(write_checkpoint(Recipe.from_dict(SLICES), {k: str(p) for k, p in paths.items()}, tmp_path / "ours"))
    assert torch.equal(ours[EMBED], load_checkpoint(paths["a"])[EMBED])
    assert torch.equal(ours[HEAD], load_checkpoint(paths["b"])[EMBED])
