"""N copies of one architecture trained as one: stacked tensors and a vmapped forward.

    stack = Stack(modules)                  # N modules of one architecture, any initialization
    out = stack(x, batched=True)            # (N, B, ...) in, (N, B, classes) out, differentiable
    stack.views[k]                          # an nn.Module whose tensors ARE member k's slices
    stack.logits(x, batched, prepare, ...)  # eval-mode logits of every member, chunked

Every parameter and buffer is one tensor with a leading member dimension, the forward is
`torch.func.vmap` over `functional_call`, and `backward()` of the summed member losses gives
each member exactly its own gradient (the members share no arithmetic). An elementwise
optimizer (SGD, Adam, AdamW) over the stacked parameters therefore updates each member exactly
as it would update that member alone; `member_optimizer_state` / `stacked_optimizer_state`
convert between its state and the state a single model's optimizer would have.

Dropout: a separate run draws its masks from the default generator seeded per step; inside
vmap a random op cannot be seeded per member. So the masks are drawn outside vmap, member by
member, with the same generator, seeds and calls (`F.dropout` of ones: the very mask that run
multiplies by), and the forward multiplies by them. Any other random op in a model's forward
fails under vmap, as does a forward that branches on its data or calls .item(); `Stack` turns
those into a UserError. BatchNorm works: its running statistics are stacked buffers, updated
in place per member.
"""
from __future__ import annotations

import copy
import inspect
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode

from dgrun.errors import UserError

_DROPOUT_ARGS = inspect.signature(F.dropout)


class _Dropout(TorchFunctionMode):
    """Inside the forward: F.dropout records its (shape, p) or multiplies by the next mask."""

    def __init__(self, masks: Optional[Sequence[Tensor]] = None):
        super().__init__()
        self.masks, self.calls = masks, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.dropout:
            return func(*args, **kwargs)
        bound = _DROPOUT_ARGS.bind(*args, **kwargs)
        bound.apply_defaults()
        x, p, training = bound.arguments["input"], bound.arguments["p"], bound.arguments["training"]
        if not training or p == 0:
            return x
        if self.masks is None:  # recording: the shapes and rates the real forward draws
            self.calls.append((tuple(x.shape), float(p)))
            return x
        mask = self.masks[len(self.calls)]
        self.calls.append(None)
        return x * mask


class Stack:
    def __init__(self, modules: Sequence[nn.Module]):
        self.size = len(modules)
        self.base = copy.deepcopy(modules[0])
        named = [dict(m.named_parameters()) for m in modules]
        self.params = {name: nn.Parameter(torch.stack([n[name].detach() for n in named]),
                                          requires_grad=p.requires_grad)
                       for name, p in self.base.named_parameters()}
        buffers = [dict(m.named_buffers()) for m in modules]
        self.buffers = {name: torch.stack([b[name] for b in buffers])
                        for name, _ in self.base.named_buffers()}
        self.views = [self._view(k) for k in range(self.size)]
        self._dropout: dict[tuple, list] = {}
        self._frozen: Optional[Tensor] = None
        self._frozen_values: dict[str, Tensor] = {}

    def _view(self, k: int) -> nn.Module:
        """A module whose parameters and buffers alias member k's slices: it sees every update
        and can be handed to anything that takes a model (probes, attacks, hooks)."""
        view = copy.deepcopy(self.base)
        for name, p in view.named_parameters():
            p.data = self.params[name].data[k]
        for name, _ in view.named_buffers():
            owner, _, leaf = name.rpartition(".")
            setattr(view.get_submodule(owner), leaf, self.buffers[name][k])
        return view

    def parameters(self) -> list[nn.Parameter]:
        """In the order of the single model's parameters(): optimizer state indices match."""
        return list(self.params.values())

    # ------------------------------------------------------------------ forward
    def __call__(self, x: Tensor, batched: bool, masks: Sequence[Tensor] = ()) -> Tensor:
        """(N, B, ...) inputs (or one shared (B, ...) batch: batched=False) -> (N, B, ...)."""
        def one(params, buffers, x, masks):
            if not masks:
                return functional_call(self.base, (params, buffers), (x,))
            with _Dropout(masks):
                return functional_call(self.base, (params, buffers), (x,))

        try:
            return vmap(one, in_dims=(0, 0, 0 if batched else None, 0))(
                self.params, self.buffers, x, list(masks))
        except RuntimeError as e:
            name, text = type(self.base).__name__, str(e)
            if "random operation" in text:
                raise UserError(f"model {name} draws random numbers other than F.dropout in "
                                "its forward, which an ensemble cannot seed per member",
                                "use trainer.ensemble=1 for this model") from None
            if text.startswith("vmap") or "vmap:" in text:  # .item(), data-dependent branches
                raise UserError(f"model {name} cannot run under torch.func.vmap "
                                f"({text.splitlines()[0][:160]})",
                                "use trainer.ensemble=1 for this model") from None
            raise

    def dropout_calls(self, x: Tensor, batched: bool) -> list[tuple[tuple, float]]:
        """(shape, p) of each F.dropout the training forward makes on a batch shaped like x,
        found once per batch shape by a side-effect-free forward of member 0."""
        key = (tuple(x.shape), batched)
        if key not in self._dropout:
            one = x[0] if batched else x
            params = {n: p[0].detach() for n, p in self.params.items()}
            buffers = {n: b[0].clone() for n, b in self.buffers.items()}  # BN stats untouched
            with torch.no_grad(), _Dropout() as mode:
                functional_call(self.base, (params, buffers), (one,))
            self._dropout[key] = mode.calls
        return self._dropout[key]

    @torch.no_grad()
    def logits(self, x: Tensor, batched: bool,
               prepare: Callable[[Tensor, bool], tuple[Tensor, bool]], chunk: int) -> Tensor:
        """(N, n, classes): every member's eval-mode float logits for stored rows x ((N, n, ...)
        or shared (n, ...)), in chunks of `chunk` rows as Evaluation.predict cuts them.
        prepare(rows, batched) -> (inputs, batched)."""
        self.base.eval()
        try:
            n = x.shape[1] if batched else x.shape[0]
            parts = [self(*prepare(x[:, i:i + chunk] if batched else x[i:i + chunk], batched)
                          ).float() for i in range(0, n, chunk)]
            return torch.cat(parts, dim=1)
        finally:
            self.base.train()

    # ------------------------------------------------------------------ per-member updates
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """nn.utils.clip_grad_norm_ for each member on its own: the global norm of member k's
        gradients scales member k's gradients only. Returns the (N,) norms."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norms = torch.stack([torch.linalg.vector_norm(g.reshape(self.size, -1), dim=1)
                             for g in grads])
        total = torch.linalg.vector_norm(norms, dim=0)
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))
        return total

    @torch.no_grad()
    def freeze(self, members: Sequence[int]) -> None:
        """Hold these members' parameters and buffers at their current values from now on
        (`hold` puts them back after every update): an ended member stops changing."""
        if not members:
            self._frozen, self._frozen_values = None, {}
            return
        index = torch.tensor(sorted(members), device=next(iter(self.params.values())).device)
        self._frozen = index
        self._frozen_values = {n: t[index].clone() for n, t in self._tensors().items()}

    @torch.no_grad()
    def hold(self) -> None:
        if self._frozen is not None:
            for name, t in self._tensors().items():
                t.index_copy_(0, self._frozen, self._frozen_values[name])

    @torch.no_grad()
    def load_member(self, k: int, state_dict: dict[str, Tensor]) -> None:
        """Put a single model's state_dict (a checkpoint's "model") into member k's slices."""
        self.views[k].load_state_dict(state_dict)

    def member_state_dict(self, k: int) -> dict[str, Tensor]:
        """Member k as a single model's state_dict, with tensors of its own (a view would
        save the whole stack's storage)."""
        return {name: t.clone() for name, t in self.views[k].state_dict().items()}

    def _tensors(self) -> dict[str, Tensor]:
        return {**self.params, **self.buffers}


def draw_masks(calls: Sequence[tuple[tuple, float]], seeds: Sequence[int],
               device: torch.device) -> list[Tensor]:
    """Member k's dropout masks, as a separate run with generator seed seeds[k] draws them:
    one (N, *shape) tensor per F.dropout call, in call order."""
    generator = torch.default_generator
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        generator = torch.cuda.default_generators[index]
    per_member = []
    for seed in seeds:
        generator.manual_seed(seed)
        per_member.append([F.dropout(torch.ones(shape, device=device), p, True)
                           for shape, p in calls])
    return [torch.stack(masks) for masks in zip(*per_member)]


def member_optimizer_state(state: dict, params: Sequence[Tensor], k: int) -> dict:
    """Member k's slice of an optimizer state_dict over stacked params: the state_dict the same
    optimizer over the single model's parameters would have."""
    def take(i: int, value):
        if torch.is_tensor(value) and value.dim() > 0 and value.shape == params[i].shape:
            return value[k].clone()
        return value.clone() if torch.is_tensor(value) else copy.deepcopy(value)

    return {"state": {i: {key: take(i, v) for key, v in s.items()}
                      for i, s in state["state"].items()},
            "param_groups": copy.deepcopy(state["param_groups"])}


def stacked_optimizer_state(states: Sequence[Optional[dict]], params: Sequence[Tensor],
                            lead: int) -> dict:
    """The inverse of member_optimizer_state. states[k]: member k's optimizer state_dict, or
    None for a member that has none (it is frozen: zeros stand in). Values that are not
    per-parameter tensors (Adam's step count, the param groups) come from member `lead`."""
    ref = states[lead]
    stacked = {}
    for i, entry in ref["state"].items():
        stacked[i] = {}
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0 and \
                    (len(states),) + tuple(value.shape) == tuple(params[i].shape):
                stacked[i][key] = torch.stack([
                    s["state"][i][key].to(value) if s is not None and key in s["state"].get(i, {})
                    else torch.zeros_like(value) for s in states])
            else:
                stacked[i][key] = value
    return {"state": stacked, "param_groups": copy.deepcopy(ref["param_groups"])}
