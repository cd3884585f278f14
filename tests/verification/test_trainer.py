"""The batched trainer equals a plain loop of torch.optim.Adam runs; padded ranks stay exactly zero."""

import numpy as np
import pytest
import torch
from torch.func import functional_call

import lora_theory
from lora_theory.numerics import relative_error
from verification.models import TorchFNN, TorchTFN
from verification.trainer import (
    BatchStream,
    FNNStack,
    StackedAdam,
    TFNStack,
    lora_init_A,
    subnormals_are_flushed,
    subnormals_flushed,
    train_stack,
)

D, L, LBAR, BATCH, STEPS = 6, 3, 1, 32, 200


def _fnn_problem(R, seed=0):
    frozen = [lora_theory.random_fnn(D, L, seed=seed + i) for i in range(R)]
    targets = [lora_theory.random_fnn(D, LBAR, seed=100 + seed + k) for k in range(2)]
    return frozen, targets


def _stack_arrays(models):
    return np.stack([np.stack(m.weights) for m in models]), np.stack([np.stack(m.biases) for m in models])


def _stack_tfn(models) -> dict:
    """The TFNs' parameters under their names, stacked along a leading run dimension (TFNStack's input)."""
    return {k: np.stack([m.parameters()[k] for m in models]) for k in models[0].parameters()}


def _reference_fnn_lora(frozen, target, ranks, tune_bias, lr, wd, data_seed, init_seed, steps):
    """One run, the textbook way: TorchFNN, adapters as nn.Parameters, torch.optim.Adam."""
    model = TorchFNN.from_numpy(frozen)
    target_model = TorchFNN.from_numpy(target)
    for p in model.parameters():
        p.requires_grad_(False)
    A = [torch.nn.Parameter(a.clone()) for a in lora_init_A(init_seed, ranks, D)]
    B = [torch.nn.Parameter(torch.zeros(D, r, dtype=torch.float64)) for r in ranks]
    params = A + B
    if tune_bias:
        for layer in model.layers:
            layer.bias.requires_grad_(True)
            params.append(layer.bias)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=wd)
    stream = BatchStream(data_seed, BATCH, (D,))
    for _ in range(steps):
        x = stream.next()
        with torch.no_grad():
            y = target_model(x)
        state = {f"layers.{l}.weight": model.layers[l].weight + B[l] @ A[l] for l in range(L)}
        pred = functional_call(model, state, (x,), strict=False)
        loss = ((pred - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [a.detach() for a in A], [b.detach() for b in B], [l.bias.detach() for l in model.layers]


@pytest.mark.parametrize("backward", ["manual", "autograd"])
def test_lora_stack_equals_loop_of_torch_adam(backward):
    R = 4
    frozen, targets = _fnn_problem(R)
    ranks = np.array([[1, 1, 1], [3, 0, 2], [6, 6, 6], [2, 2, 2]])
    tune_bias = np.array([True, False, True, False])
    lr = np.array([1e-2, 1e-3, 3e-3, 1e-2])
    wd = np.array([0.0, 1e-2, 1e-3, 1e-4])
    data_index = np.array([0, 1, 0, 1])  # two data seeds, each shared by two runs
    target_index = np.array([0, 1, 0, 1])
    init_seeds = np.array([11, 12, 13, 14])
    W, b = _stack_arrays(frozen)
    TW, Tb = _stack_arrays(targets)
    stack = FNNStack(W, b, ranks=ranks, tune_bias=tune_bias, init_seeds=init_seeds, dtype=torch.float64)
    target = FNNStack(TW, Tb, method="none", dtype=torch.float64)
    train_stack(
        stack,
        target,
        data_index=data_index,
        target_index=target_index,
        target_data_index=[0, 1],
        data_seeds=[7, 8],
        lr=lr,
        weight_decay=wd,
        iterations=STEPS,
        batch_size=BATCH,
        backward=backward,
    )
    for i in range(R):
        A, B, biases = _reference_fnn_lora(
            frozen[i],
            targets[target_index[i]],
            ranks[i].tolist(),
            tune_bias[i],
            lr[i],
            wd[i],
            [7, 8][data_index[i]],
            init_seeds[i],
            STEPS,
        )
        got = stack.adapters(i)
        for l in range(L):
            if ranks[i, l]:
                assert relative_error(got[l][0], A[l].numpy()) <= 1e-6
                assert relative_error(got[l][1], B[l].numpy()) <= 1e-6
            assert np.abs(got[l][1]).sum() > 0 or ranks[i, l] == 0
        _, b_stack = stack.weights_and_biases()
        assert relative_error(b_stack[i].detach().numpy(), torch.stack(biases).numpy()) <= 1e-6


def test_final_layers_stack_equals_loop():
    R = 3
    frozen, targets = _fnn_problem(R, seed=5)
    tuned = np.array([1, 2, 3])
    lr = np.array([1e-2, 1e-3, 3e-3])
    wd = np.array([1e-3, 0.0, 1e-2])
    W, b = _stack_arrays(frozen)
    TW, Tb = _stack_arrays(targets)
    stack = FNNStack(W, b, method="final_layers", tuned_layers=tuned, dtype=torch.float64)
    target = FNNStack(TW, Tb, method="none", dtype=torch.float64)
    train_stack(
        stack,
        target,
        data_index=[0, 0, 0],
        target_index=[0, 1, 0],
        target_data_index=[0, 0],
        data_seeds=[3],
        lr=lr,
        weight_decay=wd,
        iterations=STEPS,
        batch_size=BATCH,
    )
    Ws, bs = stack.weights_and_biases()
    for i in range(R):
        model = TorchFNN.from_numpy(frozen[i])
        tm = TorchFNN.from_numpy(targets[[0, 1, 0][i]])
        params = []
        for l, layer in enumerate(model.layers):
            on = bool(l >= L - tuned[i])
            layer.weight.requires_grad_(on)
            layer.bias.requires_grad_(on)
            params += [layer.weight, layer.bias] if on else []
        opt = torch.optim.Adam(params, lr=lr[i], weight_decay=wd[i])
        stream = BatchStream(3, BATCH, (D,))
        for _ in range(STEPS):
            x = stream.next()
            loss = ((model(x) - tm(x).detach()) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        for l, layer in enumerate(model.layers):
            assert relative_error(Ws[i, l].detach().numpy(), layer.weight.detach().numpy()) <= 1e-6
            assert relative_error(bs[i, l].detach().numpy(), layer.bias.detach().numpy()) <= 1e-6
            if l < L - tuned[i]:  # frozen layers stay bit-for-bit frozen
                np.testing.assert_array_equal(Ws[i, l].detach().numpy(), frozen[i].weights[l])


def test_tfn_stack_equals_loop():
    """The stack, with its hand-written backward and with autograd, against one plain loop of
    torch.optim.Adam per run (computed once: the loop is the slow part)."""
    Dt, Lt, H, N, steps = 4, 2, 2, 3, 60
    frozen = [lora_theory.random_tfn(Dt, Lt, H, seed=s) for s in (1, 2)]
    target = lora_theory.random_tfn(Dt, Lt, H, seed=9)
    ranks = np.array([1, 3])
    lr, wd = np.array([1e-2, 3e-3]), np.array([1e-3, 0.0])
    tune_bias = np.array([True, False])
    effective = {}
    for backward in ("manual", "autograd"):
        stack = TFNStack(_stack_tfn(frozen), ranks=ranks, tune_bias=tune_bias, init_seeds=[5, 6], dtype=torch.float64)
        tstack = TFNStack({k: v[None] for k, v in target.parameters().items()}, method="none", dtype=torch.float64)
        train_stack(
            stack,
            tstack,
            data_index=[0, 0],
            target_index=[0, 0],
            target_data_index=[0],
            data_seeds=[4],
            lr=lr,
            weight_decay=wd,
            iterations=steps,
            batch_size=8,
            input_shape=(Dt, N),
            backward=backward,
        )
        effective[backward] = stack.effective()
    for i in range(2):
        r = int(ranks[i])
        model = TorchTFN.from_numpy(frozen[i])
        tm = TorchTFN.from_numpy(target)
        for p in model.parameters():
            p.requires_grad_(False)
        names = []
        for l in range(Lt):
            for h in range(H):
                for short, mod in zip(("wq", "wk", "wv", "wo"), ("query", "key", "value", "output")):
                    names.append((f"blocks.{l}.heads.{h}.{mod}.weight", short, l, h))
        names += [(f"blocks.{Lt - 1}.ff2.weight", "w2", Lt - 1, None), ("output.weight", "w_out", None, None)]
        As = [torch.nn.Parameter(a) for a in lora_init_A(5 + i, [r] * len(names), Dt)]
        # the stack orders adapters as (block, head, kind) then w2, w_out: same order as `names`
        Bs = [torch.nn.Parameter(torch.zeros(Dt, r, dtype=torch.float64)) for _ in names]
        params = As + Bs
        if tune_bias[i]:
            for blk in model.blocks:
                for m in (blk.ff1, blk.ff2):
                    m.bias.requires_grad_(True)
                    params.append(m.bias)
        opt = torch.optim.Adam(params, lr=lr[i], weight_decay=wd[i])
        stream = BatchStream(4, 8, (Dt, N))
        for _ in range(steps):
            X = stream.next()
            state = {n: model.get_parameter(n) + B @ A for (n, *_), A, B in zip(names, As, Bs)}
            loss = ((functional_call(model, state, (X,), strict=False) - tm(X).detach()) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        for backward, eff in effective.items():
            for (n, short, l, h), A, B in zip(names, As, Bs):
                want = (model.get_parameter(n) + B @ A).detach().numpy()
                got = eff[short][i] if l is None else (eff[short][i, l] if h is None else eff[short][i, l, h])
                assert relative_error(got.detach().numpy(), want) <= 1e-6, (backward, n)
            for l, blk in enumerate(model.blocks):
                assert relative_error(eff["b1"][i, l].detach().numpy(), blk.ff1.bias.detach().numpy()) <= 1e-6


def test_manual_backward_equals_autograd():
    frozen, targets = _fnn_problem(3, seed=20)
    W, b = _stack_arrays(frozen)
    ranks = np.array([[1, 2, 3], [4, 4, 4], [0, 6, 1]])
    stack = FNNStack(W, b, ranks=ranks, tune_bias=[True, True, False], init_seeds=[1, 2, 3], dtype=torch.float64)
    with torch.no_grad():
        stack.params["B"].normal_()  # non-zero B so every gradient is exercised
        stack.params["B"].mul_(torch.cat([stack.masks["B"]] * 1).double())
    x = torch.randn(3, 20, D, dtype=torch.float64)
    y = torch.randn(3, 20, D, dtype=torch.float64)
    loss = stack.loss_and_grads(x, y)
    manual = {k: p.grad.clone() for k, p in stack.params.items()}
    for p in stack.params.values():
        p.grad = None
    ref = ((stack.forward(x) - y) ** 2).mean(dim=(1, 2))
    ref.sum().backward()
    assert relative_error(loss.numpy(), ref.detach().numpy()) <= 1e-12
    for k, p in stack.params.items():
        assert relative_error(manual[k].numpy(), p.grad.numpy()) <= 1e-12, k


@pytest.mark.parametrize(
    "blocks, heads, inputs", [(2, 2, "shared"), (2, 2, "per run"), (1, 1, "shared"), (3, 2, "per run")]
)
def test_tfn_manual_backward_equals_autograd(blocks, heads, inputs):
    """TFNStack.loss_and_grads against autograd through tfn_apply, float64: every adapter and bias gradient
    (padded ranks, biases trained in some runs), one input batch shared by all runs or one per run, one
    target batch or one per run."""
    R, Dt, N, n = 3, 5, 4, 6
    frozen = [lora_theory.random_tfn(Dt, blocks, heads, seed=60 + i) for i in range(R)]
    stack = TFNStack(
        _stack_tfn(frozen), ranks=[1, 3, 5], tune_bias=[True, False, True], init_seeds=[1, 2, 3], dtype=torch.float64
    )
    g = torch.Generator().manual_seed(blocks * 10 + heads)
    with torch.no_grad():
        for k, p in stack.params.items():
            if k.startswith("B_"):  # non-zero B so every gradient is exercised
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * stack.masks[k])
    lead = R if inputs == "per run" else 1
    x = torch.randn(lead, n, Dt, N, generator=g, dtype=torch.float64)
    y = torch.randn(R + 1 - lead, n, Dt, N, generator=g, dtype=torch.float64)
    if inputs == "shared":
        x = x.expand(R, n, Dt, N)  # as train_stack passes one data seed's batch
    loss = stack.loss_and_grads(x, y)
    manual = {k: p.grad.clone() for k, p in stack.params.items()}
    for p in stack.params.values():
        p.grad = None
    ref = ((stack.forward(x) - y) ** 2).mean(dim=(1, 2, 3))
    ref.sum().backward()
    assert relative_error(loss.numpy(), ref.detach().numpy()) <= 1e-12
    for k, p in stack.params.items():
        assert relative_error(manual[k].numpy(), p.grad.numpy()) <= 1e-12, k


def test_padded_ranks_stay_exactly_zero():
    R = 4
    frozen, targets = _fnn_problem(R, seed=30)
    W, b = _stack_arrays(frozen)
    TW, Tb = _stack_arrays(targets)
    ranks = np.array([[1, 1, 1], [2, 5, 0], [6, 6, 6], [3, 3, 3]])
    stack = FNNStack(W, b, ranks=ranks, tune_bias=[True] * R, init_seeds=range(R), dtype=torch.float32)
    target = FNNStack(TW, Tb, method="none", dtype=torch.float32)
    train_stack(
        stack,
        target,
        data_index=[0] * R,
        target_index=[0, 1, 0, 1],
        target_data_index=[0, 0],
        data_seeds=[1],
        lr=np.full(R, 3e-2),
        weight_decay=np.full(R, 1e-2),
        iterations=100,
        batch_size=BATCH,
    )
    A, B = stack.params["A"].detach(), stack.params["B"].detach()
    for i in range(R):
        for l in range(L):
            r = ranks[i, l]
            assert torch.all(A[i, l, r:] == 0) and torch.all(B[i, l, :, r:] == 0)
            delta = (B[i, l].double() @ A[i, l].double()).numpy()
            assert np.linalg.matrix_rank(delta) <= r
            assert np.abs(delta).max() > 0 or r == 0


def test_stacked_adam_masks_moments():
    p = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    opt = StackedAdam({"p": p}, {"p": mask}, lr=[0.1, 0.2], weight_decay=[0.1, 0.0])
    p.grad = torch.ones(2, 3) * float("nan")
    p.grad[mask] = 1.0
    opt.step()
    assert torch.all(p.detach()[~mask] == 0) and torch.all(opt.m["p"][~mask] == 0) and torch.all(opt.v["p"][~mask] == 0)
    assert torch.all(p.detach()[mask] < 0)


def test_batch_stream_same_data_whatever_is_stacked():
    """A run's training batches are its data seed's stream, whatever its stack holds: the run alone, runs of
    other seeds (batches gathered), runs of its own seed (the batch broadcast), or both; across a draw
    boundary."""
    from verification.trainer import DRAW_CHUNK

    frozen, targets = _fnn_problem(3, seed=50)
    W, b = _stack_arrays(frozen)
    TW, Tb = _stack_arrays(targets[:1])
    steps = DRAW_CHUNK + 10

    def batches_seen(seeds, watch):
        R, distinct = len(seeds), sorted(set(seeds))
        stack = FNNStack(
            W[:R], b[:R], ranks=[[1] * L] * R, tune_bias=[True] * R, init_seeds=range(R), dtype=torch.float64
        )
        target = FNNStack(
            np.repeat(TW, len(distinct), 0), np.repeat(Tb, len(distinct), 0), method="none", dtype=torch.float64
        )
        seen, original = [], stack.loss_and_grads

        def recording(x, y):
            seen.append(x[watch].clone())  # (BATCH, D): run `watch`'s batch
            return original(x, y)

        stack.loss_and_grads = recording
        index = [distinct.index(s) for s in seeds]
        train_stack(
            stack,
            target,
            data_index=index,
            target_index=index,
            target_data_index=range(len(distinct)),
            data_seeds=distinct,
            lr=np.full(R, 1e-3),
            weight_decay=np.zeros(R),
            iterations=steps,
            batch_size=BATCH,
        )
        return seen

    alone = batches_seen([7], 0)
    stream = BatchStream(7, BATCH, (D,))
    assert all(torch.equal(u, stream.next()) for u in alone)
    assert len(alone) == steps and not torch.equal(alone[0], alone[1])
    for seeds, watch in (([3, 7, 11], 1), ([7, 7], 1), ([7, 3, 7], 2)):
        assert all(torch.equal(u, v) for u, v in zip(batches_seen(seeds, watch), alone, strict=True)), seeds


def test_train_stack_stops_when_its_stop_event_is_set():
    import threading

    from verification.trainer import TrainingStopped

    frozen, targets = _fnn_problem(2, seed=40)
    W, b = _stack_arrays(frozen)
    TW, Tb = _stack_arrays(targets[:1])
    stack = FNNStack(W, b, ranks=[[1] * L] * 2, tune_bias=[True] * 2, init_seeds=[0, 1], dtype=torch.float64)
    target = FNNStack(TW, Tb, method="none", dtype=torch.float64)
    stop, steps = threading.Event(), []

    def progress(k):
        steps.append(k)
        stop.set()  # as an interruption from another thread would

    with pytest.raises(TrainingStopped, match="before step 51 of 1000"):
        train_stack(
            stack,
            target,
            data_index=[0, 0],
            target_index=[0, 0],
            target_data_index=[0],
            data_seeds=[1],
            lr=np.full(2, 1e-3),
            weight_decay=np.zeros(2),
            iterations=1000,
            batch_size=BATCH,
            progress=progress,
            stop=stop,
        )
    assert steps == [50]


def test_subnormals_are_flushed_while_training_and_the_mode_restored_after():
    assert not subnormals_are_flushed()
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals")
    with subnormals_flushed():
        assert subnormals_are_flushed()
    assert not subnormals_are_flushed()
    with subnormals_flushed(enabled=False):
        assert not subnormals_are_flushed()
    torch.set_flush_denormal(True)  # a thread that already flushes them is left so
    try:
        with subnormals_flushed():
            assert subnormals_are_flushed()
        assert subnormals_are_flushed()
    finally:
        torch.set_flush_denormal(False)


def test_flushing_subnormals_leaves_the_tfn_step_at_float32_rounding():
    """Large attention scores send softmax probabilities through the subnormal range; flushing them to zero
    changes the float32 losses and gradients by no more than rounding."""
    frozen = [lora_theory.random_tfn(8, 2, 2, seed=s) for s in range(3)]
    stack = TFNStack(_stack_tfn(frozen), ranks=[1, 2, 4], tune_bias=[True, False, True], init_seeds=[0, 1, 2])
    gen = torch.Generator().manual_seed(3)
    for k, p in stack.params.items():  # adapters away from B = 0, so every gradient is live
        p.data.add_(0.1 * torch.randn(p.shape, generator=gen) * stack.masks[k])
    x = 3.0 * torch.randn(1, 64, 8, 5, generator=gen)  # (1, n, D, N)
    y = torch.randn(3, 64, 8, 5, generator=gen)
    plain = stack.loss_and_grads(x, y).clone()
    S = torch.cat([s.flatten() for row in stack._ws["S"] for s in row])  # every softmax output
    assert ((S > 0) & (S < torch.finfo(torch.float32).tiny)).any()  # subnormals occur
    grads = {k: p.grad.clone() for k, p in stack.params.items()}
    with subnormals_flushed():
        flushed = stack.loss_and_grads(x, y).clone()
    assert relative_error(flushed.numpy(), plain.numpy()) <= 1e-6
    for k, p in stack.params.items():
        assert relative_error(p.grad.numpy(), grads[k].numpy()) <= 1e-5, k


def test_tfn_manual_backward_in_float32_is_as_accurate_as_autograd():
    """The hand-written step forms the scores as ``Z (W_K^T W_Q) Z^T``, autograd as ``(Z W_K^T)(Z W_Q^T)^T``:
    in float32, against the float64 gradients, its error is of autograd's own float32 size."""
    R, D, N, n = 3, 16, 10, 32
    frozen = [lora_theory.random_tfn(D, 2, 2, seed=80 + i) for i in range(R)]
    arrays = _stack_tfn(frozen)
    g = torch.Generator().manual_seed(8)
    adapters_B = None
    grads = {}
    x = torch.randn(1, n, D, N, generator=g, dtype=torch.float64)
    y = torch.randn(R, n, D, N, generator=g, dtype=torch.float64)
    for name, dtype, manual in (
        ("reference", torch.float64, False),
        ("autograd32", torch.float32, False),
        ("manual32", torch.float32, True),
    ):
        stack = TFNStack(arrays, ranks=[2, 4, 8], tune_bias=[True, True, False], init_seeds=[1, 2, 3], dtype=dtype)
        if adapters_B is None:
            adapters_B = {
                k: torch.randn(p.shape, generator=g, dtype=torch.float64) * stack.masks[k]
                for k, p in stack.params.items()
                if k.startswith("B_")
            }
        with torch.no_grad():
            for k, b in adapters_B.items():
                stack.params[k].copy_(b)
        xs, ys = x.to(dtype).expand(R, n, D, N), y.to(dtype)
        if manual:
            stack.loss_and_grads(xs, ys)
        else:
            ((stack.forward(xs) - ys) ** 2).mean(dim=(1, 2, 3)).sum().backward()
        grads[name] = torch.cat([p.grad.double().flatten() for p in stack.params.values()]).numpy()
    err_autograd = relative_error(grads["autograd32"], grads["reference"])
    err_manual = relative_error(grads["manual32"], grads["reference"])
    assert err_autograd < 1e-3  # float32 sized, not a broken reference
    assert err_manual <= 3 * err_autograd, (err_manual, err_autograd)
