"""The method's invariants (DESIGN.md §2): G-WPR, selection, recovery, stock equality, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atedm_export.dsap import keep_count
from atedm_export.errors import PlanError
from atedm_export.contract import GraphContract
from atedm_export.pruning import AtedmOptions, StagePlan, apply_pruning, patched_blocks, remove_pruning
from atedm_export.pruning.attention import attention_with_map
from atedm_export.pruning.gwpr import cross_gwpr_scores, gwpr_scores
from atedm_export.pruning.recover import copy_recover, recovery_sources, skip_recover
from atedm_export.pruning.select import gather_tokens, keep_indices, token_ranks

from .conftest import run


def _stochastic(batch: int, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, n, generator=gen).mul(3).softmax(-1)


def _power_iteration(a: np.ndarray, iterations: int, damping: float = 1.0) -> np.ndarray:
    n = a.shape[0]
    s = np.full(n, 1.0 / n)
    for _ in range(iterations):
        s = damping * (s @ a) + (1.0 - damping) / n
    return s


# --- G-WPR ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("iterations", "damping"), [(1, 1.0), (5, 1.0), (20, 0.85)])
def test_gwpr_matches_reference_power_iteration(iterations, damping):
    attn = _stochastic(3, 40)
    got = gwpr_scores(attn, iterations, damping)
    for b in range(3):
        want = _power_iteration(attn[b].double().numpy(), iterations, damping)
        np.testing.assert_allclose(got[b].numpy(), want, rtol=1e-5, atol=1e-7)


def test_gwpr_is_permutation_equivariant():
    attn = _stochastic(2, 33, seed=3)
    perm = torch.randperm(33, generator=torch.Generator().manual_seed(4))
    permuted = attn[:, perm][:, :, perm]
    torch.testing.assert_close(gwpr_scores(permuted), gwpr_scores(attn)[:, perm])


def test_uniform_attention_gives_uniform_scores():
    attn = torch.full((2, 16, 16), 1.0 / 16)
    torch.testing.assert_close(gwpr_scores(attn), torch.full((2, 16), 1.0 / 16))


def test_gwpr_scores_are_a_distribution_in_fp32():
    scores = gwpr_scores(_stochastic(2, 20).half())
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.sum(-1), torch.ones(2), rtol=1e-3, atol=1e-3)


def test_attended_token_ranks_first():
    attn = torch.full((1, 8, 8), 0.02)
    attn[0, :, 5] = 1.0
    attn = attn / attn.sum(-1, keepdim=True)
    assert gwpr_scores(attn).argmax().item() == 5


def test_head_combinations_keep_rows_stochastic(tiny_unet):
    """The map is built one head at a time; mean and max both give a transition matrix, and differ."""
    attn = tiny_unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    x = torch.randn(2, 10, 64)
    maps = {how: attention_with_map(attn, x, heads=how)[1] for how in ("mean", "max")}
    for how, got in maps.items():
        torch.testing.assert_close(got.sum(-1), torch.ones(2, 10))
    assert not torch.allclose(maps["mean"], maps["max"])


def test_cross_variant_prefers_tokens_that_attend_to_important_text():
    cross = torch.full((1, 6, 4), 0.25)
    cross[0, 2] = torch.tensor([0.97, 0.01, 0.01, 0.01])  # token 2 attends to text token 0 ...
    cross[0, 4] = torch.tensor([0.70, 0.10, 0.10, 0.10])  # ... as do others, making text 0 important
    scores = cross_gwpr_scores(cross)
    assert scores.argmax().item() == 2
    torch.testing.assert_close(scores.sum(-1), torch.ones(1))


# --- selection -----------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [1, 7, 37, 100])
def test_selection_equals_topk_on_distinct_scores(keep):
    scores = torch.rand(3, 100, generator=torch.Generator().manual_seed(keep))
    got = keep_indices(scores, keep)
    want = scores.topk(keep, dim=1).indices
    assert torch.equal(got, want)


def test_ties_go_to_the_lower_index():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1, 0.5]])
    assert token_ranks(scores).tolist() == [[2.0, 0.0, 3.0, 1.0, 5.0, 4.0]]
    assert keep_indices(scores, 4).tolist() == [[1, 3, 0, 2]]
    assert keep_indices(torch.zeros(1, 5), 3).tolist() == [[0, 1, 2]]


def test_keep_count_outside_range_is_refused():
    with pytest.raises(ValueError, match="keep count"):
        keep_indices(torch.rand(1, 8), 9)


# --- recovery ------------------------------------------------------------------------------------


def test_copy_recovery_keeps_kept_tokens_and_copies_most_attended():
    torch.manual_seed(0)
    attn = _stochastic(2, 30, seed=7)
    kept = keep_indices(gwpr_scores(attn), 11)
    tokens = torch.randn(2, 30, 8)
    kept_out = gather_tokens(tokens, kept) * 2 + 1  # what later layers made of the kept tokens
    full = copy_recover(kept_out, recovery_sources(attn, kept))
    for b in range(2):
        kept_set = kept[b].tolist()
        for slot, i in enumerate(kept_set):
            assert torch.equal(full[b, i], kept_out[b, slot])
        for i in set(range(30)) - set(kept_set):
            best = max(kept_set, key=lambda j: attn[b, i, j].item())
            assert torch.equal(full[b, i], kept_out[b, kept_set.index(best)])


def test_skip_recovery_keeps_pruned_values():
    tokens = torch.randn(1, 6, 3)
    kept = torch.tensor([[4, 1]])
    kept_out = torch.randn(1, 2, 3)
    full = skip_recover(tokens, kept_out, kept)
    assert torch.equal(full[0, [4, 1]], kept_out[0])
    assert torch.equal(full[0, [0, 2, 3, 5]], tokens[0, [0, 2, 3, 5]])


# --- the patched UNet ----------------------------------------------------------------------------


def _uniform_plan(blocks, ratio: float, **options) -> StagePlan:
    return StagePlan({b.name: keep_count(ratio, b.tokens) for b in blocks}, AtedmOptions(**options))


@pytest.mark.parametrize("prune_point", ["layer", "attn1"])
@pytest.mark.parametrize("recovery", ["copy", "skip"])
def test_keeping_every_token_equals_stock(tiny_unet, tiny_blocks, tiny_inputs, prune_point, recovery):
    stock = run(tiny_unet, tiny_inputs)
    apply_pruning(tiny_unet, _uniform_plan(tiny_blocks, 1.0, prune_point=prune_point, recovery=recovery))
    assert len(patched_blocks(tiny_unet)) == 11  # the pruned path really ran, with k = N
    torch.testing.assert_close(run(tiny_unet, tiny_inputs), stock, atol=1e-5, rtol=0)


def test_remove_restores_the_stock_module(tiny_unet, tiny_blocks, tiny_inputs):
    stock_classes = {n: type(m) for n, m in tiny_unet.named_modules()}
    stock_state = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    stock = run(tiny_unet, tiny_inputs)
    apply_pruning(tiny_unet, _uniform_plan(tiny_blocks, 0.37))
    apply_pruning(tiny_unet, _uniform_plan(tiny_blocks, 0.5))  # applying twice replaces the plan
    assert set(patched_blocks(tiny_unet).values()) == {128, 32}
    remove_pruning(tiny_unet)
    remove_pruning(tiny_unet)
    assert {n: type(m) for n, m in tiny_unet.named_modules()} == stock_classes
    assert not any(hasattr(m, "_atedm") for m in tiny_unet.modules())
    assert all(torch.equal(v, stock_state[k]) for k, v in tiny_unet.state_dict().items())
    assert torch.equal(run(tiny_unet, tiny_inputs), stock)


def test_applying_twice_equals_applying_once(tiny_unet, tiny_blocks, tiny_inputs):
    plan = _uniform_plan(tiny_blocks, 0.37)
    once = run(apply_pruning(tiny_unet, plan), tiny_inputs)
    twice = run(apply_pruning(apply_pruning(tiny_unet, plan), plan), tiny_inputs)
    assert torch.equal(once, twice)


@pytest.mark.parametrize(
    "options",
    [{}, {"prune_point": "attn1"}, {"recovery": "skip"}, {"importance": "cross"}, {"heads": "max"}, {"damping": 0.85}],
)
def test_pruned_output_is_finite_and_differs(tiny_unet, tiny_blocks, tiny_inputs, options):
    stock = run(tiny_unet, tiny_inputs)
    pruned = run(apply_pruning(tiny_unet, _uniform_plan(tiny_blocks, 0.37, **options)), tiny_inputs)
    assert pruned.shape == stock.shape
    assert torch.isfinite(pruned).all()
    assert (pruned - stock).abs().max() > 1e-3


def test_unpruned_blocks_keep_their_stock_class(tiny_unet, tiny_blocks):
    plan = StagePlan({tiny_blocks[0].name: 10})
    apply_pruning(tiny_unet, plan)
    assert list(patched_blocks(tiny_unet)) == [tiny_blocks[0].name]


def test_attention_map_is_fp32_for_half_models(tiny_unet):
    attn = tiny_unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to(torch.bfloat16)
    out, probs = attention_with_map(attn, torch.randn(2, 16, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 16))


def test_explicit_attention_equals_the_stock_processor(tiny_unet):
    attn = tiny_unet.down_blocks[2].attentions[0].transformer_blocks[0].attn1
    x = torch.randn(2, 64, 96)
    out, _ = attention_with_map(attn, x)
    torch.testing.assert_close(out, attn(x), atol=1e-5, rtol=1e-5)


def test_half_precision_unet_runs_pruned(tiny_dir, tiny_blocks, tiny_inputs):
    from atedm_export.models import load_unet

    unet = load_unet(str(tiny_dir), dtype=torch.bfloat16)
    apply_pruning(unet, _uniform_plan(tiny_blocks, 0.37))
    inputs = {k: v.to(torch.bfloat16) if k != "timestep" else v for k, v in tiny_inputs.items() if k != "added_cond_kwargs"}
    inputs["added_cond_kwargs"] = {k: v.to(torch.bfloat16) for k, v in tiny_inputs["added_cond_kwargs"].items()}
    out = run(unet, inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.slow
def test_pruned_unet_exports_as_one_static_graph(tiny_unet, tiny_blocks, tiny_inputs):
    apply_pruning(tiny_unet, _uniform_plan(tiny_blocks, 0.37))
    graph = GraphContract.from_config(dict(tiny_unet.config), 2, 256, 256).module(tiny_unet)
    args = (tiny_inputs["sample"], tiny_inputs["timestep"], tiny_inputs["encoder_hidden_states"],
            *tiny_inputs["added_cond_kwargs"].values())
    exported = torch.export.export(graph, args, strict=False)
    placeholders = [n for n in exported.graph.nodes if n.op == "placeholder" and n.meta.get("val") is not None]
    assert all(not any(isinstance(d, torch.SymInt) for d in n.meta["val"].shape) for n in placeholders)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(*args), graph(*args), atol=1e-6, rtol=0)


# --- bad plans -----------------------------------------------------------------------------------


def test_unknown_block_name_is_refused(tiny_unet):
    with pytest.raises(PlanError, match="unknown attention block 'down_blocks.9.attentions.0'.*the UNet has"):
        apply_pruning(tiny_unet, StagePlan({"down_blocks.9.attentions.0": 4}))


def test_bad_keep_counts_and_options_are_refused(tiny_unet, tiny_blocks, tiny_inputs):
    with pytest.raises(PlanError, match="positive integer"):
        apply_pruning(tiny_unet, StagePlan({tiny_blocks[0].name: 0}))
    apply_pruning(tiny_unet, StagePlan({tiny_blocks[0].name: 10_000}))
    with pytest.raises(PlanError, match="exceeds the block's 256 tokens"):
        run(tiny_unet, tiny_inputs)
    with pytest.raises(PlanError, match="needs prune_point 'layer'"):
        AtedmOptions(importance="cross", prune_point="attn1")


def test_a_plan_made_at_one_resolution_is_refused_at_another(tiny_unet, tiny_blocks):
    """tiny_blocks are at 256 px: run at 512 px the same keep counts would keep a quarter of the fraction."""
    from atedm_export.contract import GraphContract
    from atedm_export.dsap import load_preset, stage_plan

    plan = stage_plan(load_preset("uniform-63").stages[0], tiny_blocks)
    apply_pruning(tiny_unet, plan)
    contract = GraphContract.from_config(dict(tiny_unet.config), 2, 512, 512)
    with pytest.raises(PlanError, match=r"of down_blocks\.1\.attentions\.0's 256 tokens, but this call gives the block "
                                        r"32x32 = 1024: make the plan at the resolution"):
        run(tiny_unet, contract.unet_kwargs(contract.example_feed()))
    remove_pruning(tiny_unet)
