"""Train the book's tiny MoE transformer with expert parallelism on CPU, launched the way users know::

    torchrun --nproc-per-node 2 -m moe_ref.train_ep
    torchrun --nproc-per-node 4 -m moe_ref.train_ep --ep 2   # 2 x 2: data x expert
    torchrun --nproc-per-node 2 -m moe_ref.train_ep --steps 20 --check --save ckpt

Every rank builds the corpus (:func:`~moe_ref.book.data.build_corpus`, deterministic) and the same model
(same seed): chapter 1's :class:`~moe_ref.book.model.TinyTransformer` at the experiments' size
(:data:`~moe_ref.experiments.arms.MODEL`: ``d_model=64``, 2 layers, 64-byte context) with an
:class:`~moe_ref.moe.MoE` in every FFN slot. :func:`~moe_ref.expert_parallel.expert_parallel` then keeps
``E / ep`` experts of each layer on each rank, over a 1-D device mesh (``ep`` = all ranks) or a 2-D
``("dp", "ep")`` mesh when ``--ep`` is smaller than the world (the experts are then replicated along
``"dp"``). Each rank draws its own batches (a generator seeded by the rank). A step is the data-parallel step
of the plain model:

1. forward and language-model loss on the rank's batch (the layers attach their auxiliary losses' gradient to
   their outputs, as in :mod:`moe_ref.book.train`), backward;
2. :func:`~moe_ref.expert_parallel.reduce_gradients`: every gradient becomes the gradient of the mean of the
   ranks' losses (the experts' already hold every rank's tokens, through the all-to-all's backward);
3. gradient clipping by the *global* norm (:func:`clip_grad_norm`: the experts' squares summed over the
   expert-parallel group, since each rank holds only its experts' gradients), AdamW, and each layer's
   ``after_optimizer_step`` (the bias update, with the load counted over all ranks).

``--check`` makes rank 0 replay the same steps afterwards in one process on the plain model, with gradient
accumulation over the ranks' batches, and print how far the losses and the final weights of every rank are
from it: rounding (about ``1e-6`` in float32) when expert parallelism is data parallelism of the same model.
Over many steps a float32 rounding difference eventually flips one token's routing decision, and from there
the two runs drift apart as any two training runs do (the check says at which step); with ``--dtype float64``
the two stay within about ``1e-15`` for hundreds of steps.
``--save DIR`` writes each MoE layer with :func:`~moe_ref.checkpoint.save_sharded` (``DIR/<module name>/``,
one file per rank's experts) and the other weights to ``DIR/model.safetensors`` from rank 0;
:func:`load_checkpoint` loads it into a model at any world size, or into the plain model.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .book.data import build_corpus
from .book.model import TinyTransformer
from .book.train import TrainConfig, param_groups, evaluate
from .capacity import CapacityConfig
from .experiments.arms import BALANCE_COEF, MODEL
from .expert_parallel import ExpertParallelMoE, expert_parallel, reduce_gradients
from .launch import init_from_env
from .losses import AuxLossConfig
from .moe import MoE
from .routers import RouterConfig

#: The file of the non-MoE weights written by ``--save``.
DENSE_WEIGHTS = "model.safetensors"
#: ``--check``: a loss difference above this is no longer rounding (the runs have separated).
SEPARATED = 1e-5
#: The first validation batches' seed; rank ``r`` evaluates with ``EVAL_SEED + r``.
EVAL_SEED = 1234


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (see ``python -m moe_ref.train_ep --help``)."""
    parser = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m moe_ref.train_ep",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: every rank); must "
                        "divide the number of ranks and --experts; the rest is data parallelism")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16, help="sequences per rank per step")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--expert-hidden", type=int, default=128, help="hidden width of each expert")
    parser.add_argument("--router", choices=("softmax", "sigmoid"), default="softmax",
                        help="sigmoid: DeepSeek-V3's router with the auxiliary-loss-free bias")
    parser.add_argument("--capacity-factor", type=float, default=None,
                        help="per-rank expert capacity (default: dropless)")
    parser.add_argument("--lr", type=float, default=6e-3)
    parser.add_argument("--warmup", type=int, default=20, help="linear warm-up steps, then cosine decay")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--eval-batches", type=int, default=4, help="validation batches per domain and rank")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="of the weights and the computation (float64 keeps a --check exact for longer)")
    parser.add_argument("--seed", type=int, default=0, help="the model's initialisation and the batches")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--save", metavar="DIR", default=None, help="write a sharded checkpoint here")
    parser.add_argument("--check", action="store_true",
                        help="rank 0 replays the steps on the plain model in one process and compares")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "experts", "k", "expert_hidden", "log_every", "eval_batches", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.ep is not None and args.ep < 1:
        parser.error(f"--ep must be >= 1, got {args.ep}")
    if args.k > args.experts:
        parser.error(f"--k must be <= --experts={args.experts}, got {args.k}")
    return args


def build_model(args: argparse.Namespace) -> TinyTransformer:
    """The plain model (every MoE holds all its experts), initialised from ``args.seed``."""
    router = RouterConfig(args.router)
    capacity = None if args.capacity_factor is None else CapacityConfig(args.capacity_factor)

    def ffn(_layer: int) -> MoE:
        return MoE(MODEL.d_model, args.expert_hidden, args.experts, args.k, activation=MODEL.activation,
                   router=router, capacity=capacity, init_std=0.02,
                   aux_losses=AuxLossConfig(balance_coef=BALANCE_COEF))

    torch.manual_seed(args.seed)
    return TinyTransformer(MODEL, ffn).to(getattr(torch, args.dtype))


def make_mesh(world_size: int, ep: int):
    """A 1-D mesh over every rank (``ep == world_size``) or a 2-D ``("dp", "ep")`` mesh: ranks
    ``d * ep ... (d + 1) * ep - 1`` share the experts out, ranks ``j, j + ep, ...`` hold the same experts."""
    from torch.distributed.device_mesh import init_device_mesh

    if world_size % ep:
        raise ValueError(f"--ep must divide the number of ranks ({world_size}), got {ep}")
    if ep == world_size:
        return init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    return init_device_mesh("cpu", (world_size // ep, ep), mesh_dim_names=("dp", "ep"))


def batch_generator(seed: int, rank: int) -> torch.Generator:
    """The generator of rank ``rank``'s training batches."""
    return torch.Generator().manual_seed(1_000_003 * seed + rank)


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """``(module name, layer)`` of every MoE in ``model``, in order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the gradients of an expert-parallel ``model`` by their global norm (over the whole model, as
    ``torch.nn.utils.clip_grad_norm_`` on the plain model would); returns the norm before clipping.

    Call after :func:`~moe_ref.expert_parallel.reduce_gradients`: the non-expert gradients are then the same
    on every rank, and each rank holds the gradients of its own experts, so the experts' squared norms are
    summed over the expert-parallel group.
    """
    layers = [m for m in model.modules() if isinstance(m, ExpertParallelMoE)]
    expert_ids = {id(p) for layer in layers for p in layer.experts.parameters()}
    grads = [(id(p), p.grad) for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    dtype = grads[0][1].dtype
    dense = [g.norm() for i, g in grads if i not in expert_ids]
    local = [g.norm() for i, g in grads if i in expert_ids]
    squares = torch.stack([torch.stack(dense).square().sum() if dense else torch.zeros((), dtype=dtype),
                           torch.stack(local).square().sum() if local else torch.zeros((), dtype=dtype)])
    if layers:
        ep = layers[0].ep
        experts = ep.all_reduce(squares[1:].clone().to(ep.comm_device()), ep.expert, "the gradient-norm all-reduce")
        squares[1] = experts.cpu()[0]
    total = squares.sum().sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch's clip_grad_norm_ rule
    for _, g in grads:
        g.mul_(coef)
    return float(total)


def optimizer_for(model: nn.Module, args) -> torch.optim.Optimizer:
    """AdamW as :func:`moe_ref.book.train.train` makes it (weight decay on matrices only)."""
    return torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))


def schedule(args) -> TrainConfig:
    """The learning-rate schedule of :class:`~moe_ref.book.train.TrainConfig` (warm-up, cosine)."""
    return TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup=min(args.warmup, args.steps),
                       weight_decay=args.weight_decay)


def save_checkpoint(model: nn.Module, directory, args=None) -> Path:
    """Every rank calls it: each MoE layer to ``directory/<module name>/`` (:func:`~moe_ref.checkpoint.save_sharded`),
    the other weights to ``directory/model.safetensors`` from rank 0 (the tied output head stored once)."""
    from safetensors.torch import save_file

    from .checkpoint import save_sharded

    directory = Path(directory)
    layers = moe_layers(model)
    for name, layer in layers:
        save_sharded(layer, directory / name)
    if not dist.is_initialized() or dist.get_rank() == 0:
        prefixes = tuple(name + "." for name, _ in layers)
        state, seen, tied = {}, {}, []
        for name, t in model.state_dict(keep_vars=False).items():
            if name.startswith(prefixes):
                continue
            if t.data_ptr() in seen:
                tied.append(f"{name}={seen[t.data_ptr()]}")
                continue
            seen[t.data_ptr()] = name
            state[name] = t.detach().cpu().contiguous().clone()
        metadata = {"format": "pt", "tied": ",".join(tied), "moe_layers": json.dumps([n for n, _ in layers])}
        if args is not None:
            metadata["args"] = json.dumps({k: v for k, v in vars(args).items() if k not in ("save", "check")})
        tmp = directory / (DENSE_WEIGHTS + ".tmp")
        save_file(state, str(tmp), metadata=metadata)
        tmp.replace(directory / DENSE_WEIGHTS)
    if dist.is_initialized():
        dist.barrier()
    return directory


def load_checkpoint(model: nn.Module, directory) -> nn.Module:
    """Load a :func:`save_checkpoint` directory into ``model`` (plain or expert-parallel, any world size)."""
    from safetensors import safe_open

    from .checkpoint import load_sharded

    directory = Path(directory)
    with safe_open(str(directory / DENSE_WEIGHTS), framework="pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys()}
        tied = f.metadata().get("tied", "")
    for pair in filter(None, tied.split(",")):
        name, source = pair.split("=")
        state[name] = state[source]
    layers = moe_layers(model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    prefixes = tuple(name + "." for name, _ in layers)
    if unexpected or [m for m in missing if not m.startswith(prefixes)]:
        raise ValueError(f"{directory / DENSE_WEIGHTS} does not match the model: missing "
                         f"{[m for m in missing if not m.startswith(prefixes)]}, unexpected {unexpected}")
    for name, layer in layers:
        load_sharded(layer, directory / name)
    return model


def _dropped(model: nn.Module) -> float:
    rates = [layer.drop_rate for _, layer in moe_layers(model) if layer.drop_rate is not None]
    return sum(rates) / len(rates) if rates else 0.0


def reference_run(args, corpus, world_size: int) -> tuple[nn.Module, list[float]]:
    """The same steps in one process on the plain model: each step backpropagates every rank's batch loss,
    divides the gradients by the number of ranks (gradient of the mean loss), clips, steps. Returns the model
    and the mean loss of each step."""
    model = build_model(args)
    model.train()
    config, optimizer = schedule(args), optimizer_for(model, args)
    generators = [batch_generator(args.seed, r) for r in range(world_size)]
    hooks = [m for m in model.modules() if callable(getattr(m, "after_optimizer_step", None))]
    losses = []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for g in generators:
            x, y, _ = corpus.get_batch("train", args.batch, MODEL.block_size, g)
            loss = model(x, y)[1]
            loss.backward()  # the auxiliary losses' gradient is attached once per forward, as on each rank
            total += loss.item()
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(world_size)
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        for m in hooks:
            m.after_optimizer_step()
        losses.append(total / world_size)
    return model, losses


def weight_difference(reference: nn.Module, states: list[tuple[dict, dict]]) -> float:
    """The largest absolute difference between every rank's state and the plain model's: ``states`` holds each rank's
    ``(state dict, {layer name: first expert})``; expert tensors compare with the reference's slice."""
    full = reference.state_dict()
    worst = 0.0
    for state, firsts in states:
        for name, value in state.items():
            target = full[name]
            layer = next((prefix for prefix in firsts if name.startswith(prefix + ".experts.")), None)
            if layer is not None:
                target = target[firsts[layer]:firsts[layer] + value.shape[0]]
            worst = max(worst, float((value.double() - target.double()).abs().max()))
    return worst


def main(argv: list[str] | None = None) -> dict:
    """Train (under ``torchrun``, or in a worker whose process group is already initialised); returns a summary
    ``{"rank", "world_size", "ep", "loss" (mean over ranks, per step), "val_loss", "seconds", "tokens_per_s"}``
    plus ``"check"`` (``{"loss_diff", "weight_diff"}``) on rank 0 with ``--check``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started_here = not dist.is_initialized()
    rank, world_size = init_from_env() if started_here else (dist.get_rank(), dist.get_world_size())
    try:
        return _train(args, rank, world_size)
    finally:
        if started_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, rank: int, world_size: int) -> dict:
    ep = world_size if args.ep is None else args.ep
    if args.experts % ep:
        raise ValueError(f"--ep must divide --experts={args.experts}, got {ep}")
    mesh = make_mesh(world_size, ep)
    corpus = build_corpus()
    model = expert_parallel(build_model(args), mesh=mesh)
    model.train()
    config, optimizer = schedule(args), optimizer_for(model, args)
    hooks = [m for m in model.modules() if callable(getattr(m, "after_optimizer_step", None))]
    generator = batch_generator(args.seed, rank)
    say = print if rank == 0 else (lambda *a, **k: None)
    tokens_per_step = world_size * args.batch * MODEL.block_size
    say(f"expert parallelism: {world_size} ranks, mesh {tuple(mesh.shape)} {mesh.mesh_dim_names}, "
        f"{args.experts // ep} of {args.experts} experts per rank and layer, {len(moe_layers(model))} MoE layers, "
        f"top-{args.k} {args.router}, {tokens_per_step} tokens per step, {args.threads} thread(s) per rank",
        flush=True)
    losses, last_log, start = [], time.perf_counter(), time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        x, y, _ = corpus.get_batch("train", args.batch, MODEL.block_size, generator)
        loss = model(x, y)[1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        reduce_gradients(model)
        if args.grad_clip > 0:
            clip_grad_norm(model, args.grad_clip)
        optimizer.step()
        for m in hooks:
            m.after_optimizer_step()
        mean_loss = loss.detach().reshape(1).clone()
        dist.all_reduce(mean_loss)
        losses.append(mean_loss.item() / world_size)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            now = time.perf_counter()
            steps_done = (step + 1) % args.log_every or args.log_every
            say(f"step {step + 1:5d} | loss {losses[-1]:.4f} | {steps_done * tokens_per_step / (now - last_log):8.0f} "
                f"tokens/s | dropped {_dropped(model):.3f}", flush=True)
            last_log = now
    seconds = time.perf_counter() - start
    by_domain = evaluate(model, corpus, batches=args.eval_batches, batch_size=args.batch, seed=EVAL_SEED + rank)
    val = torch.tensor([sum(by_domain.values()) / len(by_domain)], dtype=torch.float64)
    dist.all_reduce(val)
    val_loss = val.item() / world_size
    say(f"finished {args.steps} steps in {seconds:.1f} s ({args.steps * tokens_per_step / seconds:.0f} tokens/s); "
        f"validation loss {val_loss:.6f} (mean over ranks)", flush=True)
    if args.save:
        save_checkpoint(model, args.save, args)
        say(f"saved to {args.save}: {DENSE_WEIGHTS} and one sharded checkpoint per MoE layer "
            f"({', '.join(name for name, _ in moe_layers(model))})", flush=True)
    summary = dict(rank=rank, world_size=world_size, ep=ep, loss=losses, val_loss=val_loss, seconds=seconds,
                   tokens_per_s=args.steps * tokens_per_step / seconds)
    if args.check:
        firsts = {name: layer.first_expert for name, layer in moe_layers(model)}
        states = [None] * world_size
        mine = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
        dist.all_gather_object(states, (mine, firsts))
        if rank == 0:
            check_start = time.perf_counter()
            reference, ref_losses = reference_run(args, corpus, world_size)
            diffs = [abs(a - b) for a, b in zip(losses, ref_losses)]
            loss_diff = max(diffs) if all(map(math.isfinite, diffs)) else math.inf
            weight_diff = weight_difference(reference, states)
            apart = next((step + 1 for step, d in enumerate(diffs) if not d <= SEPARATED), None)
            say(f"check: single process, gradient accumulation over the {world_size} ranks' batches "
                f"({time.perf_counter() - check_start:.1f} s): max |loss difference| over {args.steps} steps "
                f"{loss_diff:.2e}, max |weight difference| over all ranks {weight_diff:.2e}", flush=True)
            if apart is not None:
                say(f"check: the losses first differ by more than {SEPARATED:g} at step {apart} (before it: "
                    f"{max(diffs[:apart - 1], default=0.0):.2e}): rounding flipped a routing decision, most likely, and "
                    f"from there the two runs drift apart as training runs do; --dtype float64 or fewer --steps "
                    f"keeps them together", flush=True)
            summary["check"] = dict(loss_diff=loss_diff, weight_diff=weight_diff, separated_at=apart)
    return summary


if __name__ == "__main__":
    main()
