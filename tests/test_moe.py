"""Mixture of experts (chapter 13): expert parallelism against one process at 2, 3 and 4 ranks (forward, gradients,
3 AdamW steps, counted all-to-all bytes against the routing's formula), dp x ep on 4 ranks, capacity against a
planted routing, the exercises (load-balancing loss, capacity, the dispatch permutation, the count exchange), the
Hugging Face Mixtral block as reference, and bad input refused by name."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from minidist import comm, launch
from minidist.grading import implementation
from minidist.moe import MoE, expert_parallel, unpermute
from minidist.tour.moe import ADAM_TOL, FWD_TOL, ep_against_one_process, experts_for, planted_capacity
from minidist.tour.moe_refs import mixtral_against_minidist


# Expert parallelism against one process.

@pytest.mark.parametrize("world", [2, 3, 4])
def test_expert_parallel_equals_one_process(world):
    per_rank = launch(ep_against_one_process, world, experts_for(world))
    held = sorted(e for r in per_rank for e in r["expert_ids"])
    assert held == list(range(experts_for(world)))                   # every expert on exactly one rank
    for r in per_rank:
        assert r["forward"] <= FWD_TOL and r["grads"] <= FWD_TOL and r["weights"] <= ADAM_TOL, r
        assert r["counted"] and r["bytes"] == r["bytes_theory"] > 0, r   # all-to-all bytes = the routing's formula


def test_averaging_expert_gradients_over_the_ep_group_is_caught():
    per_rank = launch(ep_against_one_process, 2, 8, 1, None, True)
    assert max(r["grads"] for r in per_rank) > 1e-3


def test_dp_x_ep_on_four_ranks_equals_one_process():
    per_rank = launch(ep_against_one_process, 4, 8, 2)
    assert [r["expert_ids"] for r in per_rank] == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2   # replicas hold the same block
    for r in per_rank:
        assert r["forward"] <= FWD_TOL and r["grads"] <= FWD_TOL and r["weights"] <= ADAM_TOL, r
        assert r["bytes"] == r["bytes_theory"] > 0, r


def test_capacity_drops_what_the_formula_says_for_a_planted_routing():
    r = planted_capacity()
    assert r["capacity"] == 4 and r["dropped"] == r["formula"] == 16
    assert r["kept"] == r["kept_formula"] and r["same_kept"]
    assert r["none_kept"] > 0 and r["dropped_tokens_output"] == 0


def test_a_mixtral_block_loaded_into_minidist_gives_its_outputs_and_its_aux_loss():
    r = mixtral_against_minidist()
    assert r["outputs"] <= FWD_TOL and r["aux_loss"] <= FWD_TOL, r


def test_dropless_layer_renormalizes_top_k_and_gives_the_weighted_average_of_experts():
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, top_k=2)
    x = torch.randn(2, 3, 8)
    flat = x.view(-1, 8)
    probs = moe.router(flat).softmax(-1)
    top, chosen = probs.topk(2, -1)
    expected = torch.stack([sum(top[s, j] / top[s].sum() * moe.experts[int(chosen[s, j])](flat[s]) for j in range(2))
                            for s in range(6)])
    assert (moe(x).view(-1, 8) - expected).abs().max() < 1e-6
    assert moe.dropped == 0 and int(moe.tokens_per_expert.sum()) == 12


# Bad input, refused by name.

@pytest.mark.parametrize("args, kwargs, message", [
    ((8, 16, 4, 5), {}, "top_k 5 is more than the 4 experts"),
    ((8, 16, 0), {}, "n_experts must be a positive integer, got 0"),
    ((8, 16, 4), {"capacity_factor": 0}, "capacity_factor must be a positive number or None"),
    ((8, 16.5, 4), {}, "d_ff must be a positive integer"),
])
def test_bad_layer_arguments_are_refused_by_name(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoE(*args, **kwargs)


def test_a_wrong_input_shape_is_refused():
    with pytest.raises(ValueError, match=r"MoE takes \(B, T, 8\) inputs, got \(3, 8\)"):
        MoE(8, 16, 4)(torch.randn(3, 8))


def _refusals():
    out = []
    for make in (lambda: expert_parallel(MoE(8, 16, 5)),
                 lambda: expert_parallel(expert_parallel(MoE(8, 16, 4))),
                 lambda: expert_parallel(torch.nn.Linear(2, 2)),
                 lambda: comm.all_to_all_uneven(torch.zeros(3, 2), [1, 1], [1, 1]),
                 lambda: comm.all_to_all_uneven(torch.zeros(3, 2), [3], [3])):
        try:
            make()
            out.append(None)
        except (ValueError, TypeError) as e:
            out.append(str(e))
    dist.barrier()
    return out


def test_expert_parallel_refuses_what_it_cannot_shard():
    messages = launch(_refusals, 2)[0]
    assert messages[0] == "5 experts not divisible by the expert-parallel size 2"
    assert messages[1] == "this MoE is expert-parallel already"
    assert "takes a minidist.moe.MoE, got Linear" in messages[2]
    assert messages[3] == "send_counts add up to 2 rows, x has 3"
    assert "need one count per rank of the group (2)" in messages[4]


# Exercise load_balancing_loss.

@pytest.mark.exercise("load_balancing_loss")
def test_load_balancing_loss_is_k_when_balanced_and_grows_when_routing_collapses():
    uniform = torch.full((8, 4), 0.25)
    balanced = torch.tensor([[0, 1], [2, 3]] * 4)
    assert implementation("load_balancing_loss")(uniform, balanced).item() == pytest.approx(2.0)
    collapsed_probs = torch.tensor([[0.7, 0.2, 0.05, 0.05]] * 8)
    collapsed = torch.tensor([[0, 1]] * 8)
    # f = (1, 1, 0, 0), P = (0.7, 0.2, .05, .05): 4 * (0.7 + 0.2)
    assert implementation("load_balancing_loss")(collapsed_probs, collapsed).item() == pytest.approx(3.6)


@pytest.mark.exercise("load_balancing_loss")
def test_load_balancing_loss_equals_transformers_and_its_gradient_flows_through_p_only():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    logits = torch.randn(20, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    probs = logits.softmax(-1)
    chosen = probs.topk(2, -1).indices
    loss = implementation("load_balancing_loss")(probs, chosen)
    assert abs(loss.item() - load_balancing_loss_func((logits,), 6, 2).item()) < 1e-6
    loss.backward()
    f = F.one_hot(chosen, 6).sum(1).float().mean(0)
    expected = torch.autograd.grad((6 * f * logits.softmax(-1).mean(0)).sum(), logits)[0]
    assert (logits.grad - expected).abs().max() < 1e-6


# Exercise keep_within_capacity.

@pytest.mark.exercise("keep_within_capacity")
def test_capacity_keeps_first_choices_before_second_choices():
    chosen = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    keep = implementation("keep_within_capacity")(chosen, 2, 2)
    # expert 0: first choices of tokens 0, 1, 3 (keeps 0, 1), then token 2's second choice (dropped)
    # expert 1: token 2's first choice, then the second choices of tokens 0, 1, 3 (keeps 0)
    assert keep.tolist() == [[True, True], [True, False], [True, False], [False, False]]


@pytest.mark.exercise("keep_within_capacity")
@pytest.mark.parametrize("cap", [1, 3, 5, 40])
def test_capacity_keeps_at_most_cap_per_expert_and_drops_only_over_it(cap):
    chosen = torch.randint(4, (30, 2), generator=torch.Generator().manual_seed(cap))
    chosen[:, 1] = (chosen[:, 0] + 1 + chosen[:, 1] % 3) % 4      # two different experts per token
    keep = implementation("keep_within_capacity")(chosen, 4, cap)
    assert keep.shape == chosen.shape and keep.dtype == torch.bool
    for e in range(4):
        n = int((chosen == e).sum())
        assert int(((chosen == e) & keep).sum()) == min(n, cap)


# Exercise permute (the dispatch permutation), with unpermute as its inverse.

@pytest.mark.exercise("permute")
def test_permute_groups_tokens_by_expert_in_token_order():
    x = torch.arange(8.).view(4, 2)
    chosen = torch.tensor([[2, 0], [0, 1], [2, 1], [1, 0]])
    keep = torch.tensor([[True, True], [True, True], [True, False], [True, True]])
    rows, order, counts = implementation("permute")(x, chosen, keep, 3)
    assert counts.tolist() == [3, 2, 2]
    assert order.tolist() == [1, 2, 7, 3, 6, 0, 4]      # expert 0: (0,1) (1,0) (3,1); expert 1: (1,1) (3,0); ...
    assert torch.equal(rows, x[torch.tensor([0, 1, 3, 1, 3, 0, 2])])


@pytest.mark.exercise("permute")
def test_unpermute_inverts_permute_and_the_gradient_reaches_every_token():
    x = torch.randn(10, 3, requires_grad=True)
    chosen = torch.randint(5, (10, 2), generator=torch.Generator().manual_seed(1))
    keep = torch.ones(10, 2, dtype=torch.bool)
    rows, order, counts = implementation("permute")(x, chosen, keep, 5)
    assert int(counts.sum()) == 20 and rows.shape == (20, 3)
    weights = torch.tensor([[0.75, 0.25]]).expand(10, 2)
    back = unpermute(rows, order, weights)
    assert (back - x).abs().max() < 1e-6                  # the weights sum to 1: x comes back
    back.sum().backward()
    assert (x.grad - 1).abs().max() < 1e-6


# Exercise exchange_counts.

def _exchange(planted_counts):
    rank, n = dist.get_rank(), dist.get_world_size()
    counts = planted_counts[rank].clone()
    with comm.ByteLedger() as ledger:
        got = implementation("exchange_counts")(counts, None)
    return got, ledger.total_bytes(), ledger.counted


@pytest.mark.exercise("exchange_counts")
@pytest.mark.parametrize("world", [2, 3, 4])
def test_exchange_counts_tells_each_rank_what_it_will_receive(world):
    experts = 2 * world
    planted = torch.arange(world * experts, dtype=torch.int64).view(world, experts) * 7 % 11   # rank i's counts
    for rank, (got, sent, counted) in enumerate(launch(_exchange, world, planted)):
        assert got.tolist() == planted[:, 2 * rank:2 * rank + 2].tolist()    # from rank i, for my 2 experts
        assert counted and sent == (world - 1) * 2 * 8                        # 2 int64 to every other rank


# The example script: --strategy ep (dp x ep with --ep).

@pytest.mark.parametrize("argv, message", [
    (["--ep", "3", "--world-size", "4"], "--ep 3 does not divide the world of 4 ranks"),
    (["--world-size", "3"], "the tiny Mixtral's 4 experts are not divisible by the expert-parallel size 3"),
    (["--model", "tiny-llama"], "--model does nothing with --strategy ep"),
    (["--checkpointing", "full"], "--checkpointing is not wired into --strategy ep"),
])
def test_the_example_refuses_what_expert_parallelism_cannot_run(argv, message, capsys):
    from minidist.examples.train import main
    with pytest.raises(SystemExit) as e:
        main(["--strategy", "ep", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_example_trains_a_tiny_mixtral_with_dp_x_ep(capsys):
    from minidist.examples.train import main
    assert main(["--strategy", "ep", "--ep", "2", "--world-size", "4", "--steps", "2", "--batch-size", "8",
                 "--block-size", "16", "--quiet"]) == 0
    assert "weights sharded over the ranks" in capsys.readouterr().out


# The planner for MoE models: an ep axis inside dp.

def test_the_moe_shapes_count_mixtrals_published_parameters():
    from minidist.moe.planning import MOE_SHAPES
    mixtral = MOE_SHAPES["mixtral-8x7b"]
    assert abs(mixtral.params() / 46.7e9 - 1) < 0.002 and abs(mixtral.active_params() / 12.9e9 - 1) < 0.002


def test_moe_plans_keep_ep_inside_dp_and_sharding_experts_saves_their_states():
    from dataclasses import replace

    from minidist.moe.planning import MOE_SHAPES, memory_per_gpu, plan_moe, step_time
    from minidist.planner import Cluster
    shape, cluster = MOE_SHAPES["mixtral-8x7b"], Cluster(64, 85.5)
    plans = plan_moe(shape, cluster, 256, top=50)
    assert len(plans) == 50 and all(p.dp % p.ep == 0 and shape.experts % p.ep == 0 for p in plans)
    assert all(p.dp * p.pp * p.tp == 64 and p.dp * p.microbatches * p.micro_batch_size == 256 for p in plans)
    assert [p.step_seconds for p in plans] == sorted(p.step_seconds for p in plans)
    one = replace(plans[0], ep=1)
    sharded = [memory_per_gpu(replace(one, ep=ep), shape, cluster) for ep in (1, 2, 4, 8)]
    assert sharded == sorted(sharded, reverse=True) and sharded[0] - sharded[-1] > 50e9   # 45 B expert parameters
    # ep 8 adds the all-to-all, but each rank then reduces an eighth of the experts' gradients over 8 replicas
    # instead of all of them over 64 ranks: on this mesh EP wins
    assert 0 < step_time(replace(one, ep=8), shape, cluster)[0] < step_time(one, shape, cluster)[0]


def test_the_planner_cli_shows_deepseek_v3s_published_mesh_and_refuses_bad_moe_flags(capsys):
    from minidist.__main__ import main
    assert main(["plan", "--model", "deepseek-v3", "--gpus", "2048", "--gpu-memory-gb", "85.5", "--global-batch",
                 "15360", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "published (DeepSeek-V3 Technical Report" in out and "  128  64  16   1    1" in out
    with pytest.raises(SystemExit):
        main(["plan", "--params", "7e9", "--experts", "8", "--gpus", "8", "--gpu-memory-gb", "80"])
    assert "--experts needs --model" in capsys.readouterr().err


def test_a_tiny_mixtral_trains_with_ep_x_tp_as_one_process():
    from minidist.tour.moe_train import mixtral, mixtral_ep_against_one_process
    mixtral()   # transformers' lazy imports done once here, before the ranks fork
    for r in launch(mixtral_ep_against_one_process, 4, 2, 8, 16, 2):   # ep 2 x tp 2 (the attention), 2 AdamW steps
        assert r["weights"] <= ADAM_TOL and r["alltoall_bytes"] > 0, r
        assert max(abs(a - b) for a, b in zip(r["losses"], r["reference_losses"])) <= 1e-5, r
