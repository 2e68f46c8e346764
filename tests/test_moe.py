"""Mixture of experts (chapter 13): expert parallelism against one process at 2, 3 and 4 ranks (forward, gradients,
3 AdamW steps, counted all-to-all bytes against the routing's formula), dp x ep on 4 ranks, capacity against a
planted routing, the exercises (load-balancing loss, capacity, the dispatch permutation, the count exchange), the
Hugging Face Mixtral block as reference, and bad input refused by name."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from minidist import comm, launch
from minidist.grading import implementation
from minidist.moe import Expert, Experts, MoE, expert_parallel, unpermute
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
    assert r["capacity"] == 4 and r["dropped"] == r["formula"] == 17
    assert r["kept"] == r["kept_formula"] == [4, 4, 4, 3] and r["kept_differently"] == 0   # expert 3 under capacity
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
    assert "replicas differ by 0\n" in capsys.readouterr().out   # dense weights over 4 ranks, experts over 2


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
        main(["plan", "--experts", "8", "--gpus", "8", "--gpu-memory-gb", "80"])
    assert "--experts needs --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--params", "7e9", "--top-k", "2", "--gpus", "8", "--gpu-memory-gb", "80"])
    assert "--params does nothing for a mixture of experts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--model", "llama3-8b", "--top-k", "2", "--gpus", "8", "--gpu-memory-gb", "80"])
    assert "--top-k needs --experts E" in capsys.readouterr().err


def test_a_tiny_mixtral_trains_with_ep_x_tp_as_one_process():
    from minidist.tour.moe_train import mixtral, mixtral_ep_against_one_process
    mixtral()   # transformers' lazy imports done once here, before the ranks fork
    for r in launch(mixtral_ep_against_one_process, 4, 2, 8, 16, 2):   # ep 2 x tp 2 (the attention), 2 AdamW steps
        assert r["weights"] <= ADAM_TOL and r["alltoall_bytes"] > 0, r
        assert max(abs(a - b) for a, b in zip(r["losses"], r["reference_losses"])) <= 1e-5, r


# Review fixes: checkpoints keep global expert names, a rank with no tokens, empty messages, reduce_gradients' group.

def _save_and_load(path):
    from minidist import checkpoint
    torch.manual_seed(0)
    full = MoE(8, 16, 4, 2)
    checkpoint.save(path, expert_parallel(copy.deepcopy(full)))
    torch.manual_seed(1)
    fresh = expert_parallel(MoE(8, 16, 4, 2))
    checkpoint.load(path, fresh)
    names = sorted(k for k in fresh.state_dict() if k.startswith("experts."))
    loaded = all(torch.equal(p, full.state_dict()[k]) for k, p in fresh.state_dict().items())
    return names, loaded


def test_an_expert_parallel_checkpoint_keeps_global_expert_names_and_loads_at_ep_2_and_into_one_process(tmp_path):
    from minidist import checkpoint
    path = str(tmp_path / "ckpt")
    per_rank = launch(_save_and_load, 2, path)
    assert [names[0].split(".")[1] for names, _ in per_rank] == ["0", "2"]   # experts.0.*, experts.2.*: global ids
    assert all(loaded for _, loaded in per_rank)
    torch.manual_seed(0)
    full = MoE(8, 16, 4, 2)
    torch.manual_seed(1)
    one = MoE(8, 16, 4, 2)
    checkpoint.load(path, one)
    assert all(torch.equal(p, full.state_dict()[k]) for k, p in one.state_dict().items())


def _planted_ep(tokens_per_rank):
    """Every token routed to experts 0 and 1 (rank 0's block; router = the first input feature, x0 > 0), the last rank
    with no tokens: messages between most pairs are empty. Outputs, gradients and the aux loss against one process."""
    world, rank = dist.get_world_size(), dist.get_rank()
    n_experts = 2 * world
    torch.manual_seed(0)
    reference = MoE(n_experts, 8, n_experts, 2)
    with torch.no_grad():
        reference.router.weight.zero_()
        reference.router.weight[0, 0], reference.router.weight[1, 0] = 3.0, 2.0
    moe = expert_parallel(copy.deepcopy(reference))
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(1, tokens_per_rank if r < world - 1 else 0, n_experts, generator=g) for r in range(world)]
    for x in xs:
        x[..., 0] = x[..., 0].abs() + 1
    ref_out = [reference(x.clone().requires_grad_()) for x in xs]
    sum(o.square().sum() for o in ref_out).div(world).backward()
    out = moe(xs[rank])
    aux = moe.aux_loss
    (out.square().sum() + 0 * aux).backward()
    from minidist.moe import reduce_gradients
    reduce_gradients(moe)
    ref = dict(reference.named_parameters())
    grads = max((p.grad - ref[k].grad).abs().max().item() for k, p in moe.named_parameters())
    return {"forward": (out - ref_out[rank]).abs().max().item() if out.numel() else 0.0, "grads": grads,
            "aux_finite": bool(torch.isfinite(aux)), "tokens": out.shape[1], "kept": moe.tokens_per_expert.tolist()}


@pytest.mark.parametrize("world", [3, 4])
def test_planted_routing_with_empty_messages_and_a_rank_with_no_tokens_equals_one_process(world, monkeypatch):
    monkeypatch.setenv("MINIDIST_STRICT_P2P", "1")   # NCCL's point-to-point rules, emulated
    per_rank = launch(_planted_ep, world, 5)
    assert [r["tokens"] for r in per_rank] == [5] * (world - 1) + [0]
    for rank, r in enumerate(per_rank):
        assert r["aux_finite"] and r["forward"] <= FWD_TOL and r["grads"] <= FWD_TOL, r
        assert r["kept"][2:] == [0] * (2 * world - 2), r                  # nothing for the other ranks' experts


def _wrong_replicate_group():
    from minidist.mesh import Mesh
    from minidist.moe import reduce_gradients
    mesh = Mesh.from_axes([("replicate", 2), ("ep", 2)])
    moe = expert_parallel(MoE(8, 16, 4, 2), mesh.group("ep"), mesh.group("replicate"))
    moe(torch.randn(1, 3, 8)).sum().backward()
    try:
        reduce_gradients(moe, None, None)
        message = None
    except ValueError as e:
        message = str(e)
    dist.barrier()
    return message


def test_reduce_gradients_refuses_a_replicate_group_other_than_the_one_expert_parallel_recorded():
    for message in launch(_wrong_replicate_group, 4):
        assert message and "differs from the one expert_parallel recorded" in message


def _replicas_holding_different_experts():
    from minidist.mesh import Mesh
    mesh = Mesh.from_axes([("replicate", 2), ("ep", 2)])
    try:
        expert_parallel(MoE(8, 16, 4, 2), mesh.group("ep"), mesh.group("ep"))   # the ep group given as replicas
        return None
    except ValueError as e:
        return str(e)


def test_expert_parallel_refuses_a_replicate_group_whose_ranks_hold_different_experts():
    for message in launch(_replicas_holding_different_experts, 4):
        assert message and "replicate_group holds ranks with different blocks of experts" in message


def test_expert_parallel_with_a_capacity_equals_one_process_applying_it_per_rank():
    per_rank = launch(ep_against_one_process, 2, 8, 1, 0.5)   # C from each rank's own tokens, as the reference does
    assert all(r["dropped"] > 0 for r in per_rank)
    for r in per_rank:
        assert r["forward"] <= FWD_TOL and r["grads"] <= FWD_TOL and r["weights"] <= ADAM_TOL, r


# The router's gradient, and top_k = 1.

def test_the_task_loss_reaches_only_the_chosen_logits_with_renormalized_top_k():
    from minidist.tour.moe import router_gradient
    r = router_gradient()
    assert r["unchosen"] < 1e-6 and r["chosen"] > 1e-3, r


def test_top_1_is_refused_renormalized_and_gives_the_router_a_gradient_with_raw_probabilities():
    with pytest.raises(ValueError, match="top_k=1 with renormalized weights gives every token weight 1"):
        MoE(8, 16, 4, top_k=1)
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, top_k=1, normalize=False)
    x = torch.randn(1, 6, 8)
    moe(x).square().sum().backward()
    assert moe.router.weight.grad.abs().max() > 1e-3


# layout_costs' TP row against a tensor-parallel expert run and counted.

def test_layout_costs_tp_row_is_what_a_tensor_parallel_expert_sends():
    from minidist.tour.moe import tp_expert_bytes
    for r in launch(tp_expert_bytes, 3):
        assert r["forward"] <= FWD_TOL and r["input_grad"] <= FWD_TOL, r
        assert r["counted"] and r["bytes"] == r["bytes_theory"], r      # 4 (N-1) S d b, not EP's k (N-1)/N share


def test_experts_are_a_module_list_indexed_in_order_whose_names_stay_global():
    moe = MoE(8, 16, 4)
    assert isinstance(moe.experts, torch.nn.ModuleList) and len(moe.experts) == 4
    assert [e for e in moe.experts] == [moe.experts[i] for i in range(4)] and moe.experts[-1] is moe.experts[3]
    held = Experts({2: moe.experts[2], 3: moe.experts[3]})   # what expert_parallel leaves on rank 1 of 2
    assert held[0] is moe.experts[2] and len(held[1:]) == 1
    assert sorted({k.split(".")[0] for k in held.state_dict()}) == ["2", "3"]
    with pytest.raises(TypeError, match="fixed"):
        held.append(Expert(8, 16))
