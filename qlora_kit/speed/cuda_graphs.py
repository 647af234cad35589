"""speed.cuda_graphs: each decoder layer's training forward and backward replayed as CUDA graphs, one launch each.

At 4,096 tokens a micro-batch an 8B step waits on the host: ~7 ms of Python and kernel launches per layer's forward
and backward against ~5-8 ms of GPU work (scripts/layer_host_time.py). A graph replays the layer's kernels from one
launch. Graphs fix every tensor's shape and address, so they apply where every training batch has one shape (the
plan decides that from the data); a micro-batch of another shape runs the layers' own code and frees the graphs.

How (torch.cuda.make_graphed_callables' scheme, done lazily and per layer):
- a shape's first micro-batch runs eagerly (kernels compile, cuBLAS/cuDNN pick their plans); its second captures:
  each layer's forward when the forward reaches it, its backward when backward does, all in one memory pool, so
  capture order is replay order (the pool's reuse of freed blocks is only safe in that order); later micro-batches
  replay;
- a layer that checkpoints captures its forward without autograd and recomputes inside the backward graph, as
  checkpointing would (its own checkpoint function only runs where the graphs do not);
- inputs live in static tensors: a layer's input is the previous layer's static output (no copy), tensors shared by
  every layer (cos/sin) are copied once per micro-batch, the first layer's input once;
- the adapter's gradients leave the backward graph in one buffer per dtype, cloned once per micro-batch:
  make_graphed_callables hands its static gradient buffers to autograd, which keeps them as `.grad` and adds the next
  micro-batch's onto them in place (pytorch#181723, open in torch 2.11).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch.utils import _pytree as pytree

log = logging.getLogger("qlora_kit")


def use_cuda_graphs(model) -> LayerGraphs | None:
    """Graph every decoder layer's training forward and backward (speed.cuda_graphs); returns the model's
    LayerGraphs (None: no decoder layers). Called after the checkpointing plan is applied: a layer that checkpoints
    now recomputes inside its backward graph, and its own flag goes off so that transformers does not checkpoint
    around the graphs (its checkpoint function still serves the batches that run without graphs)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from qlora_kit.speed.patches import rebind_forward

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        return None
    if hasattr(layers[0], "_layer_graphs"):  # applied already
        return layers[0]._layer_graphs
    graphs = LayerGraphs(layers)
    for layer in layers:
        rebind_forward(layer, graphed_forward, "_ungraphed_forward", _layer_graphs=graphs,
                       _graph_recompute=bool(layer.gradient_checkpointing))
        layer.gradient_checkpointing = False
    return graphs


def model_graphs(model) -> LayerGraphs | None:
    """The LayerGraphs use_cuda_graphs attached to this model's layers, if any."""
    for module in model.modules():
        graphs = getattr(module, "_layer_graphs", None)
        if graphs is not None:
            return graphs
    return None


class LayerGraphs:
    """The graphs of every decoder layer of one model, for one batch shape at a time, in one memory pool."""

    def __init__(self, layers: list[torch.nn.Module]) -> None:
        self.layers = layers
        self.entries: dict[int, GraphEntry] = {}  # id(layer) -> its graphs
        self.key = None  # the first layer's call key the graphs were captured for
        self.seen = None  # the key of the last micro-batch that ran without graphs
        self.mode = "eager"  # this micro-batch: eager, capture or replay
        self.pool = None
        self.stream: torch.cuda.Stream | None = None
        self.static_pointers: set[int] = set()  # data_ptr of every static output and input gradient
        self.shared: dict[int, torch.Tensor] = {}  # id(tensor) -> its static copy, while capturing
        self.copied: dict[int, int] = {}  # id(static copy) -> id(tensor copied into it), this micro-batch
        self.broken: str | None = None  # why graphs stopped for this run
        self.captures = 0  # shapes captured

    def begin_micro_batch(self, key) -> None:
        """The first layer's training forward: decide how this micro-batch runs."""
        self.copied.clear()
        if any(entry.awaiting_backward for entry in self.entries.values()):
            self.mode = "eager"  # a forward whose backward has not run reads the graphs' buffers: leave them be
            return
        if self.broken is not None:
            self.drop()
            self.mode = "eager"
        elif self.key == key and len(self.entries) == len(self.layers):
            self.mode = "replay"
        elif self.seen == key:
            self.drop()
            self.key, self.mode, self.shared = key, "capture", {}
            self.captures += 1
            log.info("speed.cuda_graphs: capturing %d decoder layers for batches of shape %s", len(self.layers),
                     key[0][0][0])
        else:
            if self.entries:
                log.info("speed.cuda_graphs: a batch of another shape; layers run without graphs until a shape "
                         "repeats")
            self.drop()
            self.mode = "eager"
        if self.mode == "eager":
            self.seen = key

    def drop(self) -> None:
        """Free every graph and static tensor (their pool goes back to the allocator)."""
        self.entries.clear()
        self.static_pointers.clear()
        self.shared = {}
        self.key, self.pool = None, None

    def forget_pending(self) -> None:
        """After an optimizer step no backward can still come for an earlier forward (one whose loss was dropped)."""
        for entry in self.entries.values():
            entry.awaiting_backward = False

    def fail(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            log.warning("speed.cuda_graphs: off for the rest of this run, %s; the layers run their own code", reason)

    def capture(self, graph: torch.cuda.CUDAGraph):
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        # thread_local: a DataLoader's pin-memory thread may allocate pinned memory while a capture runs
        return torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local")

    def static_input(self, tensor: torch.Tensor) -> torch.Tensor:
        """The static tensor a capture reads for `tensor`: itself where it is a static output already (the previous
        layer's), the copy made for the same tensor object earlier in this capture (cos/sin: every layer reads
        them), else a new copy."""
        if tensor.data_ptr() in self.static_pointers:
            return tensor.detach()
        if id(tensor) not in self.shared:
            static = tensor.detach().clone()
            self.shared[id(tensor)] = static
            self.copied[id(static)] = id(tensor)
        return self.shared[id(tensor)]

    def static_copy(self, tensor: torch.Tensor, static: torch.Tensor) -> None:
        """Bring `tensor` into a static input before a replay, unless it is there already."""
        if tensor.data_ptr() == static.data_ptr() or self.copied.get(id(static)) == id(tensor):
            return
        static.copy_(tensor)
        self.copied[id(static)] = id(tensor)


class GraphEntry:
    """One layer's forward and backward graphs and the static tensors they read and write."""

    def __init__(self, layer, graphs: LayerGraphs, key, spec, constants: tuple) -> None:
        self.layer, self.graphs, self.key, self.spec, self.constants = layer, graphs, key, spec, constants
        self.recompute = layer._graph_recompute
        trainable = [(name, p) for name, p in layer.named_parameters() if p.requires_grad]
        self.params = [p for _, p in trainable]
        # The graphs differentiate against aliases of the parameters (same memory, so they read each update), made
        # at capture: a parameter's own AccumulateGrad node was made on the default stream by an eager micro-batch,
        # and a capture that reaches it waits on that stream, which ends the capture.
        self.owners = [(layer.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]) for name, _ in trainable]
        self.aliases: list[torch.Tensor] = []
        self.pointers: tuple[int, ...] = ()  # where the parameters' memory was at capture
        self.static_inputs: list[torch.Tensor] = []
        self.hidden: torch.Tensor | None = None  # the input leaf the backward differentiates against
        self.output: torch.Tensor | None = None
        self.output_leaves: list = []  # the layer's return value flattened, TENSOR where the hidden states go
        self.output_spec = None
        self.tape_output: torch.Tensor | None = None  # a kept layer's captured output, with its autograd graph
        self.forward_graph = torch.cuda.CUDAGraph()
        self.backward_graph: torch.cuda.CUDAGraph | None = None
        self.grad_output: torch.Tensor | None = None
        self.grad_input: torch.Tensor | None = None
        self.param_grads: list[tuple[torch.Tensor, list[int]]] = []  # (flat gradients of one dtype, their params)
        self.awaiting_backward = False

    def run_layer(self, hidden: torch.Tensor):
        """The layer's own forward on the static inputs, its trainable parameters swapped for their aliases."""
        leaves = iter([hidden, *self.static_inputs[1:]])
        args, kwargs = pytree.tree_unflatten([next(leaves) if c is TENSOR else c for c in self.constants], self.spec)
        for (module, name), alias in zip(self.owners, self.aliases, strict=True):
            module._parameters[name] = alias
        try:
            return self.layer._ungraphed_forward(*args, **kwargs)
        finally:
            for (module, name), param in zip(self.owners, self.params, strict=True):
                module._parameters[name] = param

    def capture_forward(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        graphs = self.graphs
        self.static_inputs = [graphs.static_input(t) for t in tensors]
        self.hidden = self.static_inputs[0].detach().requires_grad_(tensors[0].requires_grad)
        self.aliases = [p.detach().requires_grad_() for p in self.params]
        self.pointers = self.param_pointers()
        with graphs.capture(self.forward_graph), autocast_cache_off(), torch.set_grad_enabled(not self.recompute):
            returned = self.run_layer(self.hidden)
        if graphs.pool is None:
            graphs.pool = self.forward_graph.pool()
        leaves, self.output_spec = pytree.tree_flatten(returned)
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        if len(tensors) != 1:  # e.g. attention weights asked for: only the hidden states are graphed
            raise RuntimeError(f"the layer returned {len(tensors)} tensors, graphs take one")
        output = tensors[0]
        self.output_leaves = [TENSOR if leaf is output else leaf for leaf in leaves]
        self.tape_output = None if self.recompute else output
        self.output = output.detach()
        graphs.static_pointers.add(self.output.data_ptr())
        self.forward_graph.replay()
        return self.output.detach()

    def param_pointers(self) -> tuple[int, ...]:
        return tuple(p.data_ptr() for p in self.params)

    def hidden_states_of(self, returned) -> torch.Tensor:
        """The hidden states in what the layer returned (a recompute's), where the capture found them."""
        return pytree.tree_leaves(returned)[next(i for i, leaf in enumerate(self.output_leaves) if leaf is TENSOR)]

    def returned(self, output: torch.Tensor):
        """What the layer itself returns (Gemma 3's layers: a tuple), with `output` as its hidden states."""
        return pytree.tree_unflatten([output if leaf is TENSOR else leaf for leaf in self.output_leaves],
                                     self.output_spec)

    def replay_forward(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        for tensor, static in zip(tensors, self.static_inputs, strict=True):
            self.graphs.static_copy(tensor, static)
        self.forward_graph.replay()
        return self.output.detach()

    def capture_backward(self, grad: torch.Tensor) -> None:
        graphs = self.graphs
        static_grad = grad.data_ptr() in graphs.static_pointers and grad.is_contiguous()
        self.grad_output = grad.detach() if static_grad else grad.detach().contiguous().clone()
        wanted = ([self.hidden] if self.hidden.requires_grad else []) + self.aliases
        self.backward_graph = torch.cuda.CUDAGraph()
        with graphs.capture(self.backward_graph), autocast_cache_off():
            if self.recompute:
                with torch.enable_grad():
                    output = self.hidden_states_of(self.run_layer(self.hidden))
            else:
                output = self.tape_output
            # retain_graph: a failed capture can still differentiate the kept layer's forward without a graph
            grads = list(torch.autograd.grad(output, wanted, grad_outputs=self.grad_output, allow_unused=True,
                                             retain_graph=True))
            del output
            if self.hidden.requires_grad:
                self.grad_input = grads.pop(0)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads, strict=True)]
            by_dtype: dict[torch.dtype, list[int]] = {}
            for index, g in enumerate(grads):
                by_dtype.setdefault(g.dtype, []).append(index)
            self.param_grads = [(torch.cat([grads[i].reshape(-1) for i in indexes]), indexes)
                                for indexes in by_dtype.values()]
            del grads
        self.tape_output = None  # its saved tensors are free for later captures; the graph keeps what it reads
        if self.grad_input is not None:
            graphs.static_pointers.add(self.grad_input.data_ptr())
        self.backward_graph.replay()

    def replay_backward(self, grad: torch.Tensor) -> None:
        if grad.data_ptr() != self.grad_output.data_ptr():
            self.grad_output.copy_(grad)
        self.backward_graph.replay()

    def gradients(self) -> tuple:
        """(input gradient or None, one gradient per trainable parameter): tensors autograd may keep as `.grad`,
        so not the graph's buffers, which the next micro-batch overwrites."""
        param_grads: list[torch.Tensor | None] = [None] * len(self.params)
        for flat, indexes in self.param_grads:
            flat = flat.clone()
            offset = 0
            for i in indexes:
                size = self.params[i].numel()
                param_grads[i] = flat[offset:offset + size].view(self.params[i].shape)
                offset += size
        return None if self.grad_input is None else self.grad_input.detach(), *param_grads

    def eager_gradients(self, grad: torch.Tensor) -> tuple:
        """The gradients without a graph, after a failed backward capture: from the kept layer's captured forward
        (its saved tensors hold this micro-batch's values), or a recompute."""
        wanted = ([self.hidden] if self.hidden.requires_grad else []) + self.aliases
        with torch.enable_grad():
            output = self.hidden_states_of(self.run_layer(self.hidden)) if self.recompute else self.tape_output
            grads = list(torch.autograd.grad(output, wanted, grad_outputs=grad, allow_unused=True))
        self.tape_output = None
        grad_input = grads.pop(0) if self.hidden.requires_grad else None
        return grad_input, *grads


class GraphedLayer(torch.autograd.Function):
    """The autograd node of a graphed layer; its inputs are the hidden states and the trainable parameters."""

    @staticmethod
    def forward(ctx, entry: GraphEntry, capture: bool, tensors: list, hidden, *params):
        ctx.entry, ctx.capture = entry, capture
        return entry.capture_forward(tensors) if capture else entry.replay_forward(tensors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        entry = ctx.entry
        entry.awaiting_backward = False
        if not ctx.capture:
            entry.replay_backward(grad)
            return None, None, None, *entry.gradients()
        try:
            entry.capture_backward(grad)
        except Exception as error:
            entry.graphs.fail(f"capturing {type(entry.layer).__name__}'s backward failed ({error_line(error)})")
            return None, None, None, *entry.eager_gradients(grad)
        return None, None, None, *entry.gradients()


TENSOR = object()  # a tensor's place among a call's (or a return value's) leaves


def error_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def call_key(args: tuple, kwargs: dict):
    """(key, spec, constants, tensors) of a decoder layer call, or None where graphs cannot serve it: CUDA hidden
    states first, every other argument a tensor without gradient or a plain constant (no cache object)."""
    if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_cuda:
        return None
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors, constants, signature = [], [], []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if tensors and leaf.requires_grad:
                return None
            tensors.append(leaf)
            constants.append(TENSOR)
            signature.append((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device, leaf.requires_grad))
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            constants.append(leaf)
            signature.append(leaf)
        else:
            return None
    autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    return (tuple(signature), spec, autocast), spec, tuple(constants), tensors


def graphed_forward(self, *args, **kwargs):
    graphs: LayerGraphs = self._layer_graphs
    call = call_key(args, kwargs) if self.training and torch.is_grad_enabled() else None
    if call is None:
        return eager_layer_forward(self, *args, **kwargs)
    key, spec, constants, tensors = call
    if self is graphs.layers[0]:
        graphs.begin_micro_batch(key)
    entry = graphs.entries.get(id(self))
    if graphs.mode == "replay" and entry is not None and entry.pointers != entry.param_pointers():
        # a parameter got new memory (`param.data = ...`): the graphs would go on reading the old; capture again
        if graphs.key is not None:
            log.info("speed.cuda_graphs: the adapter weights of %s moved; the graphs are captured again",
                     type(self).__name__)
        graphs.key = None
        return eager_layer_forward(self, *args, **kwargs)
    if graphs.mode == "replay" and entry is not None and entry.key == key and not entry.awaiting_backward:
        output = GraphedLayer.apply(entry, False, tensors, tensors[0], *entry.params)
        entry.awaiting_backward = output.requires_grad  # a layer nothing trains in, fed no gradient, gets none
        return entry.returned(output)
    if graphs.mode == "capture" and entry is None and graphs.broken is None:
        entry = GraphEntry(self, graphs, key, spec, constants)
        try:
            output = GraphedLayer.apply(entry, True, tensors, tensors[0], *entry.params)
        except Exception as error:  # a kernel that cannot be captured: this run goes on without graphs
            graphs.fail(f"capturing {type(self).__name__} failed ({error_line(error)})")
            return eager_layer_forward(self, *args, **kwargs)
        entry.awaiting_backward = output.requires_grad
        graphs.entries[id(self)] = entry
        return entry.returned(output)
    if graphs.mode == "replay":
        graphs.fail(f"{type(self).__name__} was called with other arguments than it was captured with")
    return eager_layer_forward(self, *args, **kwargs)


def eager_layer_forward(self, *args, **kwargs):
    """The layer's own forward, checkpointed where the plan recomputes it (with its checkpoint function, as
    transformers would call it)."""
    if self._graph_recompute and self.training and torch.is_grad_enabled():
        return self._gradient_checkpointing_func(functools.partial(self._ungraphed_forward, **kwargs), *args)
    return self._ungraphed_forward(*args, **kwargs)


class autocast_cache_off:
    """Autocast's cache of cast weights off during a capture: a cast cached outside it would be read forever."""

    def __enter__(self):
        self.before = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)

    def __exit__(self, *exc):
        torch.set_autocast_cache_enabled(self.before)
